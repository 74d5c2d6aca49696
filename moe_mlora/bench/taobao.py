"""Taobao benchmarks: ``python -m moe_mlora.bench taobao {prep,grid} [options]``.

``prep``: generate a CloudTheme-format log once (cached under
``<cache>/bench``), then time the Taobao-N preprocessing (read, filter,
negatives, split, cache write) from scratch in a child process, and the
cache-hit load in another, reporting wall time and the child's peak resident
memory (``ru_maxrss``: polars allocates outside Python, so tracemalloc would
miss most of it). Targets for 10M clicks: under 60 s and 4 GB on 2 cores.

``grid``: DeepFM on Taobao-10/20/30 of one generated log, base / MLoRA /
MoE-MLoRA with E = N and 2N experts, over seeds: test WAUC mean and std per
(dataset, method), and training throughput per phase on Taobao-20, written as
a markdown table (``experiments/taobao.md``).

Sizes. The default grid log has 100k clicks (6k users, 3k items, 30
themes), about 0.3M samples for Taobao-30. Measured on the shared (busy)
2-core VM at 300k clicks / Taobao-20 (~1M samples): base ~20 s per epoch
(30k samples/s), MoE-MLoRA E=20 3 epochs per phase 200 s. With early stopping
(at most ``--max-epochs`` 10 per phase) a (dataset, seed) cell of the four
configurations then takes about 30 min at 300k clicks, so 36 runs would take
hours even on an idle machine; at 100k clicks the whole grid is estimated at
about 45-60 minutes idle (about twice that on a busy machine). Pass
``--clicks 1000000 --users 20000 --items 8000`` for the paper-sized variant
(roughly 10x the default's time).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_mlora.cli import key_value_argv
from moe_mlora.data.cache import default_cache_dir

REPO = Path(__file__).resolve().parents[2]
METHODS = ("base", "mlora", "moe_mlora:N", "moe_mlora:2N")


# ----------------------------------------------------------------------------- data


def bench_root(cache: Path, clicks: int, users: int, items: int, themes: int, seed: int) -> Path:
    """The generated log for these sizes, made once under ``cache`` (timed when made)."""
    from moe_mlora.data.taobao_source import resolve_root

    params = {"themes": themes, "users": users, "items": items, "clicks": clicks, "seed": seed}
    start = time.perf_counter()
    root = resolve_root(None, True, params, cache)
    ready = time.perf_counter() - start
    print(f"raw files: {root} ({_size_mb(root):,.0f} MB; ready in {ready:.1f} s)")
    return root


def _size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file()) / 2**20


def _child(args: list[str]) -> dict:
    """Run this module's hidden ``_prep`` command in a fresh process; return its JSON line."""
    command = [sys.executable, "-m", "moe_mlora.bench.taobao", "_prep", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"preprocessing child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prep_child(argv: list[str]) -> None:
    """Time ``prepare_taobao`` in this process; print wall time, peak RSS and sizes as JSON."""
    from moe_mlora.data.taobao import prepare_taobao

    root, themes, cache = argv[0], int(argv[1]), Path(argv[2])
    start = time.perf_counter()
    data = prepare_taobao(root, themes, cache_dir=cache, progress=False)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    samples = sum(len(s) for s in data.splits.values())
    print(json.dumps({"wall_s": wall, "peak_mb": peak_kb / 1024, "samples": samples}))


def prep(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_mlora.bench taobao prep")
    parser.add_argument("--clicks", type=int, default=10_000_000, help="clicks to generate")
    parser.add_argument("--users", type=int, default=None, help="default: clicks / 20")
    parser.add_argument("--items", type=int, default=None, help="default: clicks / 50")
    parser.add_argument("--themes", type=int, default=30, help="Taobao-N to build (and generate)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the cache folder")
    args = parser.parse_args(key_value_argv(parser, argv))
    cache = (args.cache_dir or default_cache_dir()) / "bench"
    users = args.users or max(100, args.clicks // 20)
    items = args.items or max(100, args.clicks // 50)
    root = bench_root(cache, args.clicks, users, items, args.themes, args.seed)
    with tempfile.TemporaryDirectory(dir=cache) as fresh:  # an empty processed cache
        build = _child([str(root), str(args.themes), fresh])
        hit = _child([str(root), str(args.themes), fresh])
    rate = args.clicks / build["wall_s"]
    print(
        f"Taobao-{args.themes} from {args.clicks:,} clicks ({users:,} users, {items:,} items): "
        f"{build['samples']:,} samples\n"
        f"  preprocess + cache write: {build['wall_s']:.1f} s ({rate:,.0f} clicks/s), "
        f"peak RSS {build['peak_mb']:,.0f} MB\n"
        f"  cache hit (load):         {hit['wall_s']:.1f} s, peak RSS {hit['peak_mb']:,.0f} MB\n"
        f"  targets: < 60 s {'ok' if build['wall_s'] < 60 else 'MISSED'}, "
        f"< 4 GB {'ok' if build['peak_mb'] < 4096 else 'MISSED'}"
    )


# ----------------------------------------------------------------------------- grid


def _overrides(method: str, themes: int) -> tuple[list[str], str]:
    if method.startswith("moe_mlora"):
        experts = themes * (2 if method.endswith("2N") else 1)
        overrides = ["method=moe_mlora", "method/schedule=paper", f"experts={experts}"]
        return overrides, f"moe_mlora E={experts}"  # the paper's phases, as taobao.md reports
    return [f"method={method}"], method


def _one_run(root: Path, cache: Path, out: Path, themes: int, method: str, seed: int, args):
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    extra, label = _overrides(method, themes)
    cfg = compose(
        [
            f"data=taobao{themes}",
            f"data.root={root}",
            f"model={args.model}",
            *extra,
            f"seed={seed}",
            f"trainer.max_epochs={args.max_epochs}",
            f"threads={args.threads}",
            "logger.wandb.enabled=false",
            "progress=false",
            f"paths.cache_dir={cache}",
        ]
    )
    results = train_and_evaluate(cfg, out / f"taobao{themes}-{method.replace(':', '')}-s{seed}")
    phases = {p["kind"]: p["train_samples_per_s"] for p in results["phases"]}
    return {
        "themes": themes,
        "method": label,
        "seed": seed,
        "wauc": results["test"]["wauc"],
        "wall_s": results["wall_time_s"],
        "samples_per_s": phases,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def grid_markdown(runs: list[dict], args, data_note: str) -> str:
    """WAUC per (dataset, method) and Taobao-20 throughput per phase, as markdown."""
    themes = sorted({r["themes"] for r in runs})
    lines = [
        "# Taobao: base vs MLoRA vs MoE-MLoRA (generated CloudTheme data)",
        "",
        f"`python -m moe_mlora.bench taobao grid {' '.join(args.argv)}`".rstrip(),
        "",
        data_note,
        "",
        "## Test WAUC (mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ")",
        "",
        "| method | " + " | ".join(f"Taobao-{n}" for n in themes) + " |",
        "|---|" + "---|" * len(themes),
    ]
    for label in _labels(runs):
        cells = []
        for n in themes:
            values = [r["wauc"] for r in runs if r["themes"] == n and _generic(r) == label]
            cells.append(_mean_std(values) if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Training throughput on Taobao-20 (samples/s, mean over seeds)", ""]
    lines += ["| method | phase | samples/s | wall time per run (s) |", "|---|---|---|---|"]
    for label in _labels(runs):
        rows = [r for r in runs if r["themes"] == 20 and _generic(r) == label]
        if not rows:
            continue
        wall = statistics.mean(r["wall_s"] for r in rows)
        for phase in rows[0]["samples_per_s"]:
            speed = statistics.mean(r["samples_per_s"][phase] for r in rows)
            lines.append(f"| {label} | {phase} | {speed:,.0f} | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def _generic(run: dict) -> str:
    """``moe_mlora E=2N`` style labels, the same across datasets."""
    if run["method"].startswith("moe_mlora"):
        experts = int(run["method"].split("=")[1])
        return "moe_mlora E=N" if experts == run["themes"] else "moe_mlora E=2N"
    return run["method"]


def _labels(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(_generic(r) for r in runs))


def grid(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_mlora.bench taobao grid")
    parser.add_argument("--clicks", type=int, default=100_000, help="clicks to generate")
    parser.add_argument("--users", type=int, default=6_000, help="users to generate")
    parser.add_argument("--items", type=int, default=3_000, help="items to generate")
    parser.add_argument("--generator-seed", type=int, default=7, help="generator seed")
    parser.add_argument(
        "--themes", type=int, nargs="+", default=[10, 20, 30], help="the N of each Taobao-N"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="moe_mlora:N has one expert per theme, moe_mlora:2N two",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="run seeds")
    parser.add_argument("--model", default="deepfm", help="backbone")
    parser.add_argument("--max-epochs", type=int, default=10, help="per phase (early stopping)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the cache folder")
    parser.add_argument(
        "--out", type=Path, default=REPO / "experiments" / "taobao.md", help="markdown table"
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: temp)")
    args = parser.parse_args(key_value_argv(parser, argv))
    args.argv = argv
    cache = (args.cache_dir or default_cache_dir()) / "bench"
    generated = max(args.themes)
    root = bench_root(cache, args.clicks, args.users, args.items, generated, args.generator_seed)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.runs_dir or Path(scratch)
        for themes in args.themes:
            for method in args.methods:
                for seed in args.seeds:
                    run = _one_run(root, cache, out, themes, method, seed, args)
                    print(
                        f"Taobao-{themes} {run['method']:<16} seed {seed}: WAUC {run['wauc']:.4f}"
                        f" ({run['wall_s']:.0f} s)",
                        flush=True,
                    )
                    runs.append(run)
    note = (
        f"Data: `python -m moe_mlora.data.generate taobao themes={generated} clicks="
        f"{args.clicks} users={args.users} items={args.items} seed="
        f"{args.generator_seed}` (heterogeneity 0.5). Model {args.model}, at most "
        f"{args.max_epochs} epochs per phase, {args.threads} threads."
    )
    text = grid_markdown(runs, args, note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written: {args.out}")


def main(argv: list[str]) -> None:
    commands = {"prep": prep, "grid": grid, "_prep": _prep_child}
    if not argv or argv[0] not in commands:
        raise SystemExit("usage: python -m moe_mlora.bench taobao {prep,grid} [options] (--help)")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
