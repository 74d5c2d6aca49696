"""The DNN tower: ``[AdaptedLinear -> ReLU -> Dropout]`` per hidden size.

The tower owns the adapter and the routing, so every backbone gets MLoRA and
MoE-MLoRA identically without knowing about them. The mixture weights
``w [B, E]`` are computed once per forward (one gate for all layers) and
handed to each layer. The backbone's final output Linear (``hidden[-1] -> 1``)
is NOT part of the tower and is never adapted, as in the papers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from moe_mlora.models.adapters import AdaptedLinear, Adapter
from moe_mlora.models.layers import Dropout


class Tower(nn.Module):
    """Adapted DNN tower; ``routing`` picks the mixture weights (see :mod:`.adapters`)."""

    def __init__(
        self, input_dim: int, hidden_units: Sequence[int], dropout: float, adapter: Adapter
    ) -> None:
        super().__init__()
        if any(units < 1 for units in hidden_units):
            raise ValueError(f"hidden_units must all be >= 1, got {list(hidden_units)}")
        dims = [input_dim, *hidden_units]
        self.adapter = adapter
        self.layers = nn.ModuleList(
            AdaptedLinear(i, o, adapter.make_experts(i, o)) for i, o in pairwise(dims)
        )
        self.dropout = Dropout(dropout)
        self.output_dim = dims[-1]
        self.routing = adapter.default_routing

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        """``x [B, input_dim]`` -> ``[B, output_dim]``."""
        routing = self.adapter.route(self.routing, x, domain, expert)
        for layer in self.layers:
            x = self.dropout(torch.relu_(layer(x, routing)))
        return x
