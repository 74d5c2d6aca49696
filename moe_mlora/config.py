"""Hydra config helpers: where the configs live, resolvers, and composing outside Hydra's main."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# An installed wheel carries the configs as moe_mlora/conf/; a source checkout (an editable
# install) has them at the top of the repository.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = (
    _PACKAGED_CONF
    if (_PACKAGED_CONF / "config.yaml").is_file()
    else Path(__file__).resolve().parent.parent / "conf"
)
RUN_SUFFIX = f"{os.getpid():x}{secrets.token_hex(2)}"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def interactive() -> bool:
    """Progress bars only where a person watches: a terminal, and not CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def first_set(*values):
    """The first value that is not null: ``${first_set:${resume},outputs/...}``."""
    return next((value for value in values if value is not None), None)


# lora_reduce of the authors' configs, per dataset family and backbone (rank = out // it).
REFERENCE_LORA_REDUCE = {
    "taobao": {"wdl": 16, "nfm": 16, "autoint": 16, "pnn": 16, "dcn": 16, "xdeepfm": 16,
               "deepfm": 256, "fibinet": 256},
    "movielens": {"wdl": 16, "pnn": 16, "dcn": 16, "deepfm": 32, "fibinet": 32, "xdeepfm": 32,
                  "nfm": 4, "autoint": 4},
}  # fmt: skip
DEFAULT_LORA_REDUCE = 32


def reference_lora_reduce(model: str, source: str) -> int:
    """``${reference_lora_reduce:${model.name},${data.source}}``: the authors' value, else 32.

    Generated MovieLens-format data counts as MovieLens; a backbone or source the authors did
    not run (mlp, your own table) gets the project's default.
    """
    family = "movielens" if "movielens" in source else source
    return REFERENCE_LORA_REDUCE.get(family, {}).get(model, DEFAULT_LORA_REDUCE)


def reference_embedding_dim(source: str) -> int:
    """The authors' embedding width: 128 on Taobao (the pretrained vectors'), else 8."""
    return 128 if source == "taobao" else 8


def reference_project_pretrained(source: str) -> bool:
    """False on Taobao: the authors feed the pretrained vectors as they are."""
    return source != "taobao"


def register_resolvers() -> None:
    """``${interactive:}``, ``${run_suffix:}``, ``${first_set:...}``, ``${job_dirname:...}``,
    ``${reference_lora_reduce:MODEL,SOURCE}``.

    Safe to call twice.
    """
    from moe_mlora.sweep import job_dirname

    if not OmegaConf.has_resolver("first_set"):
        OmegaConf.register_new_resolver("first_set", first_set)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)
    if not OmegaConf.has_resolver("interactive"):
        OmegaConf.register_new_resolver("interactive", interactive)
    for name, function in (
        ("reference_lora_reduce", reference_lora_reduce),
        ("reference_embedding_dim", reference_embedding_dim),
        ("reference_project_pretrained", reference_project_pretrained),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: RUN_SUFFIX)


def check_conf_dir() -> None:
    if not (CONF_DIR / "config.yaml").exists():
        raise SystemExit(
            f"moe_mlora: config folder {CONF_DIR} not found. Install the project with pip "
            "(pip install . or pip install -e . from its repository), which brings conf/ along."
        )


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The run config as ``python -m moe_mlora.run OVERRIDES`` would see it (for tests, bench)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=False)
