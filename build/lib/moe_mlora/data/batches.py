"""Batches served as index slices of in-memory tensors.

A per-row ``Dataset.__getitem__`` plus ``collate`` costs more than the model's
forward at CTR batch sizes, so the loaders here slice whole batches out of the
split's tensors. Each is a plain iterable with ``__len__`` (Lightning accepts
any iterable as a dataloader); shuffling uses a generator seeded from
``(seed, epoch)`` so runs are reproducible and independent of global RNG state.

Under DDP (several processes, see :mod:`moe_mlora.distributed`) the iterables shard
themselves; Lightning injects a ``DistributedSampler`` only into ``DataLoader`` objects,
so nothing else does. They read the rank and world size when iterated or measured, after
Lightning has set up the process group, and follow two rules:

* **training** (``SplitBatches(shard="batch")``, :class:`ExpertBatches`): every process
  builds the same global batch (same seed, same order) and takes its contiguous part of
  it, the parts as equal as possible (sizes differ by at most one row). The global batch
  size and the number of steps are the single process's, and the batch tells the loss the
  global batch's rows, so that DDP's gradient average is the single-process gradient.
  A final global batch with fewer rows than processes is dropped (so no process gets an
  empty part): at most ``world - 1`` rows of an epoch, other rows each epoch.
* **evaluation** (``SplitBatches(shard="rows")``, :class:`ExpertEvalBatches`): each process
  takes one contiguous range of the rows (no padding, no duplicate), cut into the same
  number of batches on every process. Metrics gathered across processes then see every
  row exactly once, so they equal the single-process values.

In a single process both rules give exactly the unsharded batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moe_mlora.data.processed import SplitTensors
from moe_mlora.distributed import process_slot

Batch = dict[str, torch.Tensor]


def epoch_generator(*key: int) -> torch.Generator:
    """A torch generator whose seed is a well-mixed hash of ``key`` (e.g. seed, expert, epoch)."""
    seed = int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def part_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` rows are cut into ``parts`` contiguous parts.

    The first ``n % parts`` parts get one row more (``torch.tensor_split``'s rule), so sizes
    differ by at most one.
    """
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def eval_windows(n: int, batch_size: int) -> list[slice]:
    """This process's evaluation batches of ``n`` rows, as slices.

    One process: ``batch_size`` rows at a time. Under DDP: this rank's contiguous range
    of the rows, cut into as many batches as the largest range needs, so every rank runs
    the same number of steps and every row is in exactly one rank's batches.
    """
    rank, world = process_slot()
    if world == 1:
        return [
            slice(step * batch_size, (step + 1) * batch_size)
            for step in range(_ceil_div(n, batch_size))
        ]
    start, stop = part_bounds(n, world, rank)
    steps = max(1, _ceil_div(_ceil_div(n, world), batch_size))
    windows = (part_bounds(stop - start, steps, step) for step in range(steps))
    return [slice(start + a, start + b) for a, b in windows]


def shard_of_batch(index: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of a global training batch (all of it in one process)."""
    rank, world = process_slot()
    if world == 1:
        return index
    start, stop = part_bounds(len(index), world, rank)
    return index[start:stop]


def _shard_keys(global_rows: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    """What the loss needs to turn a shard's summed loss into a part of the global mean."""
    return {"global_rows": global_rows, "world_size": torch.tensor(world)}


class SplitBatches:
    """Batches of one split; shuffled per epoch when ``shuffle`` is set.

    Each call to ``iter()`` is one epoch: the k-th call uses the permutation
    seeded by ``(seed, k)`` unless :meth:`set_epoch` fixed the epoch.

    ``shard`` says how DDP processes share it (see the module docstring): ``"batch"``
    (training: a part of every global batch) or ``"rows"`` (evaluation: a range of rows).
    """

    def __init__(
        self,
        split: SplitTensors,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard: str = "batch",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shard not in ("batch", "rows"):
            raise ValueError(f"shard must be 'batch' or 'rows', got {shard!r}")
        if shard == "rows" and (shuffle or drop_last):
            raise ValueError("shard='rows' is for evaluation: every row, in order")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_steps(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else _ceil_div(n, self.batch_size)

    def __len__(self) -> int:
        if self.shard == "rows":
            return len(eval_windows(len(self.split), self.batch_size))
        steps, world = self._global_steps(), process_slot()[1]
        last_rows = len(self.split) - (steps - 1) * self.batch_size
        return steps - 1 if world > 1 and steps and last_rows < world else steps

    def __iter__(self) -> Iterator[Batch]:
        if self.shard == "rows":
            for rows in eval_windows(len(self.split), self.batch_size):
                yield self._batch(rows)
            return
        split, size = self.split, self.batch_size
        order = None
        if self.shuffle:
            order = torch.randperm(len(split), generator=epoch_generator(self.seed, self.epoch))
        self.epoch += 1
        world = process_slot()[1]
        for step in range(len(self)):
            rows = slice(step * size, (step + 1) * size)
            if world == 1:
                yield self._batch(rows if order is None else order[rows])
                continue
            index = torch.arange(len(split))[rows] if order is None else order[rows]
            batch = self._batch(shard_of_batch(index))
            yield batch | _shard_keys(torch.tensor(len(index)), world)

    def _batch(self, index: slice | torch.Tensor) -> Batch:
        split = self.split
        return {
            "sparse": split.sparse[index],
            "domain": split.domain[index],
            "label": split.label[index],
        }


class SingleDomainBatches:
    """Training batches that each hold rows of one domain only (the reference's epochs).

    Each epoch visits the domains in a new random order and, within a domain, its rows
    in a new random order, ``batch_size`` at a time; so a batch never mixes domains and
    a domain's last batch may be short. The seeds are ``(seed, epoch)`` for the domain
    order and ``(seed, domain, epoch)`` for the rows, as :class:`SplitBatches`.
    Under DDP every process takes its part of each global batch; a batch with fewer
    rows than processes is dropped.
    """

    def __init__(self, split: SplitTensors, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        domains = torch.unique(split.domain)
        self.rows = {
            int(d): torch.nonzero(split.domain == d, as_tuple=True)[0] for d in domains.tolist()
        }

    def _sizes(self) -> list[int]:
        sizes = []
        for rows in self.rows.values():
            full, rest = divmod(len(rows), self.batch_size)
            sizes += [self.batch_size] * full + ([rest] if rest else [])
        return sizes

    def __len__(self) -> int:
        world = process_slot()[1]
        return sum(1 for size in self._sizes() if size >= world)

    def __iter__(self) -> Iterator[Batch]:
        domains = sorted(self.rows)
        order = torch.randperm(len(domains), generator=epoch_generator(self.seed, self.epoch))
        epoch, size, world = self.epoch, self.batch_size, process_slot()[1]
        self.epoch += 1
        for position in order.tolist():
            domain = domains[position]
            rows = self.rows[domain]
            rows = rows[
                torch.randperm(len(rows), generator=epoch_generator(self.seed, domain, epoch))
            ]
            for start in range(0, len(rows), size):
                index = rows[start : start + size]
                if len(index) < world:
                    continue
                part = index if world == 1 else shard_of_batch(index)
                batch = {
                    "sparse": self.split.sparse[part],
                    "domain": self.split.domain[part],
                    "label": self.split.label[part],
                }
                yield batch if world == 1 else batch | _shard_keys(torch.tensor(len(index)), world)


def expert_assignment(num_experts: int, num_domains: int) -> list[list[int]]:
    """Domains each expert specialises on in phase 2.

    With ``E >= D`` expert ``e`` serves domain ``e mod D`` (the reference's rule,
    so ``E = k D`` gives ``k`` experts per domain). With ``E < D`` expert ``e``
    serves every domain ``d`` with ``d mod E == e``, so every domain is covered.
    """
    if num_experts < 1:
        raise ValueError(f"experts must be >= 1, got {num_experts}")
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    if num_experts >= num_domains:
        return [[e % num_domains] for e in range(num_experts)]
    return [[d for d in range(num_domains) if d % num_experts == e] for e in range(num_experts)]


def expert_rows(split: SplitTensors, assignment: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """For each expert, the row indices of ``split`` that belong to its domains."""
    return [
        torch.nonzero(torch.isin(split.domain, torch.tensor(list(domains))), as_tuple=True)[0]
        for domains in assignment
    ]


class ExpertBatches:
    """Phase-2 training batches: every active expert's own batch, concatenated.

    Step ``j`` of an epoch holds, for each active expert ``e``, rows
    ``j*B .. (j+1)*B`` of that expert's shuffled data (the seed is
    ``(seed, e, epoch)``) tagged with ``expert = e``. Training experts one by one
    with ``active = {e}`` sees exactly the same batches for ``e``, which is what
    makes the parallel and sequential schedules equivalent.
    """

    def __init__(
        self,
        split: SplitTensors,
        assignment: Sequence[Sequence[int]],
        batch_size: int,
        seed: int = 0,
        active: Sequence[int] | None = None,
    ) -> None:
        self.split = split
        self.rows = expert_rows(split, assignment)
        self.batch_size = batch_size
        self.seed = seed
        self.active: set[int] = set(range(len(assignment)) if active is None else active)
        self.epoch = 0

    def _global_sizes(self) -> torch.Tensor:
        """Rows of each step's global batch: every active expert's next ``batch_size`` rows."""
        counts = torch.tensor([len(self.rows[e]) for e in self.active], dtype=torch.long)
        steps = max((_ceil_div(int(n), self.batch_size) for n in counts), default=0)
        offsets = torch.arange(steps) * self.batch_size
        return (counts[:, None] - offsets).clamp(0, self.batch_size).sum(0)

    def __len__(self) -> int:
        sizes, world = self._global_sizes(), process_slot()[1]
        if world == 1:
            return len(sizes)
        return int((sizes >= world).sum())  # sizes never grow, so this drops a suffix

    def _shuffled_rows(self, expert: int) -> torch.Tensor:
        rows = self.rows[expert]
        order = torch.randperm(len(rows), generator=epoch_generator(self.seed, expert, self.epoch))
        return rows[order]

    def __iter__(self) -> Iterator[Batch]:
        experts = sorted(self.active)
        shuffled = {e: self._shuffled_rows(e) for e in experts}
        steps = len(self)
        self.epoch += 1
        size, world = self.batch_size, process_slot()[1]
        for step in range(steps):
            pieces, tags = [], []
            for e in experts:
                chunk = shuffled[e][step * size : (step + 1) * size]
                if len(chunk):
                    pieces.append(chunk)
                    tags.append(torch.full((len(chunk),), e, dtype=torch.long))
            index, expert = torch.cat(pieces), torch.cat(tags)
            if world > 1:
                global_rows = torch.bincount(expert, minlength=len(self.rows))
                index, expert = shard_of_batch(index), shard_of_batch(expert)
            batch = {
                "sparse": self.split.sparse[index],
                "domain": self.split.domain[index],
                "label": self.split.label[index],
                "expert": expert,
            }
            yield batch if world == 1 else batch | _shard_keys(global_rows, world)


class ExpertEvalBatches:
    """Phase-2 validation: each row once per expert that serves its domain, in large batches.

    Under DDP each process takes a contiguous range of these (row, expert) pairs.
    """

    def __init__(
        self, split: SplitTensors, assignment: Sequence[Sequence[int]], batch_size: int
    ) -> None:
        rows = expert_rows(split, assignment)
        self.split = split
        self.index = torch.cat(rows)
        self.expert = torch.cat(
            [torch.full((len(r),), e, dtype=torch.long) for e, r in enumerate(rows)]
        )
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(eval_windows(len(self.index), self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        for window in eval_windows(len(self.index), self.batch_size):
            index = self.index[window]
            yield {
                "sparse": self.split.sparse[index],
                "domain": self.split.domain[index],
                "label": self.split.label[index],
                "expert": self.expert[window],
            }
