"""``moe-mlora COMMAND [ARGS]``: one console command for every entry point.

``moe-mlora run ...`` is ``python -m moe_mlora.run ...`` (Hydra overrides, ``-m`` sweeps,
``--help``), and likewise ``predict``, ``export``, ``report``, ``generate`` and ``bench``.
Tab completion of ``run``'s overrides is Hydra's: ``eval "$(moe-mlora run -sc install=bash)"``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Sequence

PROGRAM = "moe-mlora"
COMMANDS = {
    "run": ("moe_mlora.run", "train and test one config; -m sweeps (Hydra overrides)"),
    "predict": ("moe_mlora.serving.predict", "score a CSV or parquet file with a trained model"),
    "export": ("moe_mlora.serving.export", "export a trained model (TorchScript or ONNX)"),
    "report": ("moe_mlora.reporting.report", "tables and plots of run and sweep folders"),
    "generate": ("moe_mlora.data.generate", "write stand-in data in the real file formats"),
    "bench": ("moe_mlora.bench.__main__", "benchmarks (core, parity, taobao, gpu, ...)"),
}
COMPLETION_FLAGS = ("-sc", "--shell-completion")


def usage() -> str:
    lines = [f"usage: {PROGRAM} COMMAND [ARGS]   ({PROGRAM} COMMAND --help for its arguments)", ""]
    lines += [f"  {name:<10}{about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", f'tab completion of run\'s overrides: eval "$({PROGRAM} run -sc install=bash)"']
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's own entry point; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMPLETION_FLAGS:  # the shell asks while completing `run`
        return run_command(args, completing=True)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(
            f"{PROGRAM}: error: unknown command {command!r}; {hint}the commands are "
            f"{', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    if command == "run":
        return run_command(rest)
    module = importlib.import_module(COMMANDS[command][0])
    status = module.main(rest)
    return int(status or 0)


def run_command(args: list[str], completing: bool = False) -> int:
    """Hydra's ``run``: it reads ``sys.argv``, so the subcommand word is taken out of it."""
    from moe_mlora.config import check_conf_dir
    from moe_mlora.precheck import precheck
    from moe_mlora.run import main as hydra_main

    check_conf_dir()
    if completing:  # the line being completed reads `moe-mlora run key=...`: drop `run`
        line = os.environ.get("COMP_LINE", "")
        program, _, after = line.partition(" ")
        if after.lstrip().startswith("run"):
            os.environ["COMP_LINE"] = f"{program} {after.lstrip()[3:].lstrip()}"
    else:
        precheck(args)
    sys.argv = [sys.argv[0], *args]
    hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
