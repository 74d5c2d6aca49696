"""LoRA experts of one tower layer, and the two ways of computing their products.

A layer's E experts are stored stacked: ``A [E, r, in]``, ``B [E, r, out]``,
``bias [E, out]``, one parameter each. Stacking matters for speed: with one
tensor per expert, a 64-expert tower had 576 parameter tensors, and Adam's
per-tensor cost and the ``torch.stack`` of every forward and backward took more
time than the products themselves. Expert ``e`` is the slice ``[e]`` of each
tensor (:meth:`LoRAExperts.expert_tensors`); what a phase needs per expert
(freezing one, skipping an expert absent from the batch, keeping an expert's
best weights) is done on slices, see :class:`~moe_mlora.training.optim.Adam`.

Two ways to compute ``sum_e w[b, e] (x_b A_e^T B_e + b_e)`` (both exact):

* **dense** (``[B, E]`` weights): every row's product with every expert, in two
  matrix products over the concatenated experts, then weighted. Its cost grows
  with E, but it is two large GEMMs: the faster choice with few experts, and the
  only one for a dense softmax mixture.
* **rows** (:class:`ExpertRows`: each row names its k experts and weights): each
  row meets only its own experts. Rows are laid out per expert in padded tiles
  (``[tiles, tile rows, in]``), multiplied by their experts' ``A`` and ``B`` with
  two batched products, and read back. Cost follows the number of rows, not E x
  rows. It serves one-hot routing (MLoRA, a domain's or a phase-2 expert's rows) and
  a gate's top-k. Its tiles have shapes that depend on the data, so a traced or
  exported graph uses the dense path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def static_shapes() -> bool:
    """Whether the forward is being traced or exported (TorchScript, ONNX, torch.export)."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch 2.3+
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiling() or exporting()
    )


MIN_TILE_ROWS = 16  # fewer rows per batched product wastes more time than padding costs
PADDING_ALLOWED = 1.7  # one tile per expert (no per-tile weights) while padding is this small:
# MLoRA at D = 21 and 30 stepped 4% faster with 1.7 than with 1.25 (2 threads, batch 1024)


class ExpertRows:
    """Which k experts each of the batch's B rows uses, laid out for per-expert products.

    ``expert [B]`` (one expert per row, weight 1) or ``[B, k]`` with ``weight [B, k]``
    (a gate's top-k). The B*k (row, expert) pairs are grouped by expert into *tiles* of
    ``tile_rows`` rows. When the experts' shares are even (padding every expert to the
    largest one's rows costs at most :data:`PADDING_ALLOWED` x the rows), tile e is
    expert e. Otherwise an expert with c pairs gets ``ceil(c / tile_rows)`` tiles of
    its own, ``tile_rows`` being the pairs per used expert (at least
    :data:`MIN_TILE_ROWS`): padding then stays below one tile per used expert however
    unevenly the rows are spread (a few large domains, a gate that sends every row of a
    domain to the same two experts), and experts without rows cost nothing.
    Computed once per forward and shared by every layer of the tower.
    """

    def __init__(self, expert: Tensor, num_experts: int, weight: Tensor | None = None) -> None:
        if weight is not None and weight.shape != expert.shape:
            shapes = f"{tuple(weight.shape)} and {tuple(expert.shape)}"
            raise ValueError(f"weight and expert must have one shape, got {shapes}")
        self.num_rows = expert.shape[0]
        self.k = 1 if expert.dim() == 1 else expert.shape[1]
        self.num_experts = num_experts
        flat = expert.reshape(-1)
        pairs = flat.numel()
        counts = torch.bincount(flat, minlength=num_experts)
        if counts.numel() > num_experts:
            raise ValueError(f"expert indices must be in [0, {num_experts}), got {int(flat.max())}")
        used = max(int((counts > 0).sum()), 1)
        most = int(counts.max()) if pairs else 0
        if pairs and num_experts * most <= PADDING_ALLOWED * pairs:
            # one tile per expert: the stacked weights serve the tiles as they are
            self.tile_rows, tiles = max(most, 1), torch.ones_like(counts)
            self.tile_expert: Tensor | None = None
        else:
            self.tile_rows = max(MIN_TILE_ROWS, -(-pairs // used))
            tiles = (counts + self.tile_rows - 1) // self.tile_rows
            arange = torch.arange(num_experts, device=flat.device)
            self.tile_expert = torch.repeat_interleave(arange, tiles)
        self.num_tiles = int(tiles.sum())
        first_tile = torch.cumsum(tiles, 0) - tiles
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(flat)
        position[order] = torch.arange(pairs, device=flat.device) - starts[flat[order]]
        self.slot = first_tile[flat] * self.tile_rows + position  # [B*k]: each pair's block row
        # Each block row's row of the batch. Padding rows read row 0: their products are never
        # read back, so they get no gradient and add none.
        blocks = self.num_tiles * self.tile_rows
        self.source = torch.zeros(blocks, dtype=torch.long, device=flat.device)
        self.source[self.slot] = torch.arange(pairs, device=flat.device) // self.k
        self.weight = None if weight is None else weight.reshape(-1, 1)


class LoRAExperts(nn.Module):
    """E LoRA experts of one Linear layer: ``A [E, r, in]``, ``B [E, r, out]``, ``bias [E, out]``.

    Expert e computes ``(x A_e^T) B_e + b_e``. ``A`` keeps nn.Linear's ``[out, in]``
    orientation per expert (``F.linear(x, A)`` is ~2.5x faster on CPU than ``x @ A``
    with a row-major ``[in, r]`` matrix). Init as LoRA: ``kaiming_uniform(a=sqrt(5))``
    for each ``A_e``, zeros for ``B`` and ``bias``, so a fresh adapter adds exactly zero.
    Weights saved when every expert was its own tensor (keys ``A.0``, ``A.1``...)
    load unchanged: they are stacked on load.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank = num_experts, rank
        self.A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.B = nn.Parameter(torch.zeros(num_experts, rank, out_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_stack_per_expert_keys)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for expert in range(self.num_experts):  # expert by expert: the same draws as ever
                nn.init.kaiming_uniform_(self.A[expert], a=math.sqrt(5))
            self.B.zero_()
            self.bias.zero_()

    def expert_tensors(self, expert: int) -> list[Tensor]:
        """Expert ``expert``'s ``A``, ``B`` and ``bias``: views into the stacked parameters."""
        return [self.A[expert], self.B[expert], self.bias[expert]]

    @torch.no_grad()
    def spread(self, groups: list[list[int]], noise: float, generator: torch.Generator) -> None:
        """Copy each group's first expert into the group's others, with zero-sum noise.

        ``groups``: the experts of each domain, its own (trained) expert first. Every
        copy gets the first expert's ``A``; ``B`` and ``b`` get noise of scale
        ``noise x`` their RMS, centred over the group, so the copies' *average* is
        the first expert exactly (the expert output is linear in ``B`` and ``b`` for
        a shared ``A``) while each copy can specialise differently afterwards.
        """
        for group in groups:
            if len(group) < 2:
                continue
            first = group[0]
            for tensors in (self.B, self.bias):
                source = tensors[first].detach().clone()
                scale = noise * source.pow(2).mean().sqrt()
                draws = torch.randn((len(group), *source.shape), generator=generator)
                draws = (draws - draws.mean(dim=0)) * scale
                for copy, expert in enumerate(group):
                    tensors[expert].copy_(source + draws[copy])
            for expert in group[1:]:
                self.A[expert].copy_(self.A[first])

    def forward(self, x: Tensor, routing: Tensor | ExpertRows, base: Tensor) -> Tensor:
        """``base + sum_e w[:, e] * (x A_e^T B_e + b_e)``; ``routing``: ``[B, E]`` weights
        (dense path) or :class:`ExpertRows` (rows path)."""
        if isinstance(routing, ExpertRows):
            return base + self._rows_products(x, routing)
        return self._dense_products(x, routing, base)

    def _dense_products(self, x: Tensor, weights: Tensor, base: Tensor) -> Tensor:
        """Every expert for every row: the rank-r codes ``x A_e^T`` (``[B, E, r]``) scaled by
        the row's weights, then codes and weights through ``[B; bias]`` in one product.

        Out-of-place ``addmm`` rather than ``addmm_``: autocast (AMP) covers it.
        """
        n, e, r = x.shape[0], self.num_experts, self.rank
        code = F.linear(x, self.A.view(e * r, -1)).view(n, e, r) * weights.unsqueeze(-1)
        mixed_in = torch.cat((code.view(n, e * r), weights), dim=1)  # [B, E*r + E]
        mix = torch.cat((self.B.view(e * r, -1), self.bias), dim=0)  # [E*r + E, out]
        return torch.addmm(base, mixed_in, mix)

    def _rows_products(self, x: Tensor, rows: ExpertRows) -> Tensor:
        """Each row through its own k experts only: the rows in per-expert tiles, each tile
        times its expert's ``A`` and ``B`` (gathered per tile), two ``bmm``."""
        blocks = rows.num_tiles * rows.tile_rows
        block = x.index_select(0, rows.source).view(rows.num_tiles, rows.tile_rows, x.shape[1])
        a, b, bias = self.A, self.B, self.bias
        if rows.tile_expert is not None:  # tiles of uneven experts: each tile's weights
            a, b, bias = (t.index_select(0, rows.tile_expert) for t in (a, b, bias))
        code = torch.bmm(block, a.transpose(1, 2))  # [tiles, tile_rows, r]
        products = torch.baddbmm(bias.unsqueeze(1), code, b)  # [tiles, tile_rows, out]
        out = products.view(blocks, self.out_features).index_select(0, rows.slot)
        if rows.weight is None:
            return out
        out = out * rows.weight.to(out.dtype)
        return out.view(rows.num_rows, rows.k, self.out_features).sum(dim=1)


def _stack_per_expert_keys(module: LoRAExperts, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: ``A.0 .. A.{E-1}`` (one tensor per expert, the format before stacking)
    become ``A [E, ...]``; likewise ``B`` and ``bias``."""
    for name in ("A", "B", "bias"):
        keys = [f"{prefix}{name}.{e}" for e in range(module.num_experts)]
        if f"{prefix}{name}" not in state_dict and all(key in state_dict for key in keys):
            state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(key) for key in keys])
