"""Reading the MovieLens files (ML-1M's ``::`` files and ML-100K's ``u.*`` files).

Split out of :mod:`moe_mlora.data.movielens`, which turns what is read here into the
multi-domain CTR protocol. Reading is vectorised (polars string ops on whole files, numpy
for the checks), and every malformed line raises a :class:`DataError` naming the file, the
1-based line number, the line and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from moe_mlora.data.processed import DataError

FORMAT_FILES = {
    "ml-1m": ("users.dat", "ratings.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.user", "u.item"),
}
GENERATE_HINT = "python -m moe_mlora.data.generate movielens format={fmt} out=DIR"

GENDERS = ("F", "M")
AGE_GROUPS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # code k is the lower bound of AGE_GROUPS[k]
AGE_BIN_EDGES = (18, 25, 35, 45, 50, 56)  # ML-100K ages in years -> the same 7 groups
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
ML100K_OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
ML100K_GENRE_FLAGS = 19
ENCODING = "latin-1"


# ----------------------------------------------------------------------------- format


def _missing_files_error(root: Path, problem: str) -> DataError:
    needs = "; ".join(
        f"{fmt}: {', '.join(files)} (stand-ins: {GENERATE_HINT.format(fmt=fmt)})"
        for fmt, files in FORMAT_FILES.items()
    )
    return DataError(f"MovieLens root {root}: {problem}. Each format needs these files: {needs}")


def detect_format(root: str | Path) -> str:
    """``"ml-1m"`` if ``root`` holds users.dat, ratings.dat, movies.dat; ``"ml-100k"`` for
    u.data, u.user, u.item. Raises :class:`DataError` saying what is missing otherwise."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise _missing_files_error(root, "a file, not the folder that holds the files")
    if not root.is_dir():
        raise _missing_files_error(root, "no such folder")
    for fmt, files in FORMAT_FILES.items():
        if all((root / name).is_file() for name in files):
            return fmt
    found = sorted(p.name for p in root.iterdir())
    shown = ", ".join(found[:20]) + (" ..." if len(found) > 20 else "") if found else "nothing"
    partial = [
        f"{fmt} is missing {', '.join(n for n in files if not (root / n).is_file())}"
        for fmt, files in FORMAT_FILES.items()
        if any((root / n).is_file() for n in files)
    ]
    detail = f" ({'; '.join(partial)})" if partial else ""
    raise _missing_files_error(root, f"cannot detect the format; found {shown}{detail}")


# ----------------------------------------------------------------------------- reading


@dataclass
class Table:
    """Fields of one file as strings, with the 1-based line number and text of each row."""

    path: Path
    frame: pl.DataFrame  # columns: line_no, line, f0 .. f{n-1}

    def fail(self, row: int, expected: str) -> DataError:
        line_no = int(self.frame["line_no"][row])
        line = self.frame["line"][row]
        return DataError(f"{self.path}, line {line_no}: expected {expected}; got {line!r}")

    def col(self, i: int) -> pl.Series:
        return self.frame[f"f{i}"]

    def ints(self, i: int, what: str) -> np.ndarray:
        """Field ``i`` as int64; the first non-integer value raises."""
        values = self.col(i).cast(pl.Int64, strict=False)
        bad = values.is_null()
        if bad.any():
            raise self.fail(int(bad.arg_true()[0]), f"an integer {what} in field {i + 1}")
        return values.to_numpy()

    def check(self, ok: np.ndarray, expected: str) -> None:
        """Raise for the first row where ``ok`` is False."""
        if not ok.all():
            raise self.fail(int(np.flatnonzero(~ok)[0]), expected)


UTF8_BOM = b"\xef\xbb\xbf"


def _read_table(path: Path, sep: str, n_fields: int, layout: str) -> Table:
    """Split every non-blank line of a Latin-1 file on ``sep`` (vectorised).

    A UTF-8 byte-order mark (an editor's or Excel's export) is dropped: it would otherwise
    glue three invisible characters to the first id.
    """
    lines = path.read_bytes().removeprefix(UTF8_BOM).decode(ENCODING).splitlines()
    frame = pl.DataFrame(
        {"line_no": np.arange(1, len(lines) + 1, dtype=np.int64), "line": lines},
        schema={"line_no": pl.Int64, "line": pl.String},
    ).filter(pl.col("line").str.strip_chars() != "")
    parts = frame["line"].str.split(sep)
    table = Table(path, frame)
    table.check(
        (parts.list.len() == n_fields).to_numpy(),
        f"{n_fields} fields separated by {sep!r} ({layout})",
    )
    if frame.height == 0:
        raise DataError(f"{path}: the file holds no data lines; expected lines like {layout}")
    fields = parts.list.to_struct(fields=[f"f{i}" for i in range(n_fields)]).struct.unnest()
    fields = fields.with_columns(pl.all().str.strip_chars())
    table.frame = pl.concat([frame, fields], how="horizontal")
    return table


def _unique_ids(table: Table, ids: np.ndarray, what: str) -> None:
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        raise table.fail(int(order[dup[0] + 1]), f"each {what} id once (it appeared before)")


@dataclass
class Users:
    """One row per user: id and the raw attributes (as used for extra features)."""

    ids: np.ndarray  # int64, sorted
    gender: np.ndarray  # str
    age: np.ndarray  # int64: ML-1M code or ML-100K years
    occupation: np.ndarray  # int64 code (ML-1M) or str word (ML-100K)
    # canonical domain index of each user, per split_by
    domains: dict[str, np.ndarray]


def _sorted_users(ids: np.ndarray, **columns: np.ndarray) -> tuple[np.ndarray, dict]:
    order = np.argsort(ids, kind="stable")
    return ids[order], {k: v[order] for k, v in columns.items()}


def _read_users_ml1m(path: Path) -> Users:
    t = _read_table(path, "::", 5, "UserID::Gender::Age::Occupation::Zip-code")
    ids = t.ints(0, "UserID")
    _unique_ids(t, ids, "UserID")
    gender = t.col(1).to_numpy().astype(str)
    t.check(np.isin(gender, GENDERS), "Gender F or M in field 2")
    age = t.ints(2, "Age")
    t.check(np.isin(age, ML1M_AGE_CODES), f"an Age code in {list(ML1M_AGE_CODES)} in field 3")
    occ = t.ints(3, "Occupation")
    t.check((occ >= 0) & (occ < len(ML1M_OCCUPATIONS)), "an Occupation code 0..20 in field 4")
    ids, cols = _sorted_users(ids, gender=gender, age=age, occ=occ)
    domains = {
        "gender": np.searchsorted(GENDERS, cols["gender"]),
        "age": np.searchsorted(ML1M_AGE_CODES, cols["age"]),
        "occupation": cols["occ"],
    }
    return Users(ids, cols["gender"], cols["age"], cols["occ"], domains)


def _read_users_ml100k(path: Path) -> Users:
    t = _read_table(path, "|", 5, "user id|age|gender|occupation|zip code")
    ids = t.ints(0, "user id")
    _unique_ids(t, ids, "user")
    age = t.ints(1, "age in years")
    t.check(age >= 0, "a non-negative age in years in field 2")
    gender = t.col(2).to_numpy().astype(str)
    t.check(np.isin(gender, GENDERS), "gender F or M in field 3")
    occ = t.col(3).to_numpy().astype(str)
    t.check(
        np.isin(occ, ML100K_OCCUPATIONS),
        f"an occupation among {', '.join(ML100K_OCCUPATIONS)} in field 4",
    )
    ids, cols = _sorted_users(ids, gender=gender, age=age, occ=occ)
    domains = {
        "gender": np.searchsorted(GENDERS, cols["gender"]),
        "age": np.digitize(cols["age"], AGE_BIN_EDGES),
        "occupation": np.searchsorted(ML100K_OCCUPATIONS, cols["occ"]),
    }
    return Users(ids, cols["gender"], cols["age"], cols["occ"], domains)


def read_item_ids(path: Path, fmt: str) -> np.ndarray:
    """Sorted movie ids; the titles and genres are not features of the protocol."""
    if fmt == "ml-1m":
        t = _read_table(path, "::", 3, "MovieID::Title::Genres")
    else:
        n = 5 + ML100K_GENRE_FLAGS
        t = _read_table(
            path, "|", n, "movie id|title|release date|video release date|IMDb URL|19 genre flags"
        )
    ids = t.ints(0, "movie id")
    _unique_ids(t, ids, "movie")
    return np.sort(ids)


def read_ratings(path: Path, fmt: str) -> tuple[Table, np.ndarray, np.ndarray, np.ndarray]:
    if fmt == "ml-1m":
        t = _read_table(path, "::", 4, "UserID::MovieID::Rating::Timestamp")
    else:
        t = _read_table(path, "\t", 4, "user id<TAB>item id<TAB>rating<TAB>timestamp")
    user = t.ints(0, "user id")
    item = t.ints(1, "movie id")
    rating = t.ints(2, "rating")
    t.check((rating >= 1) & (rating <= 5), "a rating from 1 to 5 in field 3")
    t.ints(3, "timestamp")
    return t, user, item, rating


def lookup(table: Table, keys: np.ndarray, values: np.ndarray, expected: str) -> np.ndarray:
    """Position of each value in the sorted ``keys``; a value not present raises."""
    pos = np.searchsorted(keys, values).clip(max=max(len(keys) - 1, 0))
    table.check(keys[pos] == values, expected)
    return pos


def read_users(path: Path, fmt: str) -> Users:
    """The users file of ``fmt`` (``"ml-1m"`` or ``"ml-100k"``), sorted by id."""
    return (_read_users_ml1m if fmt == "ml-1m" else _read_users_ml100k)(path)


def format_files(root: Path, fmt: str) -> tuple[Path, Path, Path]:
    """(users, ratings, items) files of ``fmt`` under ``root``."""
    if fmt == "ml-1m":
        return root / "users.dat", root / "ratings.dat", root / "movies.dat"
    return root / "u.user", root / "u.data", root / "u.item"
