"""The processed multi-domain dataset every source produces and every model consumes.

A source (MovieLens, Taobao, ...) turns raw files into a :class:`ProcessedData`:
integer-encoded feature columns, a domain id and a 0/1 label per sample, already
split into train / val / test. Everything downstream (datamodule, models,
metrics) depends only on this module, never on a source's raw format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")
OOV_INDEX = 0  # every vocabulary reserves index 0 for unseen / missing values


class DataError(ValueError):
    """Bad or missing input data; the message names the file, line or key and the fix."""


@dataclass
class FieldSpec:
    """One categorical input field.

    ``vocab_size`` counts index 0 (out-of-vocabulary), so valid indices are
    ``0 .. vocab_size - 1``. ``pretrained`` optionally holds an embedding
    table of shape ``[vocab_size, dim]`` (row 0 for OOV), as Taobao's user and
    item vectors; ``freeze_pretrained`` says whether the model keeps it frozen
    (the default) or fine-tunes it; ``project_pretrained`` whether a learned
    linear map takes it to the model's embedding width (the default) or the
    vectors go in as they are (the reference's full width, which needs
    ``model.embedding_dim`` equal to their width).
    """

    name: str
    vocab_size: int
    pretrained: torch.Tensor | None = None
    freeze_pretrained: bool = True
    project_pretrained: bool = True

    def describe(self) -> dict:
        dim = None if self.pretrained is None else int(self.pretrained.shape[1])
        return {"name": self.name, "vocab_size": self.vocab_size, "pretrained_dim": dim}


@dataclass
class SplitTensors:
    """One split held in memory: ``sparse[i, f]`` is sample i's index in field f."""

    sparse: torch.Tensor  # int64 [N, F]
    domain: torch.Tensor  # int64 [N], 0 .. D-1
    label: torch.Tensor  # float32 [N], 0. or 1.

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        if self.sparse.ndim != 2 or self.sparse.shape[0] != n or self.domain.shape != (n,):
            raise ValueError(
                f"inconsistent split shapes: sparse {tuple(self.sparse.shape)}, "
                f"domain {tuple(self.domain.shape)}, label {tuple(self.label.shape)}"
            )

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, index: torch.Tensor) -> SplitTensors:
        """Rows ``index`` (a LongTensor or boolean mask) as a new split."""
        return SplitTensors(self.sparse[index], self.domain[index], self.label[index])

    def domain_counts(self, num_domains: int) -> torch.Tensor:
        return torch.bincount(self.domain, minlength=num_domains)

    def domain_positive_rates(self, num_domains: int) -> torch.Tensor:
        positives = torch.bincount(self.domain, weights=self.label.double(), minlength=num_domains)
        counts = self.domain_counts(num_domains).double()
        return positives / counts.clamp(min=1)


@dataclass
class ProcessedData:
    """A multi-domain CTR dataset ready for training.

    ``vocabularies[field]`` lists the raw value (as a string) of each index of
    that field, index 0 being ``"<oov>"``; it lets ``predict`` map new raw ids.
    ``meta`` records the source and protocol that produced the data.
    """

    fields: list[FieldSpec]
    domain_names: list[str]
    splits: dict[str, SplitTensors]
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def summary(self) -> dict:
        """Per split and per domain: sample counts and positive rates."""
        out = {}
        for name, split in self.splits.items():
            counts = split.domain_counts(self.num_domains).tolist()
            rates = split.domain_positive_rates(self.num_domains).tolist()
            out[name] = {
                "samples": len(split),
                "positive_rate": float(split.label.mean()) if len(split) else float("nan"),
                "domains": {
                    d: {"samples": c, "positive_rate": r}
                    for d, c, r in zip(self.domain_names, counts, rates, strict=True)
                },
            }
        return out

    def save(self, directory: str | Path) -> None:
        """Write to ``directory`` (tensors as ``data.pt``, the rest as ``meta.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "pretrained": {f.name: f.pretrained for f in self.fields if f.pretrained is not None},
        }
        torch.save(tensors, directory / "data.pt")
        meta = {
            "fields": [{"name": f.name, "vocab_size": f.vocab_size} for f in self.fields],
            "domain_names": self.domain_names,
            "vocabularies": self.vocabularies,
            "meta": self.meta,
        }
        (directory / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> ProcessedData:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        tensors = torch.load(directory / "data.pt", weights_only=True)
        pretrained = tensors.get("pretrained", {})
        fields = [
            FieldSpec(f["name"], f["vocab_size"], pretrained.get(f["name"])) for f in meta["fields"]
        ]
        splits = {k: SplitTensors(**v) for k, v in tensors["splits"].items()}
        return cls(fields, meta["domain_names"], splits, meta["vocabularies"], meta["meta"])
