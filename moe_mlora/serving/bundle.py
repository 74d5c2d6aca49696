"""A trained model as one self-contained file (``model.pt``), and loading it back for serving.

A run ends by writing ``model.pt`` into its folder (:func:`save_model`). The
file holds everything needed to score new rows without the training data or
the config files: the backbone's name and options, the adapter, the fields
(and their frozen pretrained tables, which are not in the state dict), the
domain names, the vocabularies (raw value -> index) and the weights.
:func:`load_model` rebuilds the model with :func:`~moe_mlora.models.build_model`
and loads the weights; ``moe_mlora.predict`` and ``moe_mlora.export`` build on it.

Portability: tensors are moved to the CPU before saving and loaded with
``map_location="cpu"`` by default, so a model trained on a GPU loads on a
CPU-only machine. Loading uses ``torch.load(weights_only=True)``: the file holds
only tensors and plain Python containers, so nothing in it can run code.

Every problem with a file (missing, corrupt, another format version, weights
that do not fit the model it describes) is a :class:`ServingError` whose
message names the file and the cause, never a deep torch traceback.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from moe_mlora.data.processed import FieldSpec, ProcessedData
from moe_mlora.models import CTRModel, build_model

FORMAT = "moe_mlora model"
FORMAT_VERSION = 1  # bump when the bundle's keys or their meaning change
MODEL_FILE = "model.pt"
DOMAIN_FIELD = "domain"  # the feature field that holds the domain, when it is a feature
MAX_LISTED = 5  # keys named in a mismatch message before "... and N more"


class ServingError(ValueError):
    """A model file or serving input that cannot be used; the message names the file and cause."""


@dataclass
class ServedModel:
    """A model rebuilt from ``model.pt``, in eval mode, with what is needed to encode raw rows."""

    model: CTRModel
    model_name: str
    model_options: dict[str, Any]
    adapter: dict[str, Any]
    fields: list[FieldSpec]
    domain_names: list[str]
    vocabularies: dict[str, list[str]]
    config: dict[str, Any]
    data_name: str | None
    path: Path

    @property
    def feature_order(self) -> list[str]:
        """The model's fields in the order of the columns of ``sparse``."""
        return [spec.name for spec in self.fields]

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def domain_feature_codes(self) -> np.ndarray:
        """Index in the ``domain`` field of each domain id ``0..D-1`` (if it is a feature).

        Sources encode that field differently: MovieLens's vocabulary lists
        the domain ids as text (``"0"``, ``"1"``...), Taobao's and table data's
        list the domain names; both put domain ``d`` at index ``d + 1``, but
        the vocabulary is what the model was trained with, so it decides.
        """
        vocab = self.vocabularies.get(DOMAIN_FIELD, [])
        position = {value: i for i, value in enumerate(vocab) if i > 0}
        by_name = [position.get(name) for name in self.domain_names]
        by_id = [position.get(str(d)) for d in range(self.num_domains)]
        for codes in (by_name, by_id):
            if all(code is not None for code in codes):
                return np.asarray(codes, dtype=np.int64)
        raise ServingError(
            f"{self.path}: the vocabulary of field {DOMAIN_FIELD!r} ({vocab[:10]}) lists neither "
            f"the domain names {self.domain_names} nor the domain ids 0..{self.num_domains - 1}"
        )

    def describe(self) -> str:
        """One line: model, adapter, domains and fields (for messages and logs)."""
        return (
            f"model={self.model_name} with {self.num_domains} domains "
            f"{self.domain_names}, adapter {_describe_adapter(self.adapter)}, "
            f"fields {self.feature_order}"
        )


# ----------------------------------------------------------------------------- saving


def save_model(
    path: str | Path,
    module_or_model: nn.Module,
    cfg: DictConfig | Mapping[str, Any],
    processed: ProcessedData,
) -> Path:
    """Write the model bundle to ``path`` atomically (a temp file beside it, then a rename).

    ``module_or_model`` is the trained CTRModule or its CTRModel; ``cfg`` the
    run's config (the model name and options come from ``cfg.model``);
    ``processed`` the data it was trained on (fields, domains, vocabularies).
    """
    model = _ctr_model(module_or_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(model, _as_container(cfg), processed)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(bundle, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _ctr_model(module_or_model: nn.Module) -> CTRModel:
    model = getattr(module_or_model, "model", module_or_model)
    if not isinstance(model, CTRModel):
        raise TypeError(f"expected a CTRModule or CTRModel, got {type(module_or_model).__name__}")
    return model


def _as_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _bundle(model: CTRModel, config: dict[str, Any], processed: ProcessedData) -> dict[str, Any]:
    """The file's content: only tensors and plain containers, so ``weights_only`` loads it."""
    model_cfg = dict(config["model"])
    name = model_cfg.pop("name")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": name,
        "model_options": model_cfg,
        "adapter": asdict(model.adapter_config),
        "tower": {"kind": model.tower_config.kind, **model.tower_config.options},
        "routing": model.routing,
        "fields": [_field_entry(spec) for spec in processed.fields],
        "feature_order": processed.field_names,
        "domain_names": list(processed.domain_names),
        "vocabularies": {k: list(v) for k, v in processed.vocabularies.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "data_name": (config.get("data") or {}).get("name"),
    }


def _field_entry(spec: FieldSpec) -> dict[str, Any]:
    """A field spec; a frozen pretrained table is a non-persistent buffer, so it travels here."""
    entry: dict[str, Any] = {
        "name": spec.name,
        "vocab_size": int(spec.vocab_size),
        "freeze_pretrained": bool(spec.freeze_pretrained),
        "project_pretrained": bool(spec.project_pretrained),
        "pretrained": None,
        "pretrained_dim": None,
    }
    if spec.pretrained is not None:
        entry["pretrained_dim"] = int(spec.pretrained.shape[1])
        if spec.freeze_pretrained:  # a fine-tuned table is a parameter: the state dict has it
            entry["pretrained"] = spec.pretrained.detach().float().cpu()
    return entry


# ----------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or ``path/model.pt`` when ``path`` is a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / MODEL_FILE
        if not file.is_file():
            raise ServingError(
                f"{path} is a folder without {MODEL_FILE}; give a run folder (runs write "
                f"{MODEL_FILE} at their end) or the path of a model file"
            )
        return file
    if not path.is_file():
        raise ServingError(f"no model file at {path}: give a run folder or its {MODEL_FILE}")
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> ServedModel:
    """Rebuild the model saved at ``path`` (a run folder or a ``model.pt``), in eval mode.

    ``map_location`` (default CPU) is where the tensors land, so a file saved
    on a GPU machine loads on a CPU-only one.
    """
    file = resolve_checkpoint(path)
    bundle = _read_bundle(file, map_location)
    fields = [_field_spec(entry) for entry in bundle["fields"]]
    model = _rebuild(file, bundle, fields)
    _load_weights(file, bundle, model)
    model.routing = bundle["routing"]
    model.to(map_location).eval()
    return ServedModel(
        model=model,
        model_name=bundle["model_name"],
        model_options=dict(bundle["model_options"]),
        adapter=dict(bundle["adapter"]),
        fields=fields,
        domain_names=list(bundle["domain_names"]),
        vocabularies=dict(bundle["vocabularies"]),
        config=dict(bundle["config"]),
        data_name=bundle.get("data_name"),
        path=file,
    )


# What torch.load raises on a file that is not a torch zip archive, is cut short (OSError from
# its zip reader), or holds objects weights_only refuses: all mean "not our file, or damaged".
_UNREADABLE = (
    OSError,
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    KeyError,
    AttributeError,
    ImportError,
    IndexError,
    TypeError,
)


def _read_bundle(file: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        bundle = torch.load(file, map_location=map_location, weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
        raise ServingError(f"cannot read the model file {file}: {error.strerror}") from None
    except _UNREADABLE as error:
        raise ServingError(
            f"not a moe_mlora model file or corrupt: {file} ({_first_sentence(error)})"
        ) from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ServingError(f"not a moe_mlora model file or corrupt: {file}")
    version = bundle.get("format_version")
    if version != FORMAT_VERSION:
        raise ServingError(
            f"{file} is a moe_mlora model file of format version {version}; this version of "
            f"moe_mlora reads format version {FORMAT_VERSION}. Load it with the moe_mlora "
            f"that wrote it, or retrain to write a current one"
        )
    return bundle


def _first_sentence(error: Exception) -> str:
    """The gist of a torch loading error (its full text suggests internals irrelevant here)."""
    text = " ".join(str(error).split())
    return text.split(". ")[0][:200] or type(error).__name__


def _field_spec(entry: Mapping[str, Any]) -> FieldSpec:
    pretrained = entry.get("pretrained")
    dim = entry.get("pretrained_dim")
    if pretrained is None and dim is not None:  # fine-tuned: the state dict fills it in
        pretrained = torch.zeros(int(entry["vocab_size"]), int(dim))
    return FieldSpec(
        entry["name"],
        int(entry["vocab_size"]),
        pretrained,
        bool(entry["freeze_pretrained"]),
        bool(entry.get("project_pretrained", True)),  # bundles written before the option
    )


def _rebuild(file: Path, bundle: Mapping[str, Any], fields: list[FieldSpec]) -> CTRModel:
    name, domains = bundle["model_name"], len(bundle["domain_names"])
    try:
        return build_model(
            name,
            fields,
            domains,
            dict(bundle["adapter"]),
            tower=bundle.get("tower"),
            **bundle["model_options"],
        )  # fmt: skip (bundles from before multi-domain towers have no "tower": the DNN one)
    except (TypeError, ValueError) as error:
        raise ServingError(
            f"{file}: cannot rebuild model={name} with {domains} domains and options "
            f"{bundle['model_options']}: {error}"
        ) from None


def _load_weights(file: Path, bundle: Mapping[str, Any], model: CTRModel) -> None:
    """Load the state dict, or say exactly which keys and shapes do not fit."""
    saved = upgrade_state_dict(bundle["state_dict"])
    expected = model.state_dict()
    problems = _mismatches(saved, expected)
    if problems:
        raise ServingError(
            f"{file}: checkpoint is model={bundle['model_name']} with "
            f"{len(bundle['domain_names'])} domains, adapter {_describe_adapter(bundle['adapter'])}"
            f", but its weights do not fit that model: {'; '.join(problems)}"
        )
    model.load_state_dict(saved)


_OLD_CIN_KEY = re.compile(r"^(.*\bcin)\.convs\.(\d+)\.(weight|bias)$")


def upgrade_state_dict(saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename weights saved by earlier versions to the current layout.

    Before 2026-11-24 xDeepFM's CIN held ``nn.Conv1d`` layers (``cin.convs.k``, weight
    ``[out, in, 1]``); it now holds :class:`~moe_mlora.models.cin.CINMap` layers
    (``cin.maps.k``, weight ``[in, out]``) computing the same function.
    """
    upgraded = {}
    for key, value in saved.items():
        match = _OLD_CIN_KEY.match(key)
        if match is None:
            upgraded[key] = value
            continue
        prefix, index, kind = match.groups()
        if kind == "weight" and value.dim() == 3:
            value = value.squeeze(-1).t().contiguous()
        upgraded[f"{prefix}.maps.{index}.{kind}"] = value
    return upgraded


def _mismatches(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list:
    """Human-readable differences between the saved and the rebuilt model's state dicts."""
    problems = []
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if missing:
        problems.append(f"the rebuilt model has weights the checkpoint lacks: {_listed(missing)}")
    if unexpected:
        problems.append(f"the checkpoint has weights the model lacks: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shapes differ: {_listed(shapes)}")
    return problems


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _describe_adapter(adapter: Mapping[str, Any]) -> str:
    kind = adapter.get("kind", "none")
    return f"moe with {adapter.get('experts')} experts" if kind == "moe" else str(kind)


# ----------------------------------------------------------------------------- scoring


def score(
    model: nn.Module, sparse: torch.Tensor, domain: torch.Tensor, batch_size: int = 65536
) -> np.ndarray:
    """Click probabilities ``[N]`` (float32) of encoded rows, in batches, without autograd."""
    if batch_size < 1:
        raise ServingError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.inference_mode():
            for start in range(0, len(domain), batch_size):
                rows = slice(start, start + batch_size)
                logits = model(sparse[rows].to(device), domain[rows].to(device))
                parts.append(torch.sigmoid(logits).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)
