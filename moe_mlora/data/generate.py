"""Command line: write synthetic stand-ins for datasets we may not redistribute.

    python -m moe_mlora.data.generate movielens format=ml-1m out=data/ml-1m-synth
    python -m moe_mlora.data.generate taobao out=data/cloudtheme clicks=1000000

Each source is one subcommand; to add one, write an ``_add_<source>(subparsers)``
function that registers its parser with ``set_defaults(run=...)`` and list it in
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from moe_mlora.cli import key_value_argv
from moe_mlora.data.synthetic_movielens import FORMATS, generate_movielens
from moe_mlora.data.synthetic_taobao import generate_taobao

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _run_movielens(args: argparse.Namespace) -> str:
    out = generate_movielens(
        args.out,
        fmt=args.format,
        n_users=args.users,
        n_items=args.items,
        n_ratings=args.ratings,
        seed=args.seed,
    )
    return (
        f"wrote synthetic {args.format} data ({args.users} users, {args.items} items, "
        f"{args.ratings} ratings, seed {args.seed}) to {out}"
    )


def _add_movielens(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "movielens",
        help="MovieLens ML-1M / ML-100K files with planted domain structure",
        description=(
            "Write MovieLens-format files (Latin-1, real layouts and separators) whose "
            "ratings depend on user x item and on gender, age group and occupation, so "
            "multi-domain methods have something to learn. Train on them with: "
            "python -m moe_mlora.run data=movielens_age data.root=OUT"
        ),
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--format", choices=FORMATS, default="ml-1m", help="file layout")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="output folder (created if missing; never overwrites non-synthetic data)",
    )
    parser.add_argument("--users", type=int, default=1000, help="number of users")
    parser.add_argument("--items", type=int, default=800, help="number of movies")
    parser.add_argument("--ratings", type=int, default=50_000, help="number of ratings")
    parser.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    parser.set_defaults(run=_run_movielens)


def _run_taobao(args: argparse.Namespace) -> str:
    out = generate_taobao(
        args.out,
        n_themes=args.themes,
        n_users=args.users,
        n_items=args.items,
        n_clicks=args.clicks,
        seed=args.seed,
        dim=args.dim,
        heterogeneity=args.heterogeneity,
        noise=args.noise,
        missing_vectors=args.missing_vectors,
    )
    return (
        f"wrote synthetic Taobao CloudTheme data ({args.themes} themes, {args.users} users, "
        f"{args.items} items, {args.clicks} clicks, heterogeneity {args.heterogeneity}, "
        f"seed {args.seed}) to {out}"
    )


def _add_taobao(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "taobao",
        help="Taobao CloudTheme files (Tianchi 9716) with planted theme heterogeneity",
        description=(
            "Write the five CloudTheme files (theme_click_log.csv, user_embedding.csv, "
            "item_embedding.csv, theme_item_pool.csv, user_item_purchase_log.csv) in the real "
            "format, streamed in chunks (bounded memory at any size). Clicks depend on "
            "user x item x theme; see moe_mlora/data/synthetic_taobao.py. Train on them with: "
            "python -m moe_mlora.run data=taobao20 data.root=OUT"
        ),
        formatter_class=_FORMATTER,
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="output folder (created if missing; never overwrites other data)",
    )
    parser.add_argument("--themes", type=int, default=30, help="number of themes (domains)")
    parser.add_argument("--users", type=int, default=20_000, help="number of users")
    parser.add_argument("--items", type=int, default=8_000, help="number of items")
    parser.add_argument("--clicks", type=int, default=1_000_000, help="rows of the click log")
    parser.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    parser.add_argument("--dim", type=int, default=128, help="pretrained vector width")
    parser.add_argument(
        "--heterogeneity",
        type=float,
        default=0.5,
        help="0..1: how differently themes map user tastes to clicks (0: all alike)",
    )
    parser.add_argument(
        "--noise", type=float, default=0.5, help="noise std of the pretrained vectors"
    )
    parser.add_argument(
        "--missing-vectors",
        type=float,
        default=0.02,
        help="share of users and items written without a vector",
    )
    parser.set_defaults(run=_run_taobao)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_movielens,
    _add_taobao,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.data.generate",
        description=(
            "Generate synthetic datasets in the exact raw formats the loaders read, for "
            "tests, demos and benchmarks when the real data is unavailable. Options are "
            "given as key=value (out=DIR clicks=100000), like every moe_mlora command, or "
            "as --key value."
        ),
    )
    subparsers = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (bad sizes or a clashing folder exit with 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(key_value_argv(parser, argv))
    try:
        message = args.run(args)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
