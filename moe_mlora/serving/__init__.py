"""Serving a trained model: the ``model.pt`` bundle (:mod:`.bundle`), scoring files
(:mod:`.predict`, ``python -m moe_mlora.predict``) and exporting graphs (:mod:`.export`,
``python -m moe_mlora.export``).
"""

from moe_mlora.serving.bundle import (
    DOMAIN_FIELD,
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    ServedModel,
    ServingError,
    load_model,
    resolve_checkpoint,
    save_model,
    score,
    upgrade_state_dict,
)

__all__ = [
    "DOMAIN_FIELD",
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "ServedModel",
    "ServingError",
    "load_model",
    "resolve_checkpoint",
    "save_model",
    "score",
    "upgrade_state_dict",
]
