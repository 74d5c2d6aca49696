"""Batches served as index slices of in-memory tensors.

A per-row ``Dataset.__getitem__`` plus ``collate`` costs more than the model's
forward at CTR batch sizes, so the loaders here slice whole batches out of the
split's tensors. Each is a plain iterable with ``__len__`` (Lightning accepts
any iterable as a dataloader); shuffling uses a generator seeded from
``(seed, epoch)`` so runs are reproducible and independent of global RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moe_mlora.data.processed import SplitTensors

Batch = dict[str, torch.Tensor]


def epoch_generator(*key: int) -> torch.Generator:
    """A torch generator whose seed is a well-mixed hash of ``key`` (e.g. seed, expert, epoch)."""
    seed = int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SplitBatches:
    """Batches of one split; shuffled per epoch when ``shuffle`` is set.

    Each call to ``iter()`` is one epoch: the k-th call uses the permutation
    seeded by ``(seed, k)`` unless :meth:`set_epoch` fixed the epoch.
    """

    def __init__(
        self,
        split: SplitTensors,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else _ceil_div(n, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        split, size = self.split, self.batch_size
        order = None
        if self.shuffle:
            order = torch.randperm(len(split), generator=epoch_generator(self.seed, self.epoch))
        self.epoch += 1
        for step in range(len(self)):
            rows = slice(step * size, (step + 1) * size)
            index = rows if order is None else order[rows]
            yield {
                "sparse": split.sparse[index],
                "domain": split.domain[index],
                "label": split.label[index],
            }


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

    def __len__(self) -> int:
        counts = [len(self.rows[e]) for e in self.active]
        return max((_ceil_div(n, self.batch_size) for n in counts), default=0)

    def _shuffled_rows(self, expert: int) -> torch.Tensor:
        rows = self.rows[expert]
        order = torch.randperm(len(rows), generator=epoch_generator(self.seed, expert, self.epoch))
        return rows[order]

    def __iter__(self) -> Iterator[Batch]:
        experts = sorted(self.active)
        shuffled = {e: self._shuffled_rows(e) for e in experts}
        steps = len(self)
        self.epoch += 1
        size = self.batch_size
        for step in range(steps):
            pieces, tags = [], []
            for e in experts:
                chunk = shuffled[e][step * size : (step + 1) * size]
                if len(chunk):
                    pieces.append(chunk)
                    tags.append(torch.full((len(chunk),), e, dtype=torch.long))
            index = torch.cat(pieces)
            yield {
                "sparse": self.split.sparse[index],
                "domain": self.split.domain[index],
                "label": self.split.label[index],
                "expert": torch.cat(tags),
            }


class ExpertEvalBatches:
    """Phase-2 validation: each row once per expert that serves its domain, in large batches."""

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
        return _ceil_div(len(self.index), self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        size = self.batch_size
        for step in range(len(self)):
            window = slice(step * size, (step + 1) * size)
            index = self.index[window]
            yield {
                "sparse": self.split.sparse[index],
                "domain": self.split.domain[index],
                "label": self.split.label[index],
                "expert": self.expert[window],
            }
