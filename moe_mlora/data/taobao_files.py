"""Reading the Taobao CloudTheme files: the click log and the two pretrained-vector files.

Every file problem is a :class:`~moe_mlora.data.processed.DataError` naming the file and
the line (1-based, the header being line 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from moe_mlora.data.processed import DataError
from moe_mlora.data.synthetic_taobao import CLICK_LOG, ITEM_EMBEDDING, USER_EMBEDDING

NEEDED_FILES = (CLICK_LOG, USER_EMBEDDING, ITEM_EMBEDDING)
CLICK_COLUMNS = ("user_id", "item_id", "theme_id")
PARSE_CHUNK = 100_000  # embedding rows parsed at once
DATASET_URL = "https://tianchi.aliyun.com/dataset/9716"
GENERATE_HINT = (
    "python -m moe_mlora.data.generate taobao out=DIR themes=30 users=20000 "
    "items=8000 clicks=1000000"
)


def check_root(root: Path) -> list[Path]:
    """The three needed files under ``root``; a :class:`DataError` names what is missing."""
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data.root={root} is a file; give the folder that holds {', '.join(NEEDED_FILES)}"
        )
    if not root.is_dir():
        raise DataError(
            f"data.root={root}: no such folder; give the folder that holds "
            f"{', '.join(NEEDED_FILES)}. Real data: Tianchi dataset 9716 ({DATASET_URL}); "
            f"stand-ins: {GENERATE_HINT}"
        )
    missing = [name for name in NEEDED_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"Taobao root {root} is missing {', '.join(missing)} (the protocol needs "
            f"{', '.join(NEEDED_FILES)}). Real data: Tianchi dataset 9716 ({DATASET_URL}); "
            f"stand-ins: {GENERATE_HINT}"
        )
    return [root / name for name in NEEDED_FILES]


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # -sig: drop a BOM
        first = handle.readline().strip()
    if not first:
        raise DataError(f"{path}: empty file; expected a header line")
    return [name.strip().strip('"') for name in first.split(",")]


def _as_ids(values: pl.Series) -> pl.Series:
    """Integer ids when every value is one (cheaper joins), else the strings."""
    ints = values.cast(pl.Int64, strict=False)
    return ints if ints.null_count() == values.null_count() else values


def _bad_row(path: Path, row: int, expected: str, got: str) -> DataError:
    """A header line, then one row per line: data row ``row`` (0-based) is line ``row + 2``."""
    return DataError(f"{path}, line {row + 2}: expected {expected}; got {got!r}")


def read_clicks(path: Path) -> pl.DataFrame:
    """``user_id``, ``item_id``, ``theme_id`` of every click, in file order."""
    header = _header(path)
    missing = [c for c in CLICK_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {header}, the "
            f"protocol needs {', '.join(CLICK_COLUMNS)}"
        )
    frame = pl.read_csv(
        path, columns=list(CLICK_COLUMNS), schema_overrides=dict.fromkeys(CLICK_COLUMNS, pl.String)
    )
    for name in CLICK_COLUMNS:
        empty = frame[name].is_null() | (frame[name].str.strip_chars() == "")
        if empty.any():
            raise _bad_row(path, int(empty.arg_true()[0]), f"a {name}", "")
    return frame.with_columns(_as_ids(frame[name]) for name in CLICK_COLUMNS)


def _parse_vectors(path: Path, text: pl.Series, offset: int, dim: int | None) -> np.ndarray:
    """Rows of space-separated floats -> ``[n, dim]`` float32; a bad row raises with its line."""
    tokens = (
        text.fill_null("")
        .str.strip_chars()
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    lengths = tokens.list.len().to_numpy()
    dim = int(lengths[0]) if dim is None else dim
    bad = np.flatnonzero(lengths != dim)
    if bad.size or dim == 0:
        row = int(bad[0]) if bad.size else 0
        raise _bad_row(path, offset + row, f"{dim} space-separated floats", text[row])
    values = tokens.list.eval(pl.element().cast(pl.Float32, strict=False))
    bad_value = values.list.eval(pl.element().is_null()).list.any()
    if bad_value.any():
        row = int(bad_value.arg_true()[0])
        raise _bad_row(path, offset + row, f"{dim} numbers", text[row])
    vectors = values.explode().to_numpy().astype(np.float32).reshape(-1, dim)
    _check_finite(path, vectors, offset, lambda row: text[row])
    return vectors


def _check_finite(path: Path, vectors: np.ndarray, offset: int, line_of) -> None:
    """NaN or inf (or a value beyond float32) in a pretrained vector: refuse at load, naming
    the line, rather than let it surface as a NaN loss epochs later."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _bad_row(path, offset + row, "finite numbers (no nan or inf)", line_of(row))


def _wide_vectors(path: Path, frame: pl.DataFrame) -> np.ndarray:
    """The wide form (one column per dimension) -> ``[n, dim]`` float32."""
    columns = frame.columns[1:]
    values = frame.select(
        pl.col(c).str.strip_chars().cast(pl.Float32, strict=False) for c in columns
    )
    bad = values.select(pl.any_horizontal(pl.all().is_null())).to_series()
    if bad.any():
        row = int(bad.arg_true()[0])
        return_row = ",".join("" if v is None else str(v) for v in frame.row(row))
        raise _bad_row(path, row, f"{len(columns)} numbers after the id", return_row)
    vectors = values.to_numpy().astype(np.float32)
    _check_finite(path, vectors, 0, lambda row: ",".join(str(v) for v in frame.row(row)))
    return vectors


@dataclass
class Vectors:
    """Pretrained vectors of one file: ids (unique) and their rows."""

    ids: pl.Series
    vectors: np.ndarray  # float32 [n, dim]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def read_vectors(path: Path) -> Vectors:
    """``id,emb`` (one string of space-separated floats) or the wide ``id,v1,...,vD`` form."""
    header = _header(path)
    if len(header) < 2:
        raise DataError(
            f"{path}: expected a header 'id,emb' (vector as space-separated floats) or "
            f"'id,v1,...,vD'; got {header}"
        )
    frame = pl.read_csv(path, infer_schema=False, truncate_ragged_lines=False)
    id_col = frame.columns[0]
    if frame.height == 0:
        raise DataError(f"{path}: no vectors after the header")
    empty = frame[id_col].is_null()
    if empty.any():
        raise _bad_row(path, int(empty.arg_true()[0]), "an id in the first column", "")
    if frame.width == 2:
        text = frame[frame.columns[1]]
        parts, dim = [], None
        for start in range(0, frame.height, PARSE_CHUNK):
            part = _parse_vectors(path, text.slice(start, PARSE_CHUNK), start, dim)
            dim = part.shape[1]
            parts.append(part)
        vectors = np.concatenate(parts)
    else:
        vectors = _wide_vectors(path, frame)
    ids = _as_ids(frame[id_col].str.strip_chars())
    duplicated = ids.is_duplicated()
    if duplicated.any():
        row = int(duplicated.arg_true()[1] if duplicated.sum() > 1 else duplicated.arg_true()[0])
        raise _bad_row(path, row, "each id once (it appeared before)", str(ids[row]))
    return Vectors(ids, vectors)
