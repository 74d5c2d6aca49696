"""``key=value`` command lines (as Hydra's) for the commands that are not Hydra apps.

``run`` takes ``key=value`` overrides; so do the others. predict and export take a handful
of paths, so they parse their arguments here rather than compose a Hydra config. report and
the data generators keep an argparse parser (for ``--help`` and checks) and read
``key=value`` through :func:`key_value_argv` (their older ``--key value`` still works).
Bad input ends with ``<prog>: error: <message>`` and exit status 2, without a
traceback: the message says what to fix, the stack would only hide it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from moe_mlora.data.processed import DataError
from moe_mlora.serving import ServingError

HELP_FLAGS = ("-h", "--help")


KEY = re.compile(r"[a-z][a-z0-9_-]*")


def key_value_argv(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> list[str]:
    """``key=value`` tokens as the parser's ``--key value``; other tokens pass unchanged.

    A token is translated when ``--key`` (``_`` read as ``-``) is an option of the parser or
    of the subcommand named in ``argv``, so positional folders (even ones with ``=`` in their
    names, as sweep jobs have) are left alone. A flag that takes no value reads
    ``key=true`` (given) or ``key=false`` (left out); an option that takes several values
    reads them comma-separated (``models=dcn,wdl``). ``argv`` None: the process's arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options = _options(parser, argv)
    out: list[str] = []
    for token in argv:
        key, sep, value = token.partition("=")
        action = options.get("--" + key.replace("_", "-")) if sep and KEY.fullmatch(key) else None
        if action is None:
            out.append(token)
        elif action.nargs == 0:
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"{parser.prog}: error: {key} takes true or false, got {value!r}")
            out += [action.option_strings[-1]] if value.lower() == "true" else []
        elif action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
            out += [action.option_strings[-1], *(part for part in value.split(",") if part)]
        else:
            out += [action.option_strings[-1], value]
    return out


def _options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, argparse.Action]:
    options = dict(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for token in argv:
                if token in action.choices:
                    options.update(action.choices[token]._option_string_actions)
                    break
    return options


class UsageError(ValueError):
    """A malformed command line: unknown, repeated or missing keys."""


def parse_key_values(
    argv: Sequence[str], required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``, checking the keys against the allowed."""
    allowed = [*required, *optional]
    args: dict[str, str] = {}
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"arguments are key=value, got {token!r}")
        if key not in allowed:
            raise UsageError(f"unknown key {key!r}; the keys are {', '.join(allowed)}")
        if key in args:
            raise UsageError(f"{key} is given twice")
        args[key] = value
    missing = [key for key in required if not args.get(key)]
    if missing:
        raise UsageError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    return args


def positive_int(args: dict[str, str], key: str, default: int) -> int:
    """``args[key]`` as an integer >= 1, else ``default`` when absent."""
    if key not in args:
        return default
    try:
        value = int(args[key])
    except ValueError:
        raise UsageError(f"{key} must be an integer, got {args[key]!r}") from None
    if value < 1:
        raise UsageError(f"{key} must be >= 1, got {value}")
    return value


def fraction(args: dict[str, str], key: str, default: float) -> float:
    """``args[key]`` as a number from 0 to 1, else ``default`` when absent."""
    if key not in args:
        return default
    try:
        value = float(args[key])
    except ValueError:
        raise UsageError(f"{key} must be a number from 0 to 1, got {args[key]!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{key} must be from 0 to 1, got {value}")
    return value


def run_cli(
    prog: str,
    usage: str,
    argv: Sequence[str] | None,
    run: Callable[[dict[str, str]], None],
    required: Sequence[str],
    optional: Sequence[str] = (),
) -> int:
    """Parse ``argv``, call ``run`` and turn expected errors into a message and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token in HELP_FLAGS for token in argv):
        print(usage, end="")
        return 0
    try:
        run(parse_key_values(argv, required, optional))
    except UsageError as error:
        print(usage, end="", file=sys.stderr)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except (ServingError, DataError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written: name it, no traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prog}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    return 0
