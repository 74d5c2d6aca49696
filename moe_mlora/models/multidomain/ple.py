"""PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020), per domain.

Stacked CGC levels. At each level every domain has ``specific_experts`` experts of its own
and all domains share ``shared_experts``; a domain's gate mixes its own and the shared
experts, and feeds its next level. Below the last level a shared gate mixes the shared
experts with the row's own domain's experts for the shared branch of the next level (a row
belongs to one domain, so the other domains' experts have nothing to add for it). Each
domain's tower MLP reads its last gate's output.

Defaults: 2 levels with expert widths = the backbone's hidden units but the last (256, 128),
1 shared and 1 specific expert per level (the paper's small settings), towers = the last
unit (64). Per-domain parts run through :class:`DomainGroups` (each row only meets its own
domain's experts, gates and tower).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.models.layers import Dropout
from moe_mlora.models.multidomain.base import (
    DomainGroups,
    DomainMLP,
    MultiDomainTower,
    StackedLinear,
    linear_init,
)
from moe_mlora.models.multidomain.mmoe import DomainGates, mix


class CGCLevel(nn.Module):
    """One level: shared and per-domain experts (one Linear + ReLU each), per-domain gates."""

    def __init__(
        self, num_domains: int, in_features: int, width: int, shared: int, specific: int,
        dropout: float, last: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.specific, self.width = specific, width
        self.shared_experts = StackedLinear(shared, in_features, width)
        self.domain_weight = nn.Parameter(torch.empty(num_domains, in_features, specific * width))
        self.domain_bias = nn.Parameter(torch.empty(num_domains, specific * width))
        linear_init(self.domain_weight, self.domain_bias, in_features)
        self.gates = DomainGates(num_domains, in_features, shared + specific)
        self.shared_gate = None if last else nn.Linear(in_features, shared + specific)
        self.dropout = Dropout(dropout)

    def forward(
        self, shared_in: Tensor, domain_in: Tensor, groups: DomainGroups
    ) -> tuple[Tensor, Tensor | None]:
        shared = torch.relu(self.shared_experts(shared_in))  # [B, S, w]
        own = torch.relu(groups.linear(domain_in, self.domain_weight, self.domain_bias))
        own = own.view(-1, self.specific, self.width)  # [B, P, w]
        experts = torch.cat([shared, own], 1)  # [B, S + P, w]
        domain_out = self.dropout(mix(self.gates(domain_in, groups), experts))
        if self.shared_gate is None:
            return domain_out, None
        weights = torch.softmax(self.shared_gate(shared_in), dim=-1)
        return domain_out, self.dropout(mix(weights, experts))

    def domain_parameters(self) -> list[nn.Parameter]:
        return [self.domain_weight, self.domain_bias, *self.gates.parameters()]


class PLE(MultiDomainTower):
    def __init__(
        self,
        num_domains: int,
        input_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        expert_units: Sequence[int] | None = None,
        shared_experts: int = 1,
        specific_experts: int = 1,
        tower_units: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_domains, input_dim)
        if shared_experts < 1 or specific_experts < 1:
            raise ValueError(
                f"ple shared_experts and specific_experts must be >= 1, got "
                f"{shared_experts} and {specific_experts}"
            )
        widths = list(hidden_units[:-1] if expert_units is None else expert_units) or [input_dim]
        tower_units = list(hidden_units[-1:] if tower_units is None else tower_units)
        dims = [input_dim, *widths]
        self.levels = nn.ModuleList(
            CGCLevel(num_domains, i, o, shared_experts, specific_experts, dropout,
                     last=level == len(widths) - 1)
            for level, (i, o) in enumerate(itertools.pairwise(dims))
        )  # fmt: skip
        self.towers = DomainMLP(num_domains, widths[-1], tower_units, dropout)
        self.output_dim = self.towers.output_dim

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        groups = DomainGroups(domain, self.num_domains)
        shared, own = x, x
        for level in self.levels:
            own, shared = level(shared, own, groups)
        return self.towers(own, groups)

    def domain_parameters(self) -> list[nn.Parameter]:
        parts = [p for level in self.levels for p in level.domain_parameters()]
        return [*parts, *self.towers.parameters()]
