"""CTR backbones with a pluggable adapter (none | mlora | moe) on their DNN tower."""

from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones import MODELS, build_model
from moe_mlora.models.backbones.base import CTRModel

__all__ = ["MODELS", "AdapterConfig", "CTRModel", "build_model"]
