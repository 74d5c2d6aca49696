"""Backbone registry. A new backbone is one file in this folder plus one entry in ``MODELS``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields as dataclass_fields
from typing import Any

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.autoint import AutoInt
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.backbones.dcn import DCN
from moe_mlora.models.backbones.deepfm import DeepFM
from moe_mlora.models.backbones.fibinet import FiBiNET
from moe_mlora.models.backbones.mlp import MLP
from moe_mlora.models.backbones.nfm import NFM
from moe_mlora.models.backbones.pnn import PNN
from moe_mlora.models.backbones.wdl import WDL
from moe_mlora.models.backbones.xdeepfm import XDeepFM
from moe_mlora.models.multidomain import TowerConfig

MODELS: dict[str, type[CTRModel]] = {
    "autoint": AutoInt,
    "dcn": DCN,
    "deepfm": DeepFM,
    "fibinet": FiBiNET,
    "mlp": MLP,
    "nfm": NFM,
    "pnn": PNN,
    "wdl": WDL,
    "xdeepfm": XDeepFM,
}


def _adapter_config(adapter: AdapterConfig | Mapping[str, Any] | None) -> AdapterConfig:
    """Accept an AdapterConfig, or a mapping of its fields (e.g. a Hydra DictConfig)."""
    if adapter is None:
        return AdapterConfig()
    if isinstance(adapter, AdapterConfig):
        return adapter
    known = {f.name for f in dataclass_fields(AdapterConfig)}
    unknown = sorted(set(adapter) - known)
    if unknown:
        raise ValueError(f"unknown adapter keys {unknown}; valid keys are {sorted(known)}")
    return AdapterConfig(**{str(k): v for k, v in adapter.items()})


def build_model(
    name: str,
    fields: Sequence[FieldSpec],
    num_domains: int,
    adapter: AdapterConfig | Mapping[str, Any] | None = None,
    embedding_dim: int = 8,
    hidden_units: Sequence[int] = (256, 128, 64),
    dropout: float = 0.5,
    tower: TowerConfig | Mapping[str, Any] | None = None,
    **model_kwargs: Any,
) -> CTRModel:
    """Backbone ``name`` with the given adapter on its DNN tower's Linear layers, or with a
    multi-domain tower (``tower``: Shared-Bottom, MMoE, PLE, STAR, PEPNet) in its place."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choices are {sorted(MODELS)}")
    if not isinstance(tower, TowerConfig):
        tower = TowerConfig.from_mapping(tower)
    return MODELS[name](
        list(fields),
        num_domains,
        _adapter_config(adapter),
        embedding_dim=embedding_dim,
        hidden_units=tuple(hidden_units),
        dropout=dropout,
        tower=tower,
        **model_kwargs,
    )


__all__ = ["MODELS", "CTRModel", "build_model"]
