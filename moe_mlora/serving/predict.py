"""Score a CSV or parquet file of raw ids with a trained model.

``python -m moe_mlora.predict ckpt=<run folder or model.pt> input=<csv|parquet>
output=<csv|parquet> [batch_size=65536]``

The input needs one column per feature field of the model that holds raw
values (``user``, ``item``, and ``gender`` / ``age`` / ``occupation`` when the
model uses them), written as in the training data, plus ``domain`` holding the
domain's name (``F``, ``M``, ``25-34``...). Raw values map to indices through
the vocabularies saved in ``model.pt``; a value never seen in training gets
index 0 (the out-of-vocabulary embedding), is still scored, and is counted in
the summary. An unknown domain is an error: the model has no adapter for it.
The output is the input's columns plus ``score``, the click probability.

Everything is vectorised: ids map with polars (``replace_strict``), rows are
scored in batches of ``batch_size`` under ``torch.inference_mode``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from moe_mlora.cli import fraction, positive_int, run_cli
from moe_mlora.serving import DOMAIN_FIELD, ServedModel, ServingError, load_model, score

DEFAULT_BATCH_SIZE = 65536
DEFAULT_MAX_UNSEEN = 0.5  # a field with more unknown values than this is a wrong column
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SCORE_COLUMN = "score"
PLAIN_INTEGER = r"^-?(0|[1-9][0-9]*)$"
MAX_SHOWN = 10  # unknown domain values named in an error

USAGE = """\
usage: python -m moe_mlora.predict ckpt=PATH input=PATH output=PATH [batch_size=65536]
                                  [max_unseen=0.5]

  ckpt        a run folder (holding model.pt) or a model.pt file
  input       a .csv (with a header row) or .parquet file: one column per raw-id field of
              the model (user, item, ...) and `domain` holding the domain name; a model
              trained with data=table also takes its training column names (data.user_col...)
  output      .csv or .parquet (not the input): the input's columns plus `score`
  batch_size  rows scored per forward pass (default 65536)
  max_unseen  the largest share of a field's values unknown to the model (default 0.5);
              above it the input is refused as a wrong column or id format

Integer ids written as 196.0 or 0196 are read as 196. Unseen ids are scored with the
out-of-vocabulary index 0 and counted in the summary printed on stderr; an unknown domain
is an error.
"""


@dataclass
class PredictReport:
    """What a prediction did: rows, unseen values per field, speed and where it wrote."""

    rows: int
    oov: dict[str, int]
    score_seconds: float  # encoding and scoring, without reading and writing files
    total_seconds: float
    output: Path

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.score_seconds if self.score_seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line for stderr: rows, speed, OOV counts per field, output file."""
        oov = ", ".join(
            f"{name} {count:,} ({100.0 * count / max(self.rows, 1):.1f}%)"
            for name, count in self.oov.items()
        )
        return (
            f"scored {self.rows:,} rows in {self.total_seconds:.2f}s "
            f"({self.rows_per_s:,.0f} rows/s encoding and scoring) · "
            f"unseen values (scored as OOV, index 0): {oov or 'no id fields'} · "
            f"wrote {self.output}"
        )


# ----------------------------------------------------------------------------- files


def _kind(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ServingError(f"{what} {path}: use a .csv or .parquet file, got {suffix or 'no suffix'}")


def read_input(path: str | Path) -> pl.DataFrame:
    """The input table. CSV columns stay text, so ids are matched exactly as written."""
    path = Path(path)
    kind = _kind(path, "input")
    if not path.is_file():
        raise ServingError(f"input {path}: no such file")
    try:
        if kind == "csv":
            return pl.read_csv(path, infer_schema=False)
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise ServingError(
            f"input {path}: cannot read it ({type(error).__name__}: {error})"
        ) from None


def write_output(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` as CSV or parquet (by suffix) atomically: a temp file, then a rename."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if _kind(path, "output") == "csv":
            frame.write_csv(staging)
        else:
            frame.write_parquet(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- encoding


def required_columns(served: ServedModel) -> list[str]:
    """The raw-value feature fields, then ``domain`` (always needed: it picks the adapter)."""
    return [name for name in served.feature_order if name != DOMAIN_FIELD] + [DOMAIN_FIELD]


def training_columns(served: ServedModel) -> dict[str, str]:
    """Field -> the column it was read from in training, where they differ (``data=table``'s
    ``user_col``, ``item_col``, ``domain_col``), so the training file's own header works."""
    data = served.config.get("data") or {}
    columns = {field: data.get(f"{field}_col") for field in ("user", "item", DOMAIN_FIELD)}
    return {field: str(column) for field, column in columns.items() if column and column != field}


def with_field_names(frame: pl.DataFrame, served: ServedModel, path: Path) -> pl.DataFrame:
    """``frame`` with the model's field names as columns (training column names accepted)."""
    aliases = {
        column: field
        for field, column in training_columns(served).items()
        if field not in frame.columns and column in frame.columns
    }
    frame = frame.rename(aliases)
    missing = [c for c in required_columns(served) if c not in frame.columns]
    if missing:
        named = [
            f"{c} (or {training_columns(served)[c]})" if c in training_columns(served) else c
            for c in missing
        ]
        raise ServingError(
            f"input {path}: missing column(s) {named}; the model ({served.model_name}) needs "
            f"{required_columns(served)}, the file has {frame.columns}"
        )
    return frame


def _as_text(values: pl.Series) -> pl.Series:
    """Raw values as stripped text, as the vocabularies hold them (ints print as ``123``)."""
    return values.cast(pl.String).str.strip_chars()


def domain_ids(frame: pl.DataFrame, served: ServedModel, path: Path) -> np.ndarray:
    """Each row's domain id ``0..D-1`` from its name; unknown names are an error naming them."""
    names = _as_text(frame[DOMAIN_FIELD])
    ids = names.replace_strict(
        served.domain_names, list(range(served.num_domains)), default=None, return_dtype=pl.Int64
    )
    unknown = ids.is_null()
    if unknown.any():
        values = names.filter(unknown).fill_null("<empty>").unique(maintain_order=True)
        shown = values.head(MAX_SHOWN).to_list()
        more = f" and {len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else ""
        raise ServingError(
            f"input {path}: unknown domain(s) {shown}{more} in column {DOMAIN_FIELD!r} "
            f"({int(unknown.sum()):,} rows); the model knows the domains {served.domain_names}"
        )
    return ids.to_numpy(writable=True)  # torch.from_numpy wants a writable array


def integer_vocabulary(known: Sequence[str]) -> bool:
    """Whether every value is an integer written plainly (``196``, not ``0196`` or ``196.0``)."""
    return bool(known) and pl.Series(known).str.contains(PLAIN_INTEGER).all()


def as_plain_integers(text: pl.Series) -> pl.Series:
    """``196.0``, ``0196`` and ``1.96e2`` as ``196``; anything that is not a whole number kept."""
    canonical = text.str.contains(PLAIN_INTEGER)  # kept as written: exact beyond 2**53
    numbers = text.cast(pl.Float64, strict=False)
    whole = numbers.is_finite() & (numbers == numbers.round(0))
    plain = numbers.cast(pl.Int64, strict=False).cast(pl.String)
    rewrite = (~canonical & whole & plain.is_not_null()).fill_null(False)
    return pl.select(pl.when(rewrite).then(plain).otherwise(text)).to_series()


def encode_field(values: pl.Series, vocabulary: Sequence[str]) -> tuple[np.ndarray, int]:
    """Indices of raw values through ``vocabulary`` (0 for unseen or empty) and the OOV count.

    Where the training ids were integers, ids written as ``196.0`` (a spreadsheet, a float
    column) or ``0196`` (zero-padded) are the same ids and are read as such.
    """
    known = list(vocabulary[1:])  # index 0 is the OOV token, never a raw value
    text = _as_text(values)
    if integer_vocabulary(known):
        text = as_plain_integers(text)
    codes = text.replace_strict(
        known, list(range(1, len(known) + 1)), default=0, return_dtype=pl.Int64
    )
    array = codes.to_numpy()
    return array, int((array == 0).sum())


def check_unseen(frame: pl.DataFrame, field: str, unseen: int, vocabulary, path, limit) -> None:
    """Most of a field's values unknown is a wrong column or format, not new users: refuse."""
    if frame.height == 0 or unseen / frame.height <= limit:
        return
    examples = _as_text(frame[field]).head(3).to_list()
    known = list(vocabulary[1:4])
    raise ServingError(
        f"input {path}: {100.0 * unseen / frame.height:.0f}% of column {field!r} is unknown to "
        f"the model (values such as {examples}; it knows values such as {known}). Check the "
        f"column, or allow it with max_unseen=1.0 (unseen values are scored as OOV)"
    )


def encode(
    frame: pl.DataFrame, served: ServedModel, path: Path, max_unseen: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``sparse [N, F]``, ``domain [N]`` in the model's field order, and OOV counts per field.

    A field with more than ``max_unseen`` of its values unknown is refused.
    """
    frame = with_field_names(frame, served, path)
    domain = domain_ids(frame, served, path)
    columns, oov = [], {}
    for name in served.feature_order:
        if name == DOMAIN_FIELD:
            columns.append(served.domain_feature_codes()[domain])
        else:
            vocabulary = served.vocabularies[name]
            codes, oov[name] = encode_field(frame[name], vocabulary)
            check_unseen(frame, name, oov[name], vocabulary, path, max_unseen)
            columns.append(codes)
    sparse = np.stack(columns, axis=1) if columns else np.zeros((frame.height, 0), np.int64)
    return torch.from_numpy(sparse), torch.from_numpy(domain), oov


# ----------------------------------------------------------------------------- predict


def check_output(input_path: Path, output_path: Path) -> None:
    """A bad output fails before any work: its kind, the input itself, a folder not creatable."""
    _kind(output_path, "output")
    if output_path.resolve() == input_path.resolve() or (
        output_path.exists() and input_path.exists() and output_path.samefile(input_path)
    ):
        raise ServingError(
            f"output {output_path} is the input file: it would be replaced by the scores; "
            "choose another output path"
        )
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServingError(
            f"output {output_path}: cannot create its folder {output_path.parent} "
            f"({error.strerror or error}); choose a folder you can write to"
        ) from None


def predict(
    ckpt: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_unseen: float = DEFAULT_MAX_UNSEEN,
) -> PredictReport:
    """Score ``input_path`` with the model at ``ckpt``; write the scored rows to ``output_path``.

    ``max_unseen``: the largest share of a field's values that may be unknown to the model
    before the input is refused as a wrong column or id format.
    """
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(input_path, output_path)
    served = load_model(ckpt)
    frame = read_input(input_path)
    scoring = time.perf_counter()
    sparse, domain, oov = encode(frame, served, input_path, max_unseen)
    probabilities = score(served.model, sparse, domain, batch_size)
    score_seconds = time.perf_counter() - scoring
    try:
        write_output(frame.with_columns(pl.Series(SCORE_COLUMN, probabilities)), output_path)
    except OSError as error:
        raise ServingError(f"output {output_path}: cannot write it ({error})") from None
    return PredictReport(
        rows=frame.height,
        oov=oov,
        score_seconds=score_seconds,
        total_seconds=time.perf_counter() - start,
        output=output_path,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 on bad arguments or input)."""

    def run(args: dict[str, str]) -> None:
        batch_size = positive_int(args, "batch_size", DEFAULT_BATCH_SIZE)
        max_unseen = fraction(args, "max_unseen", DEFAULT_MAX_UNSEEN)
        report = predict(args["ckpt"], args["input"], args["output"], batch_size, max_unseen)
        print(f"moe_mlora.predict: {report.summary()}", file=sys.stderr)

    return run_cli(
        "moe_mlora.predict",
        USAGE,
        argv,
        run,
        required=("ckpt", "input", "output"),
        optional=("batch_size", "max_unseen"),
    )


if __name__ == "__main__":
    sys.exit(main())
