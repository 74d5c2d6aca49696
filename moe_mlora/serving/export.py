"""Export a trained model to TorchScript or ONNX, for serving outside this package.

``python -m moe_mlora.export ckpt=<run folder or model.pt> format=torchscript|onnx output=<path>``

The exported graph returns click probabilities ``[batch]`` (float32), batch
size free. Its inputs are int64 tensors of shape ``[batch]`` holding indices,
not raw values (map raw ids with the vocabularies in the ``<output>.json``
written beside it; unseen values are index 0):

* a model whose fields are user and item (and the domain): ``user``, ``item``
  (vocabulary indices) and ``domain`` (the domain id ``0..D-1``, the position
  of its name in ``domain_names``); the domain field, if a feature, is filled
  in from ``domain`` inside the graph;
* a model with any other field (gender, age, occupation...): ``sparse``
  ``[batch, F]`` (every field's index, in ``feature_order``) and ``domain``.

ONNX uses torch's dynamo-based exporter (it needs the ``onnx`` and
``onnxscript`` packages: ``pip install -e ".[export]"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from moe_mlora.cli import run_cli
from moe_mlora.serving import DOMAIN_FIELD, ServedModel, ServingError, load_model

FORMATS = ("torchscript", "onnx")
ID_FIELDS = ("user", "item")
EXAMPLE_BATCH = 4  # rows of the example input the export traces (any size works after)

USAGE = """\
usage: python -m moe_mlora.export ckpt=PATH format=torchscript|onnx output=PATH

  ckpt    a run folder (holding model.pt) or a model.pt file
  format  torchscript (a torch.jit file, torch.jit.load) or onnx
  output  the file to write; a JSON file of the inputs, domains and
          vocabularies is written beside it as OUTPUT.json

The exported model returns click probabilities [batch]. Its inputs are int64 [batch]
tensors user, item (vocabulary indices) and domain (domain id 0..D-1) when the model's
fields are user, item and domain; otherwise sparse [batch, F] and domain [batch].
"""


class IdInputs(nn.Module):
    """``(user, item, domain) -> probability``: assembles ``sparse`` in the model's field order."""

    def __init__(self, model: nn.Module, feature_order: Sequence[str], domain_codes: Tensor):
        super().__init__()
        self.model = model
        self.feature_order = list(feature_order)
        self.register_buffer("domain_codes", domain_codes.to(torch.int64), persistent=False)

    def forward(self, user: Tensor, item: Tensor, domain: Tensor) -> Tensor:
        columns = {"user": user, "item": item, DOMAIN_FIELD: self.domain_codes[domain]}
        sparse = torch.stack([columns[name] for name in self.feature_order], dim=1)
        return torch.sigmoid(self.model(sparse, domain))


class SparseInputs(nn.Module):
    """``(sparse, domain) -> probability`` for models with fields beyond user, item, domain."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sparse: Tensor, domain: Tensor) -> Tensor:
        return torch.sigmoid(self.model(sparse, domain))


def uses_id_inputs(served: ServedModel) -> bool:
    """Whether the model's fields are exactly user and item, plus optionally the domain."""
    names = set(served.feature_order)
    return set(ID_FIELDS) <= names <= {*ID_FIELDS, DOMAIN_FIELD}


def export_wrapper(served: ServedModel) -> tuple[nn.Module, tuple[Tensor, ...], list[str]]:
    """The module to export (in eval mode: no dropout), an example input and the input names."""
    domain = torch.arange(EXAMPLE_BATCH, dtype=torch.int64) % served.num_domains
    if uses_id_inputs(served):
        codes = (
            torch.from_numpy(served.domain_feature_codes())
            if DOMAIN_FIELD in served.feature_order
            else torch.zeros(served.num_domains, dtype=torch.int64)
        )
        # two distinct tensors: torch.export would treat one object passed twice as one input
        user, item = torch.zeros_like(domain), torch.zeros_like(domain)  # 0 (OOV) always exists
        wrapper: nn.Module = IdInputs(served.model, served.feature_order, codes)
        return wrapper.eval(), (user, item, domain), ["user", "item", "domain"]
    sparse = torch.zeros(EXAMPLE_BATCH, len(served.fields), dtype=torch.int64)
    return SparseInputs(served.model).eval(), (sparse, domain), ["sparse", "domain"]


def export_model(ckpt: str | Path, format: str, output: str | Path) -> Path:
    """Export the model at ``ckpt`` to ``output`` in ``format``; also write ``output.json``."""
    if format not in FORMATS:
        raise ServingError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    served = load_model(ckpt)
    wrapper, example, names = export_wrapper(served)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if format == "torchscript":
        export_torchscript(wrapper, example, output)
    else:
        export_onnx(wrapper, example, names, output)
    write_sidecar(served, names, format, output)
    return output


def export_torchscript(wrapper: nn.Module, example: tuple[Tensor, ...], output: Path) -> None:
    """Trace the wrapper (the forward has no data-dependent Python control flow) and save it.

    The tracer warns about the field-count check in the embeddings: it is a constant of the
    model, so baking it in is right; the warning is silenced.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(output))


def export_onnx(
    wrapper: nn.Module, example: tuple[Tensor, ...], names: list[str], output: Path
) -> None:
    """torch.onnx's dynamo exporter, with the batch dimension of every input left free."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail early and clearly)
    except ImportError as error:
        raise ServingError(
            f"ONNX export needs the onnx and onnxscript packages ({error}); install them with "
            f'pip install -e ".[export]"'
        ) from None
    batch = torch.export.Dim("batch", min=1)
    shapes = {name: {0: batch} for name in names}
    with quiet_onnx_exporter():
        torch.onnx.export(
            wrapper,
            example,
            str(output),
            input_names=names,
            output_names=["probability"],
            dynamic_shapes=shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """The exporter logs and warns about things irrelevant here (torchvision ops, axis names)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_sidecar(served: ServedModel, names: list[str], format: str, output: Path) -> Path:
    """``output.json``: what the exported graph expects, to map raw values to its inputs."""
    meta = {
        "format": format,
        "inputs": names,
        "output": "probability",
        "feature_order": served.feature_order,
        "domain_names": served.domain_names,
        "model": served.model_name,
        "vocabularies": served.vocabularies,
    }
    path = output.with_name(output.name + ".json")
    path.write_text(json.dumps(meta))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""

    def run(args: dict[str, str]) -> None:
        path = export_model(args["ckpt"], args["format"], args["output"])
        print(f"moe_mlora.export: wrote {path} and {path.name}.json", file=sys.stderr)

    return run_cli("moe_mlora.export", USAGE, argv, run, required=("ckpt", "format", "output"))


if __name__ == "__main__":
    sys.exit(main())
