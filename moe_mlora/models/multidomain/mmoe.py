"""MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018), per domain.

``experts`` shared expert MLPs read the tower input; each domain has its own softmax gate
(a Linear layer over the same input) that mixes them, and its own tower MLP on the mixture.
Defaults: 4 experts (the paper uses 4 to 8), each expert = the backbone's hidden units but
the last (256, 128; one layer of the input's width when the backbone has one hidden layer),
towers = the last (64). All experts run on every row (one stacked
product); the gate and tower of a row are its domain's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.models.lora import static_shapes
from moe_mlora.models.multidomain.base import (
    DomainGroups,
    DomainMLP,
    MultiDomainTower,
    StackedMLP,
    linear_init,
)


class DomainGates(nn.Module):
    """One softmax gate per domain over ``choices`` inputs: ``[B, in]`` -> ``[B, choices]``."""

    def __init__(self, num_domains: int, in_features: int, choices: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_domains, in_features, choices))
        self.bias = nn.Parameter(torch.empty(num_domains, choices))
        linear_init(self.weight, self.bias, in_features)

    def forward(self, x: Tensor, groups: DomainGroups) -> Tensor:
        return torch.softmax(groups.linear(x, self.weight, self.bias), dim=-1)


class _Mix(torch.autograd.Function):
    """``bmm(weights [B, 1, K], experts [B, K, h])`` with a cheaper gradient for the experts.

    The experts' gradient is an outer product per row (``weights^T grad``): autograd runs it
    as a ``bmm`` of B tiny matrices (~0.8 ms for ``[1024, 2, 256]`` on the CPU), where a
    broadcast multiply computes the same single products, bit for bit, several times faster.
    The weights' gradient keeps autograd's own ``bmm``.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, experts: Tensor) -> Tensor:
        ctx.save_for_backward(weights, experts)
        return torch.bmm(weights, experts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weights, experts = ctx.saved_tensors
        # Under autocast the forward's bmm ran in bf16 while the saved inputs (and the
        # gradient arriving) may each be float32 or bf16: compute in the gradient's dtype.
        weights, experts = weights.to(grad.dtype), experts.to(grad.dtype)
        grad_weights = grad_experts = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.bmm(grad, experts.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_experts = weights.transpose(1, 2) * grad
        return grad_weights, grad_experts


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """``weights [B, K]`` over ``experts [B, K, h]`` -> ``[B, h]``."""
    if static_shapes():  # a traced or exported graph: the plain product
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)
    return _Mix.apply(weights.unsqueeze(1), experts).squeeze(1)


class MMoE(MultiDomainTower):
    def __init__(
        self,
        num_domains: int,
        input_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        experts: int = 4,
        expert_units: Sequence[int] | None = None,
        tower_units: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_domains, input_dim)
        if experts < 1:
            raise ValueError(f"mmoe experts must be >= 1, got {experts}")
        # A one-layer backbone tower leaves no layer for the experts: one of the input's width
        # (as PLE's experts).
        expert_units = list(hidden_units[:-1] if expert_units is None else expert_units)
        expert_units = expert_units or [input_dim]
        tower_units = list(hidden_units[-1:] if tower_units is None else tower_units)
        self.experts = StackedMLP(experts, input_dim, expert_units, dropout)
        self.gates = DomainGates(num_domains, input_dim, experts)
        self.towers = DomainMLP(num_domains, self.experts.output_dim, tower_units, dropout)
        self.output_dim = self.towers.output_dim

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        groups = DomainGroups(domain, self.num_domains)
        mixed = mix(self.gates(x, groups), self.experts(x))
        return self.towers(mixed, groups)

    def domain_parameters(self) -> list[nn.Parameter]:
        return [*self.gates.parameters(), *self.towers.parameters()]
