"""Forward FLOPs per sample of any CTR model, counted by ``torch.utils.flop_counter``.

Counting runs the model once (eval mode, no grad) under ``FlopCounterMode``,
so it measures what the implementation actually computes for every backbone
and adapter without any per-model bookkeeping. What is counted and what is not:

* counted: matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, hence
  every ``nn.Linear``, ``F.linear``, ``matmul`` and ``einsum`` that lowers to
  them, and the grouped GEMM of the per-domain layers, whose formula is
  registered here), convolutions and attention kernels, at 2 FLOPs per
  multiply-add;
* not counted: embedding lookups (gathers), elementwise ops (activations,
  dropout, the FM's squares and sums, softmax, adding a bias outside
  ``addmm``), reductions, ``topk`` and ``scatter``.

The batched expert mixture computes every expert's low-rank product for every
sample, so the count includes them even where a weight is zero (MLoRA's
one-hot routing, a top-k gate). A gate over domains only ("domain" input)
runs once per batch on the ``[D, E]`` table, so its share per sample depends
on the batch size (it is tiny at any realistic size).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """``F.grouped_mm``: every row of the jagged operand meets one group's matrix once."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [N, K] rows x [G, K, M]: a forward
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:  # [G, N, K] x [G, K, M]: a batched product
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    if len(a_shape) == 3:  # [G, N, K] x [K, M] jagged in M
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # [M, K] x [K, N], jagged in K


if hasattr(torch.ops.aten, "_grouped_mm"):  # torch releases before the grouped GEMM lack it
    register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


def forward_flops(model: nn.Module, *inputs: Tensor) -> int:
    """FLOPs of one eval-mode ``model(*inputs)`` (no grad); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@contextmanager
def routing_set_to(model: nn.Module, routing: str | None) -> Iterator[None]:
    """Temporarily set a CTR model's adapter routing (``None``: leave it as it is)."""
    if routing is None:
        yield
        return
    previous = model.routing
    model.routing = routing
    try:
        yield
    finally:
        model.routing = previous


def flops_per_sample(
    model: nn.Module, sparse: Tensor, domain: Tensor, routing: str | None = None
) -> float:
    """Forward FLOPs per sample of ``model(sparse, domain)``, optionally under another routing."""
    with routing_set_to(model, routing):
        return forward_flops(model, sparse, domain) / sparse.shape[0]


def complexity(model: nn.Module, sparse: Tensor, domain: Tensor) -> dict[str, float | int | str]:
    """FLOPs per sample of the model as it is routed now, and of its base (routing "off").

    ``overhead`` is what the adapter adds per sample; for a base model it is 0.
    The inputs are moved to the model's device first.
    """
    device = next(model.parameters()).device
    sparse, domain = sparse.to(device), domain.to(device)
    routing = str(getattr(model, "routing", "off"))
    per_sample = flops_per_sample(model, sparse, domain)
    base = per_sample if routing == "off" else flops_per_sample(model, sparse, domain, "off")
    overhead = per_sample - base
    return {
        "routing": routing,
        "batch_size": int(sparse.shape[0]),
        "per_sample": per_sample,
        "base_per_sample": base,
        "overhead_per_sample": overhead,
        "overhead_pct": 100.0 * overhead / base if base else float("nan"),
    }
