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

from moe_mlora.cli import positive_int, run_cli
from moe_mlora.serving import DOMAIN_FIELD, ServedModel, ServingError, load_model, score

DEFAULT_BATCH_SIZE = 65536
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SCORE_COLUMN = "score"
MAX_SHOWN = 10  # unknown domain values named in an error

USAGE = """\
usage: python -m moe_mlora.predict ckpt=PATH input=PATH output=PATH [batch_size=65536]

  ckpt        a run folder (holding model.pt) or a model.pt file
  input       a .csv (with a header row) or .parquet file: one column per raw-id field of
              the model (user, item, ...) and `domain` holding the domain name
  output      .csv or .parquet: the input's columns plus `score` (click probability)
  batch_size  rows scored per forward pass (default 65536)

Unseen ids are scored with the out-of-vocabulary index 0 and counted in the summary
printed on stderr; an unknown domain is an error.
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


def check_columns(frame: pl.DataFrame, served: ServedModel, path: Path) -> None:
    missing = [c for c in required_columns(served) if c not in frame.columns]
    if missing:
        raise ServingError(
            f"input {path}: missing column(s) {missing}; the model ({served.model_name}) needs "
            f"{required_columns(served)}, the file has {frame.columns}"
        )


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


def encode_field(values: pl.Series, vocabulary: Sequence[str]) -> tuple[np.ndarray, int]:
    """Indices of raw values through ``vocabulary`` (0 for unseen or empty) and the OOV count."""
    known = list(vocabulary[1:])  # index 0 is the OOV token, never a raw value
    codes = _as_text(values).replace_strict(
        known, list(range(1, len(known) + 1)), default=0, return_dtype=pl.Int64
    )
    array = codes.to_numpy()
    return array, int((array == 0).sum())


def encode(
    frame: pl.DataFrame, served: ServedModel, path: Path
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``sparse [N, F]``, ``domain [N]`` in the model's field order, and OOV counts per field."""
    check_columns(frame, served, path)
    domain = domain_ids(frame, served, path)
    columns, oov = [], {}
    for name in served.feature_order:
        if name == DOMAIN_FIELD:
            columns.append(served.domain_feature_codes()[domain])
        else:
            codes, oov[name] = encode_field(frame[name], served.vocabularies[name])
            columns.append(codes)
    sparse = np.stack(columns, axis=1) if columns else np.zeros((frame.height, 0), np.int64)
    return torch.from_numpy(sparse), torch.from_numpy(domain), oov


# ----------------------------------------------------------------------------- predict


def predict(
    ckpt: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PredictReport:
    """Score ``input_path`` with the model at ``ckpt``; write the scored rows to ``output_path``."""
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    _kind(output_path, "output")  # a bad output name fails before any work
    served = load_model(ckpt)
    frame = read_input(input_path)
    scoring = time.perf_counter()
    sparse, domain, oov = encode(frame, served, input_path)
    probabilities = score(served.model, sparse, domain, batch_size)
    score_seconds = time.perf_counter() - scoring
    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_output(frame.with_columns(pl.Series(SCORE_COLUMN, probabilities)), output_path)
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
        report = predict(args["ckpt"], args["input"], args["output"], batch_size)
        print(f"moe_mlora.predict: {report.summary()}", file=sys.stderr)

    return run_cli(
        "moe_mlora.predict",
        USAGE,
        argv,
        run,
        required=("ckpt", "input", "output"),
        optional=("batch_size",),
    )


if __name__ == "__main__":
    sys.exit(main())
