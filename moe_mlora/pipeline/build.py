"""Config to objects: the checked schedule, the adapter, the model and its LightningModule."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import torch
from omegaconf import DictConfig, OmegaConf

from moe_mlora.checks import check_memory
from moe_mlora.config import ConfigError
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.models.layers import set_dropout_mask
from moe_mlora.training.module import CTRModule
from moe_mlora.training.schedules import ScheduleError, ScheduleSpec

log = logging.getLogger("moe_mlora")


def quiet_lightning() -> None:
    """Lightning's per-Trainer banners (GPU available..., LOCAL_RANK...) x 4 phases are noise."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # Under DDP: validation and test values come from metrics synced across the processes
    # (DomainAUC, the gathered per-expert rows), identical on every rank: no sync_dist needed.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")


# Keys of method.adapter that moved into its gate block: old name -> new name.
RENAMED_ADAPTER_KEYS = {"gate_input": "gate.input", "gate_embedding_dim": "gate.embedding_dim"}


def schedule_spec(cfg: DictConfig) -> ScheduleSpec:
    """``method.schedule`` (a ``conf/method/schedule/`` file, or a block) as a checked spec."""
    if cfg.method.get("schedule") is None:
        raise ConfigError(
            f"method={cfg.method.name} has no schedule; add `defaults: [schedule: ...]` to its "
            "YAML or pick one with method/schedule=<name>"
        )
    try:
        spec = ScheduleSpec.from_mapping(OmegaConf.to_container(cfg.method.schedule, resolve=True))
        spec.check_adapter(str(cfg.method.adapter.kind), str(cfg.method.name))
    except (ScheduleError, TypeError) as error:
        raise ConfigError(f"method.schedule: {error}") from error
    return spec


def adapter_config(cfg: DictConfig, num_domains: int) -> AdapterConfig:
    """``method.adapter`` (with its ``gate`` block) and ``experts`` as an AdapterConfig.

    Bad values become ConfigErrors naming the key (``method.adapter.gate.top_k``...). A
    schedule that starts the gate at the own-expert routing gets an anchored gate.
    """
    spec = OmegaConf.to_container(cfg.method.adapter, resolve=True)
    for old, new in RENAMED_ADAPTER_KEYS.items():
        if old in spec:
            raise ConfigError(f"method.adapter.{old} is now method.adapter.{new}; rename it")
    if spec.get("kind") == "moe":
        spec["experts"] = expert_count(cfg, num_domains)
        if any("gate_own_experts" in phase.init for phase in schedule_spec(cfg).phases):
            spec.setdefault("gate", {})["anchored"] = True
    else:
        for key in ("experts", "experts_per_domain"):
            if cfg.get(key) is not None:
                log.warning(
                    "%s=%s is ignored: method=%s has no experts", key, cfg[key], cfg.method.name
                )
        if spec.get("gate"):
            log.warning("method.adapter.gate is ignored: method=%s has no gate", cfg.method.name)
    try:
        return AdapterConfig(**spec)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method.adapter: {error}") from error


def expert_count(cfg: DictConfig, num_domains: int) -> int:
    """MoE-MLoRA's total experts: ``experts``, or ``experts_per_domain`` x domains, or one each."""
    total, per_domain = cfg.experts, cfg.get("experts_per_domain")
    if total is not None and per_domain is not None:
        raise ConfigError(
            f"set experts ({total}) or experts_per_domain ({per_domain}), not both: "
            "experts is the total, experts_per_domain multiplies the number of domains"
        )
    if per_domain is not None:
        if int(per_domain) < 1:
            raise ConfigError(f"experts_per_domain must be >= 1, got {per_domain}")
        return int(per_domain) * num_domains
    if total is not None and int(total) < 1:
        raise ConfigError(f"experts must be >= 1, got {total} (or null: one per domain)")
    return int(total) if total is not None else num_domains


def build_module(cfg: DictConfig, datamodule) -> CTRModule:
    data = datamodule.processed
    adapter = adapter_config(cfg, data.num_domains)
    model_options = {k: v for k, v in cfg.model.items() if k != "name"}
    model_options = OmegaConf.to_container(OmegaConf.create(model_options), resolve=True)

    tower = cfg.method.get("tower")
    tower = OmegaConf.to_container(tower, resolve=True) if tower is not None else None

    def build(adapter: AdapterConfig):
        try:
            return build_model(
                cfg.model.name, data.fields, data.num_domains, adapter, tower=tower,
                **model_options,
            )  # fmt: skip
        except (ValueError, TypeError) as error:  # a model option out of range: name it
            raise ConfigError(f"model={cfg.model.name}: {error} (set in model.*)") from error

    if adapter.kind == "moe":
        check_expert_memory(cfg, adapter, build)
    bins = cfg.get("evaluation", {}).get("auc_bins")
    model = build(adapter)
    set_dropout_mask(model, str(cfg.get("dropout_mask", "bits")))
    return CTRModule(
        model,
        data.domain_names,
        cfg.optimizer.lr,
        cfg.optimizer.weight_decay,
        auc_bins=bins,
    )


def check_expert_memory(cfg: DictConfig, adapter: AdapterConfig, build) -> None:
    """Refuse an expert count that would not fit, from two small models (k and k+1 experts).

    Parameters grow linearly with the experts, so the two models give the full model's
    count without allocating it; the tower's widths give the activations per expert.
    """
    fewest = max(1, adapter.gate.top_k or 1)  # top_k needs that many experts
    if adapter.experts <= fewest + 1:
        return
    with torch.random.fork_rng(devices=[]):  # the probes must not move the seeded init
        one, two = (build(replace(adapter, experts=count)) for count in (fewest, fewest + 1))
    per_expert = two.parameter_counts()["total"] - one.parameter_counts()["total"]
    parameters = one.parameter_counts()["total"] + per_expert * (adapter.experts - fewest)
    widths = [layer.out_features for layer in one.modules() if isinstance(layer, torch.nn.Linear)]
    check_memory(cfg, parameters, adapter.experts, widths)
