"""Scoring speed of ``python -m moe_mlora.predict`` on generated rows.

``python -m moe_mlora.bench predict [--ckpt RUN_OR_MODEL_PT] [--rows 1000000]``

Without ``--ckpt`` it first trains DeepFM MoE-MLoRA for one epoch per phase on generated
MovieLens-format data (a minute). It then writes ``--rows`` rows of raw ids drawn from the
model's vocabularies (with ``--unseen`` of them replaced by ids never seen in training) to a
parquet file and a CSV file, scores each through :func:`moe_mlora.serving.predict.predict`,
and prints rows/second for encoding + scoring and for the whole command (read, score, write).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from moe_mlora.cli import key_value_argv
from moe_mlora.serving import DOMAIN_FIELD, load_model
from moe_mlora.serving.predict import predict


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_mlora.bench predict")
    parser.add_argument("--ckpt", help="a run folder or model.pt (default: train one first)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--unseen", type=float, default=0.01, help="share of unseen user ids")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser.parse_args(key_value_argv(parser, argv))


def train_small_model(folder: Path) -> Path:
    """DeepFM MoE-MLoRA on generated MovieLens-format data, one epoch per phase."""
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    overrides = [
        "trainer.max_epochs=1",
        "logger.wandb.enabled=false",
        "progress=false",
        f"paths.cache_dir={folder / 'cache'}",
    ]
    train_and_evaluate(compose(overrides), folder / "run")
    return folder / "run"


def generated_rows(ckpt: Path, rows: int, unseen: float, seed: int = 0) -> pl.DataFrame:
    """Raw-id rows drawn from the model's vocabularies; ``unseen`` of the users are new ids."""
    served = load_model(ckpt)
    rng = np.random.default_rng(seed)
    columns = {}
    for name in served.feature_order:
        if name == DOMAIN_FIELD:
            continue
        known = np.asarray(served.vocabularies[name][1:])  # index 0 is OOV
        columns[name] = known[rng.integers(0, len(known), rows)]
    new_users = rng.random(rows) < unseen
    if "user" in columns:
        columns["user"] = np.where(new_users, "never-seen-user", columns["user"])
    names = np.asarray(served.domain_names)
    columns[DOMAIN_FIELD] = names[rng.integers(0, len(names), rows)]
    return pl.DataFrame(columns)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        ckpt = Path(args.ckpt) if args.ckpt else train_small_model(scratch)
        frame = generated_rows(ckpt, args.rows, args.unseen)
        print(f"model {ckpt} · {args.rows:,} rows · torch threads {torch.get_num_threads()}")
        print(f"{'input':<9}{'score rows/s':>14}{'command rows/s':>16}{'unseen users':>14}")
        for suffix in ("parquet", "csv"):
            source = scratch / f"rows.{suffix}"
            frame.write_parquet(source) if suffix == "parquet" else frame.write_csv(source)
            report = predict(ckpt, source, scratch / f"scored.{suffix}")
            print(
                f"{suffix:<9}{report.rows_per_s:>14,.0f}"
                f"{report.rows / report.total_seconds:>16,.0f}{report.oov.get('user', 0):>14,}"
            )
