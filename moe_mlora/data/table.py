"""Users' own logs: any CSV or parquet table(s) as a multi-domain CTR dataset (``data=table``).

Each row is one sample: a user column, an item column, a domain column and a
0/1 label column (names set in the config); any other column can be used as an
extra categorical field by naming it in ``features``. The split is either the
per-domain, label-stratified 60 / 20 / 20 of docs/method.md (seed 123) or a column
of the file holding ``train`` / ``val`` / ``test``.

Every column is read as text and then typed the same way whatever the file
format: a column whose every value is an integer written canonically (``7``,
not ``007``) becomes Int64, anything else stays a string. So a CSV and the
parquet file of the same table give identical vocabularies (integers sort
numerically, strings lexicographically), and files whose type inference would
disagree (one file's ids look numeric, another's do not) still concatenate.

Bad input is a :class:`DataError` naming the file, the column, the row and the
value, because skipping or guessing would change the dataset silently. Nulls
in the user, item and feature columns are errors too unless ``null_as_oov`` is
set, which maps them to index 0 (the out-of-vocabulary embedding); a null
domain, label or split value is always an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from moe_mlora.data.cache import load_or_build
from moe_mlora.data.processed import SPLITS, DataError, FieldSpec, ProcessedData
from moe_mlora.data.splits import check_fractions, split_tensors, stratified_domain_split
from moe_mlora.data.table_options import CSV_SUFFIXES, TableSpec, make_spec, resolve_files

__all__ = ["TableSpec", "build_table", "make_spec", "prepare_table", "resolve_files"]

LABEL_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}
OOV_TOKEN = "<oov>"
PROTOCOL_VERSION = 1  # bump when the output of build_table changes, to invalidate caches
_FILE, _ROW = "__file", "__row"  # bookkeeping columns: file index and 1-based row in that file


def _is_csv(file: Path) -> bool:
    return file.suffix.lower() in CSV_SUFFIXES


def _scan(file: Path, separator: str) -> pl.LazyFrame:
    """The file as a lazy frame of text columns (CSV: no type inference at all)."""
    if _is_csv(file):
        return pl.scan_csv(file, separator=separator, infer_schema=False)
    return pl.scan_parquet(file)


def _read_file(file: Path, index: int, spec: TableSpec) -> pl.DataFrame:
    """The needed columns of one file as stripped strings, with its file index and row numbers."""
    try:
        lazy = _scan(file, spec.separator)
        present = lazy.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{file}: cannot read it ({type(err).__name__}: {err})") from err
    missing = [c for c in spec.columns() if c not in present]
    if missing:
        what = "data.user_col / item_col / domain_col / label_col / split_col / features"
        raise DataError(
            f"{file}: missing column(s) {missing}; the file has {present}. Set {what} to the "
            f"file's column names (CSV files need a header row; separator {spec.separator!r})"
        )
    text = [
        pl.col(c).cast(pl.String).str.strip_chars().replace("", None).alias(c)
        for c in spec.columns()
    ]
    try:
        return (
            lazy.select(text)
            .with_row_index(_ROW, offset=1)
            .with_columns(pl.lit(index, dtype=pl.Int32).alias(_FILE))
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{file}: cannot read it ({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------- checks


@dataclass
class _Rows:
    """All files' rows, with what is needed to point at one of them in an error."""

    files: list[Path]
    frame: pl.DataFrame

    def where(self, row: int) -> str:
        """``file, row N (line N+1)`` of the ``row``-th row of the combined frame."""
        file = self.files[int(self.frame[_FILE][row])]
        n = int(self.frame[_ROW][row])
        return f"{file}, row {n}" + (f" (line {n + 1})" if _is_csv(file) else "")

    def fail_first(self, bad: pl.Series, column: str, expected: str) -> None:
        """Raise naming the first row where ``bad`` is True, its value and how many rows fail."""
        if not bad.any():
            return
        row = int(bad.arg_true()[0])
        value = self.frame[column][row]
        count = int(bad.sum())
        raise DataError(
            f"{self.where(row)}: column {column!r} must be {expected}; got "
            f"{'an empty value' if value is None else repr(value)} "
            f"({count:,} of {self.frame.height:,} rows are bad)"
        )


def _check_nulls(rows: _Rows, spec: TableSpec) -> None:
    """Null ids or features are errors unless ``null_as_oov``; a null domain always is."""
    rows.fail_first(rows.frame[spec.domain_col].is_null(), spec.domain_col, "a domain value")
    if spec.null_as_oov:
        return
    for col in dict.fromkeys([spec.user_col, spec.item_col, *map(spec.column_of, spec.features)]):
        if col == spec.domain_col:
            continue
        rows.fail_first(
            rows.frame[col].is_null(),
            col,
            "non-empty (or set data.null_as_oov=true to map empty values to index 0, '<oov>')",
        )


def _labels(rows: _Rows, column: str) -> np.ndarray:
    """The label column as float32 0/1; accepts 0/1, 0.0/1.0 and booleans."""
    text = rows.frame[column].str.to_lowercase()
    label = text.replace_strict(LABEL_VALUES, default=None, return_dtype=pl.Float32)
    rows.fail_first(label.is_null(), column, "0 or 1 (or true / false)")
    return label.to_numpy()


def _split_codes(rows: _Rows, column: str) -> np.ndarray:
    """Split codes 0/1/2 from a column of ``train`` / ``val`` / ``test`` (any case)."""
    text = rows.frame[column].str.to_lowercase()
    codes = text.replace_strict(
        {name: i for i, name in enumerate(SPLITS)}, default=None, return_dtype=pl.Int8
    )
    rows.fail_first(codes.is_null(), column, "one of train, val, test")
    return codes.to_numpy()


# ----------------------------------------------------------------------------- encoding


def _typed(values: pl.Series) -> pl.Series:
    """Int64 if every value is a canonically written integer (so 2 < 10), else the strings."""
    as_int = values.cast(pl.Int64, strict=False)
    same = as_int.cast(pl.String).eq_missing(values)
    return as_int if bool(same.all()) else values


def _encode(values: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Index 1..n for the sorted distinct values, 0 for nulls; and the vocabulary."""
    typed = _typed(values)
    codes = typed.rank(method="dense").fill_null(0).cast(pl.Int64).to_numpy()
    vocab = typed.drop_nulls().unique().sort().cast(pl.String).to_list()
    return codes, [OOV_TOKEN, *vocab]


def _domains(rows: _Rows, spec: TableSpec) -> tuple[np.ndarray, list[str]]:
    """Domain id of each row (0..D-1) and the domain names, in ``spec.domains`` or sorted order."""
    values = rows.frame[spec.domain_col]
    present = _typed(values).unique().sort().cast(pl.String).to_list()
    names = list(spec.domains) if spec.domains is not None else present
    absent = [d for d in names if d not in set(present)]
    if absent:
        raise DataError(
            f"data.domains lists {absent}, which no row of column {spec.domain_col!r} holds; "
            f"the values present are {present}"
        )
    ids = values.replace_strict(names, list(range(len(names))), default=None, return_dtype=pl.Int64)
    rows.fail_first(ids.is_null(), spec.domain_col, f"one of data.domains {names}")
    return ids.to_numpy(), names


def _warn_empty_domains(codes: np.ndarray, domain: np.ndarray, names: list[str]) -> None:
    """A domain with no rows in a split has no AUC there, and no training data in train."""
    counts = np.zeros((len(SPLITS), len(names)), dtype=np.int64)
    np.add.at(counts, (codes.astype(np.int64), domain), 1)
    for s, split in enumerate(SPLITS):
        empty = [names[d] for d in np.flatnonzero(counts[s] == 0)]
        if empty:
            warnings.warn(
                f"table data: domain(s) {empty} have no rows in the {split} split",
                stacklevel=4,
            )


# ----------------------------------------------------------------------------- public


def _read_all(files: list[Path], spec: TableSpec, progress: bool | None) -> _Rows:
    frames = []
    bar = tqdm(files, desc="table: read", unit="file", disable=_disable(progress))
    for index, file in enumerate(bar):
        bar.set_postfix_str(file.name)
        frames.append(_read_file(file, index, spec))
    frame = pl.concat(frames, how="vertical")
    if frame.height == 0:
        raise DataError(f"data.path: the file(s) {[str(f) for f in files]} hold no data rows")
    return _Rows(files, frame)


def build_table(
    path: object,
    spec: TableSpec,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    progress: bool | None = None,
) -> ProcessedData:
    """Read the table(s) at ``path`` and turn them into train / val / test splits (no caching).

    ``path`` is a file, a glob or a list of either (see :func:`resolve_files`);
    rows keep the files' order (files sorted within a glob), which with
    ``seed`` fixes the stratified split.
    """
    fractions = check_fractions(fractions)
    files = resolve_files(path)
    rows = _read_all(files, spec, progress)
    bar = tqdm(total=3, desc="table: process", unit="stage", disable=_disable(progress))
    try:
        bar.set_postfix_str("check")
        _check_nulls(rows, spec)
        label = _labels(rows, spec.label_col)
        domain, domain_names = _domains(rows, spec)
        split_codes = _split_codes(rows, spec.split_col) if spec.split_col else None
        bar.update()

        bar.set_postfix_str("encode")
        columns, vocabularies = [], {}
        for name in spec.features:
            if name == "domain":  # the domain field follows the domain ids' order
                codes, vocab = domain + 1, [OOV_TOKEN, *domain_names]
            else:
                codes, vocab = _encode(rows.frame[spec.column_of(name)])
            columns.append(codes)
            vocabularies[name] = vocab
        sparse = np.stack(columns, axis=1).astype(np.int64)
        bar.update()

        bar.set_postfix_str("split")
        if split_codes is None:
            split_codes = stratified_domain_split(domain, label, fractions, seed)
        _warn_empty_domains(split_codes, domain, domain_names)
        splits = split_tensors(sparse, domain, label, split_codes)
        bar.update()
    finally:
        bar.close()

    return ProcessedData(
        fields=[FieldSpec(n, len(vocabularies[n])) for n in spec.features],
        domain_names=domain_names,
        splits=splits,
        vocabularies=vocabularies,
        meta={
            "source": "table",
            "files": [str(f) for f in files],
            **spec.key(),
            "seed": seed,
            "fractions": list(fractions),
        },
    )


def prepare_table(
    path: object,
    spec: TableSpec,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """:func:`build_table` through the on-disk cache (``cache_dir=None``: no cache).

    The key holds the resolved file list, every option and
    :data:`PROTOCOL_VERSION`; the files' sizes and mtimes are fingerprinted,
    so an edited, added or removed file (a glob is re-expanded) rebuilds.
    """
    fractions = check_fractions(fractions)
    files = resolve_files(path)
    key = {
        "source": "table",
        "version": PROTOCOL_VERSION,
        "files": [str(f) for f in files],
        **spec.key(),
        "seed": seed,
        "fractions": list(fractions),
    }
    return load_or_build(
        cache_dir,
        key,
        files,
        lambda: build_table(files, spec, seed, fractions, progress),
        label=f"table-{files[0].stem}",
    )


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = auto (off when not a TTY), else the opposite of ``progress``."""
    return None if progress is None else not progress
