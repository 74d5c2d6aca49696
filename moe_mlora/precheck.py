"""Check a ``run`` command line before Hydra starts: mistyped keys, bad values, every sweep job.

Hydra answers a mistyped key (``trainer.max_epoch=5``) by suggesting ``+trainer.max_epoch``,
which leads into a Lightning traceback, and a sweep with a bad value launches every job to
fail one by one. :func:`precheck` composes the command line's config the way Hydra will,
once per distinct value of every swept key (a recipe's ``hydra.sweeper.params`` included),
and runs :func:`moe_mlora.checks.check_run_config` on each. A problem ends the command with
one line, ``moe_mlora: error: ...`` naming the key and a fix, and exit status 2, before
any job starts. What it cannot judge (override syntax, Hydra's own flags) is left to Hydra.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from moe_mlora.config import CONF_DIR, ConfigError, register_resolvers
from moe_mlora.data.processed import DataError

MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_COMPOSES = 64  # a sweep's jobs checked at most (one per swept value, others at their first)


def precheck(argv: Sequence[str]) -> None:
    """Exit with status 2 and one line if the command line cannot work; return otherwise."""
    problem = find_problem(list(argv))
    if problem:
        print(f"moe_mlora: error: {problem}", file=sys.stderr)
        sys.exit(2)


def sweep_safe_argv(argv: Sequence[str]) -> list[str]:
    """``-m data=a,b data.root=DIR`` made to work: such keys are passed as ``++data.root=DIR``.

    Hydra composes a sweep's own config from the command line *without* its swept values,
    so there ``data`` is the default (synthetic) config, which has no ``root``, and the
    sweep fails ("Key 'root' is not in struct") although every job's data config has the
    key. A plain ``key=value`` whose key exists in every job but not in that config is
    given Hydra's ``++`` (set, or add if absent): in the jobs it is the same override. Other
    command lines are returned unchanged.
    """
    argv = list(argv)
    if not any(token in MULTIRUN_FLAGS for token in argv):
        return argv
    tokens = [token for token in argv if token not in MULTIRUN_FLAGS]
    try:
        fixed, swept = split_sweeps(tokens)
    except Exception:  # a syntax error: Hydra's message says where
        return argv
    groups = [key for key in swept if "." not in key]
    plain = [
        token
        for token in fixed
        if not token.startswith(("+", "~")) and token.split("=", 1)[0].split(".")[0] in groups
    ]
    if not plain:
        return argv
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        others = [token for token in fixed if token not in plain]
        try:
            sweep_cfg = compose("config", overrides=others)
        except Exception:  # check_job reports it
            return argv
    nowhere = object()
    absent = {
        t
        for t in plain
        if OmegaConf.select(sweep_cfg, t.split("=", 1)[0], default=nowhere) is nowhere
    }
    return [f"++{token}" if token in absent else token for token in argv]


def find_problem(argv: list[str]) -> str | None:
    """The first problem of the command line's config (every job of a sweep), or None."""
    if any(token.startswith("-") and token not in MULTIRUN_FLAGS for token in argv):
        return None  # --help, --cfg, --info, -cn ...: Hydra's own business
    multirun = any(token in MULTIRUN_FLAGS for token in argv)
    tokens = [token for token in argv if token not in MULTIRUN_FLAGS]
    try:
        fixed, swept = split_sweeps(tokens)
    except Exception:  # a syntax error: Hydra's message says where
        return None
    if swept and not multirun:
        return None  # Hydra refuses sweep syntax without -m itself
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for job in jobs(fixed, swept, compose):
            problem = check_job(job, multirun, compose, describe=bool(swept) or multirun)
            if problem:
                return problem
    return None


def split_sweeps(tokens: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The plain overrides as typed, and each swept key's values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(tokens)
    fixed, swept = [], {}
    for token, override in zip(tokens, parsed, strict=True):
        if override.is_sweep_override():
            swept[override.get_key_element()] = list(override.sweep_string_iterator())
        else:
            fixed.append(token)
    return fixed, swept


def jobs(fixed: list[str], swept: dict[str, list[str]], compose) -> Iterator[list[str]]:
    """Override lists to check: the first job, then each swept value with the others first.

    A recipe's grid (``hydra.sweeper.params``) joins the command line's sweeps; the
    command line wins for a key in both, as in Hydra's sweeper.
    """
    first = [*fixed, *(f"{key}={values[0]}" for key, values in swept.items())]
    try:
        params = compose("config", overrides=first, return_hydra_config=True).hydra.sweeper.params
    except Exception:  # check_job reports the composition error
        params = None
    grid = {key: str(value).split(",") for key, value in (params or {}).items()}
    grid.update(swept)
    seen: set[tuple[str, ...]] = set()
    firsts = {key: values[0] for key, values in grid.items()}
    candidates = [firsts] + [
        {**firsts, key: value} for key, values in grid.items() for value in values[1:]
    ]
    for choice in candidates[:MAX_COMPOSES]:
        job = [*fixed, *(f"{key}={value}" for key, value in choice.items())]
        if tuple(job) not in seen:
            seen.add(tuple(job))
            yield job


def check_job(job: list[str], multirun: bool, compose, describe: bool) -> str | None:
    """One job's problem, or None."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from moe_mlora.checks import check_run_config
    from moe_mlora.pipeline.build import schedule_spec

    try:
        cfg = compose("config", overrides=job, return_hydra_config=True)
    except MissingConfigException as error:
        return missing_option(error)
    except ConfigCompositionException as error:
        return unknown_key(error, job, compose)
    except Exception:  # anything else: the run reports it as it always has
        return None
    hydra_cfg = cfg.hydra
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    run_cfg = OmegaConf.create(with_hydra)
    OmegaConf.set_struct(run_cfg, True)
    try:
        check_run_config(run_cfg, hydra_cfg, multirun)
        schedule_spec(run_cfg)
    except (ConfigError, DataError) as error:
        where = f" (in the sweep's job {' '.join(job)})" if describe else ""
        return f"{error}{where}"
    except Exception:  # an interpolation only a real run can resolve
        return None
    return None


def missing_option(error) -> str:
    """``model=deepfmm``: no such option; the closest ones and every option of the group."""
    missing = str(getattr(error, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    options = list(getattr(error, "options", None) or [])
    if not group or not options:
        return str(error).splitlines()[0]
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={option}: no such option; {hint}the options are {', '.join(options)}"


def unknown_key(error, job: list[str], compose) -> str:
    """``trainer.max_epoch=5``: not a key; the closest existing key, never ``+key``."""
    found = re.search(r"override '([^']+)'", str(error))
    if not found:
        return str(error).splitlines()[0]
    key = found.group(1)
    rest = [token for token in job if not token.lstrip("+~").startswith(f"{key}=")]
    try:
        cfg = compose("config", overrides=rest)
    except Exception:
        return f"{key} is not a config key (python -m moe_mlora.run --help lists them)"
    suggestion, keys = closest_key(cfg, key)
    if suggestion:
        return f"{key} is not a config key; did you mean {suggestion}?"
    shown = ", ".join(keys[:20])
    return f"{key} is not a config key; the keys there are: {shown}"


def closest_key(cfg: DictConfig, dotted: str) -> tuple[str | None, list[str]]:
    """The existing key nearest to ``dotted`` (first wrong part replaced), and its siblings."""
    node, path = cfg, []
    for part in dotted.split("."):
        if isinstance(node, DictConfig) and part in node:
            path.append(part)
            node = node[part]
            continue
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
        prefix = ".".join(path)
        siblings = [f"{prefix}.{k}" if prefix else k for k in keys]
        if not close:
            return None, siblings
        rest = dotted.split(".")[len(path) + 1 :]
        whole = ".".join([*path, close[0], *rest])
        if OmegaConf.select(cfg, whole, default=None) is not None:
            return whole, siblings
        return ".".join([*path, close[0]]), siblings
    return None, []
