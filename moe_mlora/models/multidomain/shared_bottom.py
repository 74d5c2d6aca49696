"""Shared-Bottom (Caruana, "Multitask Learning", Machine Learning 28, 1997), per domain.

A bottom MLP shared by every domain, then one tower MLP per domain; a row goes through its
own domain's tower. Defaults: bottom = the backbone's hidden units but the last
(256, 128), towers = the last (64), dropout as the backbone's. Parameters per domain: one
tower. This is the usual multi-domain reading of the multi-task original (domains as tasks,
each row scored by its own domain's head), as in Scenario-Wise-Rec's benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.models.multidomain.base import DomainGroups, DomainMLP, MultiDomainTower
from moe_mlora.models.tower import Tower


class SharedBottom(MultiDomainTower):
    def __init__(
        self,
        num_domains: int,
        input_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        bottom_units: Sequence[int] | None = None,
        tower_units: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_domains, input_dim)
        bottom_units = list(hidden_units[:-1] if bottom_units is None else bottom_units)
        tower_units = list(hidden_units[-1:] if tower_units is None else tower_units)
        self.bottom = Tower(input_dim, bottom_units, dropout, self.adapter)
        self.towers = DomainMLP(num_domains, self.bottom.output_dim, tower_units, dropout)
        self.output_dim = self.towers.output_dim

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        return self.towers(self.bottom(x, domain), DomainGroups(domain, self.num_domains))

    def domain_parameters(self) -> list[nn.Parameter]:
        return list(self.towers.parameters())
