"""What ``data=table`` reads: the column options (:class:`TableSpec`) and the data files.

Split out of :mod:`moe_mlora.data.table`. Both are checked here before any row is read,
so a typo in a column name or a path fails at once with what was expected.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_mlora.data.processed import DataError

ROLES = ("user", "item", "domain")  # names in ``features`` that mean the configured columns
DEFAULT_FEATURES = ROLES
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class TableSpec:
    """The column names and options that define how a table becomes a dataset."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    domain_col: str = "domain"
    label_col: str = "label"
    features: tuple[str, ...] = DEFAULT_FEATURES
    split_col: str | None = None
    domains: tuple[str, ...] | None = None
    null_as_oov: bool = False
    separator: str = ","

    def column_of(self, feature: str) -> str:
        """The file column behind a field: a role name maps to its column, others are columns."""
        return {"user": self.user_col, "item": self.item_col, "domain": self.domain_col}.get(
            feature, feature
        )

    def columns(self) -> list[str]:
        """Every file column the dataset needs, without repeats, in a stable order."""
        names = [self.user_col, self.item_col, self.domain_col, self.label_col]
        names += [self.column_of(f) for f in self.features]
        if self.split_col:
            names.append(self.split_col)
        return list(dict.fromkeys(names))

    def key(self) -> dict:
        return {
            "user_col": self.user_col,
            "item_col": self.item_col,
            "domain_col": self.domain_col,
            "label_col": self.label_col,
            "features": list(self.features),
            "split_col": self.split_col,
            "domains": None if self.domains is None else list(self.domains),
            "null_as_oov": self.null_as_oov,
            "separator": self.separator,
        }


# ----------------------------------------------------------------------------- options


def _as_list(value: object) -> list:
    """A config value that may be one item or a list (Hydra passes ListConfig) as a list."""
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def make_spec(
    user_col: str = "user_id",
    item_col: str = "item_id",
    domain_col: str = "domain",
    label_col: str = "label",
    features: Sequence[str] | None = None,
    split_col: str | None = None,
    domains: Sequence[object] | None = None,
    null_as_oov: bool = False,
    separator: str = ",",
) -> TableSpec:
    """Validate the options (before any file is read) and bundle them."""
    if isinstance(features, str):
        raise DataError(f"data.features must be a list of names, got the string {features!r}")
    feats = tuple(str(f) for f in _as_list(features)) or DEFAULT_FEATURES
    if len(set(feats)) != len(feats):
        raise DataError(f"data.features must not repeat a name, got {list(feats)}")
    for role, col in {"user_col": user_col, "item_col": item_col, "domain_col": domain_col}.items():
        if not col:
            raise DataError(f"data.{role} is empty: give the name of that column")
    label_like = {label_col, split_col} - {None}
    leaks = [f for f in feats if f in label_like]
    if leaks:
        raise DataError(
            f"data.features {leaks} name the label or split column: that would leak the answer"
        )
    if domains is not None:
        domains = tuple(str(d) for d in _as_list(domains))
        if not domains or len(set(domains)) != len(domains):
            raise DataError(f"data.domains must be non-empty without repeats, got {list(domains)}")
    if len(separator) != 1:
        raise DataError(f"data.separator must be one character, got {separator!r}")
    return TableSpec(
        str(user_col),
        str(item_col),
        str(domain_col),
        str(label_col),
        feats,
        str(split_col) if split_col else None,
        domains,
        bool(null_as_oov),
        separator,
    )


# ----------------------------------------------------------------------------- files


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _nearby(path: Path) -> str:
    """What the folder of a missing path holds, to spot typos."""
    folder = path.absolute().parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    names = sorted(p.name for p in folder.iterdir() if p.suffix in CSV_SUFFIXES + PARQUET_SUFFIXES)
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return f"{folder} holds {shown or 'no .csv / .parquet files'}"


def resolve_files(path: object) -> list[Path]:
    """The data files named by ``path``: a file, a glob, or a list of either (sorted per glob).

    Raises :class:`DataError` for a missing file, a glob that matches nothing,
    a folder, or a suffix other than .csv / .parquet / .pq.
    """
    entries = [str(p) for p in _as_list(path)]
    if not entries:
        raise DataError("data.path is empty: give a file, a list of files or a glob")
    files: list[Path] = []
    for entry in entries:
        expanded = str(Path(entry).expanduser())
        if _is_glob(expanded):
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(
                    f"data.path glob {entry!r} matched no files ({_nearby(Path(expanded))})"
                )
            files.extend(matches)
            continue
        file = Path(expanded)
        if file.is_dir():
            raise DataError(
                f"data.path {entry!r} is a folder; name the files or a glob, "
                f"e.g. data.path='{file}/*.parquet'"
            )
        if not file.is_file():
            raise DataError(f"data.path: no such file {entry!r} ({_nearby(file)})")
        files.append(file)
    files = list(dict.fromkeys(f.resolve() for f in files))
    for file in files:
        if file.suffix.lower() not in CSV_SUFFIXES + PARQUET_SUFFIXES:
            raise DataError(
                f"{file}: unsupported file type {file.suffix!r}; data.path takes .csv files "
                f"(with a header row) and .parquet / .pq files"
            )
    return files
