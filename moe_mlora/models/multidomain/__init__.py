"""Multi-domain towers: Shared-Bottom, MMoE, PLE, STAR and PEPNet on any backbone.

``method.tower.kind`` picks one (``dnn``, the default, is the backbone's own adapted tower).
A new structure is one file here (a :class:`MultiDomainTower` subclass) and one entry in
:data:`TOWERS`, plus its ``conf/method/NAME.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_mlora.models.multidomain.base import DomainGroups, MultiDomainTower
from moe_mlora.models.multidomain.mmoe import MMoE
from moe_mlora.models.multidomain.pepnet import PEPNet
from moe_mlora.models.multidomain.ple import PLE
from moe_mlora.models.multidomain.shared_bottom import SharedBottom
from moe_mlora.models.multidomain.star import STAR

TOWERS: dict[str, type[MultiDomainTower]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "star": STAR,
    "pepnet": PEPNet,
}
DNN = "dnn"  # the backbone's own tower, carrying the adapter


@dataclass
class TowerConfig:
    """``method.tower``: ``kind`` (dnn or a key of TOWERS) and that tower's options."""

    kind: str = DNN
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | None) -> TowerConfig:
        spec = dict(spec or {})
        kind = str(spec.pop("kind", DNN))
        if kind != DNN and kind not in TOWERS:
            raise ValueError(f"tower.kind must be one of {[DNN, *TOWERS]}, got {kind!r}")
        return cls(kind, spec)


def build_tower(
    config: TowerConfig,
    num_domains: int,
    input_dim: int,
    hidden_units: Sequence[int],
    dropout: float,
    embedding_shape: tuple[int, int],
) -> MultiDomainTower:
    """The multi-domain tower ``config.kind`` with its options (unknown ones are refused)."""
    options = dict(config.options)
    if config.kind == "pepnet":
        options["embedding_shape"] = embedding_shape
    try:
        return TOWERS[config.kind](num_domains, input_dim, list(hidden_units), dropout, **options)
    except TypeError as error:
        raise ValueError(f"method.tower ({config.kind}): {error}") from None


__all__ = ["DNN", "TOWERS", "DomainGroups", "MultiDomainTower", "TowerConfig", "build_tower"]
