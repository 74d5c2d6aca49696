"""The multi-domain LightningDataModule shared by every data source.

``source`` names a function that turns options (a data root, a split) into a
:class:`ProcessedData`; the module keeps its splits in memory and serves
index-slice batches (see :mod:`moe_mlora.data.batches`), including the
per-expert batches of MoE-MLoRA's phase 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch

from moe_mlora.data.batches import (
    ExpertBatches,
    ExpertEvalBatches,
    SingleDomainBatches,
    SplitBatches,
)
from moe_mlora.data.cache import default_cache_dir, generated_dir, write_atomically
from moe_mlora.data.processed import DataError, ProcessedData

log = logging.getLogger(__name__)


MOVIELENS_NO_ROOT = (
    "data.root is not set: give the folder of MovieLens files, e.g. "
    "data.root=/path/to/ml-1m (users.dat, ratings.dat, movies.dat) or "
    "data.root=/path/to/ml-100k (u.data, u.user, u.item). To make stand-ins in the "
    "real format: python -m moe_mlora.data.generate movielens format=ml-1m out=DIR"
)
TABLE_NO_PATH = (
    "data.path is not set: give your CSV or parquet file(s), e.g. "
    "data.path=/path/to/logs.csv, data.path='/path/to/logs/*.parquet' or "
    "data.path=[a.csv,b.csv], and name the columns with data.user_col, data.item_col, "
    "data.domain_col and data.label_col (see conf/data/table.yaml)"
)


def movielens_source(
    root: str | None,
    split_by: str,
    features: Sequence[str] = ("user", "item", "domain"),
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """MovieLens (ML-1M or ML-100K, detected) from the folder ``root``."""
    from moe_mlora.data.movielens import prepare_movielens

    if not root:
        raise DataError(MOVIELENS_NO_ROOT)
    return prepare_movielens(
        root,
        split_by,
        features=tuple(features),
        seed=seed,
        fractions=tuple(fractions),
        cache_dir=cache_dir,
        progress=progress,
    )


def generated_movielens_root(
    cache_dir: Path, fmt: str, users: int, items: int, ratings: int, generator_seed: int
) -> Path:
    """Generate MovieLens-format files once per parameter set, under the cache folder."""
    from moe_mlora.data.synthetic_movielens import generate_movielens

    params = {"format": fmt, "users": users, "items": items, "ratings": ratings}
    params["seed"] = generator_seed
    root = generated_dir(cache_dir, f"movielens-{fmt}", params)
    if (root / ".complete").exists():
        return root

    def write(folder: Path) -> None:
        try:
            generate_movielens(folder, fmt, users, items, ratings, generator_seed)
        except ValueError as error:  # the generator's sizes are config values: name them
            raise DataError(
                f"data.users={users} data.items={items} data.ratings={ratings}: {error}"
            ) from None
        (folder / ".complete").write_text(json.dumps(params))

    write_atomically(root, write)
    log.info("generated MovieLens-format (%s) files in %s", fmt, root)
    return root


def synthetic_movielens_source(
    split_by: str = "age",
    format: str = "ml-1m",
    users: int = 1000,
    items: int = 800,
    ratings: int = 50_000,
    generator_seed: int = 0,
    features: Sequence[str] = ("user", "item", "domain"),
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """Generated MovieLens-format files, read back through the real MovieLens loader."""
    root = generated_movielens_root(
        Path(cache_dir or default_cache_dir()), format, users, items, ratings, generator_seed
    )
    return movielens_source(str(root), split_by, features, seed, fractions, cache_dir, progress)


def table_source(
    path: str | Sequence[str] | None,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: Path | None = None,
    progress: bool | None = None,
    **columns,
) -> ProcessedData:
    """Users' own CSV / parquet logs: one row per sample (see :mod:`moe_mlora.data.table`).

    ``columns`` are :func:`moe_mlora.data.table.make_spec`'s options (column names,
    features, split column, domain order, ...).
    """
    from moe_mlora.data.table import make_spec, prepare_table

    if not path:
        raise DataError(TABLE_NO_PATH)
    return prepare_table(path, make_spec(**columns), seed, tuple(fractions), cache_dir, progress)


def taobao_source(**options) -> ProcessedData:
    """Taobao CloudTheme, Taobao-N themes (:func:`moe_mlora.data.taobao_source.taobao_source`)."""
    from moe_mlora.data.taobao_source import taobao_source as build

    return build(**options)


SOURCES: dict[str, Callable[..., ProcessedData]] = {
    "movielens": movielens_source,
    "synthetic_movielens": synthetic_movielens_source,
    "taobao": taobao_source,
    "table": table_source,
}


class MultiDomainDataModule(L.LightningDataModule):
    """In-memory train / val / test splits of a multi-domain CTR dataset.

    Args:
        source: a key of :data:`SOURCES`.
        name: the dataset's name in results and logs (e.g. ``movielens_gender``).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size (large: evaluation is cheap).
        shuffle_seed: seeds the per-epoch shuffling (the run's ``seed``).
        cache_dir: where processed splits and generated files are cached
            (``None``: the default cache folder).
        progress: progress bars while preprocessing (``None``: only on a terminal).
        project_pretrained: False feeds pretrained vectors (Taobao's) to the model at their
            own width, without the learned projection (``model.embedding_dim`` must match).
        **options: passed to the source (``root``, ``split_by``, ``features``...).
    """

    def __init__(
        self,
        source: str,
        name: str | None = None,
        batch_size: int = 1024,
        eval_batch_size: int = 65536,
        shuffle_seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool | None = None,
        project_pretrained: bool = True,
        **options,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise DataError(f"unknown data.source {source!r}; choose one of {sorted(SOURCES)}")
        self.source = source
        self.name = name or source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle_seed = shuffle_seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.progress = progress
        self.project_pretrained = bool(project_pretrained)
        self.options = options
        self.data: ProcessedData | None = None

    def prepare(self) -> ProcessedData:
        """Load (or build and cache) the processed splits; idempotent."""
        if self.data is None:
            build = SOURCES[self.source]
            self.data = build(**self.options, cache_dir=self.cache_dir, progress=self.progress)
            for spec in self.data.fields:  # a model-side choice, so not in the cache key
                spec.project_pretrained = self.project_pretrained
        return self.data

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def processed(self) -> ProcessedData:
        return self.prepare()

    @property
    def num_domains(self) -> int:
        return self.processed.num_domains

    @property
    def domain_names(self) -> list[str]:
        return self.processed.domain_names

    def domain_counts(self, split: str = "train") -> torch.Tensor:
        """Samples per domain in ``split`` (the weights of that split's WAUC)."""
        return self.processed.splits[split].domain_counts(self.num_domains)

    def positive_rates(self, split: str = "train") -> torch.Tensor:
        """Share of positive labels per domain in ``split``."""
        return self.processed.splits[split].domain_positive_rates(self.num_domains)

    def describe(self) -> str:
        """A table of the domains: samples per split and the training positive rate."""
        counts = {split: self.domain_counts(split).tolist() for split in self.processed.splits}
        rates = self.positive_rates("train").tolist()
        header = f"{'domain':<20}" + "".join(f"{s:>9}" for s in counts) + f"{'pos rate':>10}"
        lines = [f"{self.name}: {self.num_domains} domains", header]
        for d, name in enumerate(self.domain_names):
            cells = "".join(f"{counts[s][d]:>9,}" for s in counts)
            lines.append(f"{name:<20}{cells}{rates[d]:>10.3f}")
        return "\n".join(lines)

    def train_dataloader(
        self, domains: Sequence[int] | None = None, single_domain: bool = False
    ) -> SplitBatches | SingleDomainBatches:
        """Shuffled training batches of every domain, or only of ``domains``.

        ``single_domain``: every batch from one domain (:class:`SingleDomainBatches`).
        """
        split = self.processed.splits["train"]
        if domains is not None:
            split = split.select(torch.isin(split.domain, torch.tensor(list(domains))))
        if single_domain:
            return SingleDomainBatches(split, self.batch_size, seed=self.shuffle_seed)
        return SplitBatches(split, self.batch_size, shuffle=True, seed=self.shuffle_seed)

    def val_dataloader(self) -> SplitBatches:
        """Validation batches; under DDP each process a disjoint range of the rows."""
        return SplitBatches(self.processed.splits["val"], self.eval_batch_size, shard="rows")

    def test_dataloader(self) -> SplitBatches:
        """Test batches; under DDP each process a disjoint range of the rows."""
        return SplitBatches(self.processed.splits["test"], self.eval_batch_size, shard="rows")

    def expert_train_batches(
        self, assignment: Sequence[Sequence[int]], active: Sequence[int] | None = None
    ) -> ExpertBatches:
        """Phase-2 training batches for the experts in ``active`` (all by default)."""
        split = self.processed.splits["train"]
        return ExpertBatches(split, assignment, self.batch_size, self.shuffle_seed, active)

    def expert_val_batches(self, assignment: Sequence[Sequence[int]]) -> ExpertEvalBatches:
        split = self.processed.splits["val"]
        return ExpertEvalBatches(split, assignment, self.eval_batch_size)
