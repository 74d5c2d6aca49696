"""The MoE gate: its options, the gate over experts, top-k, the balance loss, own-expert routing.

One gate is shared by all tower layers of a MoE-MLoRA model; :mod:`.adapters` asks it for the
mixture weights once per forward (routing "mixture").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

GATE_INPUTS = ("domain", "domain_features")


def check_positive(key: str, value: int | None, fix: str) -> None:
    """A size option (``adapter.<key>``) that is set must be >= 1; the error says how to fix it."""
    if value is not None and value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}; set adapter.{key} >= 1 ({fix})")


@dataclass
class GateConfig:
    """The MoE gate's options (``method.adapter.gate`` in the config).

    ``input``: "domain" (the reference: a dense layer over a learned domain
    embedding) or "domain_features" (that embedding concatenated with the
    tower input). ``embedding_dim``: size of the domain embedding.
    ``top_k``: each sample uses only its k largest gate weights, renormalised
    to sum to 1; ``None`` (or k = E) is the dense softmax of the reference.
    ``balance_loss_weight``: weight of the load-balancing loss
    (:func:`balance_loss`) added to the gate phase's loss; 0 turns it off.
    ``anchored``: the gate's weights are ``own_d + s_d (softmax(...) - own_d)``,
    ``own_d`` the domain's own-expert routing and ``s_d`` a learned per-domain
    share that starts at 0 (see :class:`Gate`); ``top_k`` then applies to the softmax
    part, so a row may use its own experts besides the k chosen. Schedules that start
    the gate at the own-expert routing (``init: gate_own_experts``) turn it on themselves.
    """

    input: str = "domain"
    embedding_dim: int = 8
    top_k: int | None = None
    balance_loss_weight: float = 0.0
    anchored: bool = False

    def __post_init__(self) -> None:
        if self.input not in GATE_INPUTS:
            raise ValueError(
                f"gate.input must be one of {list(GATE_INPUTS)}, got {self.input!r}; "
                f"set adapter.gate.input to one of them"
            )
        check_positive("gate.embedding_dim", self.embedding_dim, "e.g. 8")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(
                f"gate.top_k must be an integer >= 1 or null, got {self.top_k!r}; "
                f"set adapter.gate.top_k in 1..experts (null: dense softmax)"
            )
        weight = self.balance_loss_weight
        if isinstance(weight, bool) or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"gate.balance_loss_weight must be a finite number >= 0, got {weight!r}; "
                f"set adapter.gate.balance_loss_weight >= 0 (0: no balance loss)"
            )

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> GateConfig:
        """A GateConfig from a mapping (YAML block), rejecting keys it does not know."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in spec if k not in known)
        if unknown:
            raise ValueError(
                f"unknown gate key(s) {', '.join(f'gate.{k}' for k in unknown)}; "
                f"adapter.gate takes {', '.join(known)}"
            )
        return cls(**{str(k): v for k, v in spec.items()})

    def check_experts(self, num_experts: int) -> None:
        """top_k needs at least k experts: check once E is known."""
        if self.top_k is not None and self.top_k > num_experts:
            raise ValueError(
                f"gate.top_k must be in 1..{num_experts} (the number of experts), "
                f"got {self.top_k}; lower adapter.gate.top_k or raise experts"
            )

    def effective_top_k(self, num_experts: int) -> int | None:
        """k, or None when every expert is kept (k = E is exactly the dense softmax)."""
        return None if self.top_k is None or self.top_k >= num_experts else self.top_k


class Gate(nn.Module):
    """Gate over E experts from a learned domain embedding (and optionally the tower input).

    With ``input_dim == 0`` (gate input "domain", the reference) the weights
    depend on the domain only, so they are computed (softmax and top-k) on the
    ``[D, E]`` table of the D domains and gathered per sample. Otherwise (gate
    input "domain_features") the domain embedding is concatenated with the
    tower input ``[B, input_dim]``. ``top_k`` keeps each row's k largest
    weights, renormalised (``None``: the dense softmax).

    ``anchored``: the weights become ``own_d + s_d (g - own_d)``, ``g`` the
    weights above, ``own_d`` the fixed own-expert routing of domain ``d`` (1/k on
    each of its k experts, :func:`own_expert_routing`) and ``s_d`` a learned
    per-domain share. The share starts at 0, so the mixture model is *exactly*
    the model with each domain on its own experts (a softmax cannot start
    exactly one-hot; this form can). The weights always sum to 1. ``s_d`` in
    (0, 1] moves domain d towards the gate's mixture; it is not clamped, because
    a clamp at 0 would stop its gradient for good the first time a step pushed it
    below: a negative ``s_d`` instead weighs the domain's own experts above 1
    and the others below 0, a learned scaling of the own adapter.
    """

    def __init__(
        self,
        num_domains: int,
        num_experts: int,
        embedding_dim: int,
        input_dim: int = 0,
        top_k: int | None = None,
        anchored: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.top_k = top_k
        self.domain_embedding = nn.Embedding(num_domains, embedding_dim)
        self.proj = nn.Linear(embedding_dim + input_dim, num_experts)
        self.anchored = anchored
        if anchored:
            self.register_buffer("own", own_expert_routing(num_domains, num_experts))
            self.share = nn.Parameter(torch.zeros(num_domains))

    def reset_to_own_experts(self) -> None:
        """Anchored gates only: share 0, so every domain routes to its own experts exactly."""
        if not self.anchored:
            raise ValueError("only an anchored gate (gate.anchored=true) starts at own experts")
        with torch.no_grad():
            self.share.zero_()

    def reset_near_uniform(self) -> None:
        """The reference's random gate: embedding U(-0.05, 0.05), Glorot weights, zero bias.

        Its softmax is close to 1/E everywhere (the authors' gate never trains).
        """
        with torch.no_grad():
            nn.init.uniform_(self.domain_embedding.weight, -0.05, 0.05)
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            if self.anchored:
                self.share.fill_(1.0)

    def _anchor(self, weights: Tensor, domain_rows: Tensor | slice) -> Tensor:
        own = self.own[domain_rows]
        return own + self.share[domain_rows].unsqueeze(-1) * (weights - own)

    def route(self, domain: Tensor, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(weights, probabilities)``, both ``[B, E]``: the routing weights (top-k
        applied, anchored if the gate is) and the dense softmax they come from (what
        the balance loss needs)."""
        if self.input_dim == 0:
            probs = torch.softmax(self.proj(self.domain_embedding.weight), dim=-1)  # [D, E]
            weights = top_k_weights(probs, self.top_k)
            if self.anchored:
                weights = self._anchor(weights, slice(None))
            # index_select: its backward (index_add_) is deterministic; weights[domain]'s is not
            return weights.index_select(0, domain), probs.index_select(0, domain)
        if features is None:
            raise ValueError("this gate (gate.input='domain_features') needs the tower input")
        inputs = torch.cat((self.domain_embedding(domain), features), dim=1)
        probs = torch.softmax(self.proj(inputs), dim=-1)
        weights = top_k_weights(probs, self.top_k)
        if self.anchored:
            weights = self._anchor(weights, domain)
        return weights, probs

    def forward(self, domain: Tensor, features: Tensor | None = None) -> Tensor:
        """The routing weights ``[B, E]``: each row sums to 1, at most k nonzero."""
        return self.route(domain, features)[0]


def top_k_weights(probs: Tensor, k: int | None) -> Tensor:
    """Keep each row's k largest probabilities, renormalised to sum to 1; zeros elsewhere.

    Batched (``topk`` + ``scatter``), no loop over experts. ``None`` returns
    ``probs`` unchanged. Renormalising equals a softmax over the k chosen
    logits, so with k = 1 the weight is exactly 1 and carries no gradient to
    the gate (only the balance loss then trains it).
    """
    if k is None or k >= probs.shape[-1]:
        return probs
    values, index = probs.topk(k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, index, values)


def balance_loss(weights: Tensor, probs: Tensor) -> Tensor:
    """Load-balancing loss ``E * sum_e f_e * P_e`` over a batch (Switch Transformer's form).

    ``f_e = mean_b weights[b, e]``: the fraction of the batch's routing mass
    sent to expert e (after top-k; with k = 1 the fraction of samples routed
    to e, Switch's f). ``P_e = mean_b probs[b, e]``: the mean dense gate
    probability. Both sum to 1 over e, so the loss is 1 when routing is
    uniform (its minimum for the dense gate, where f = P and the loss is
    ``E * sum_e P_e^2 >= 1``) and E when everything goes to one expert.
    Gradients flow through both factors. (Switch's f is a count, so it gets
    none; for the dense gate that would only halve the gradient, with the
    same minimum.)
    """
    num_experts = weights.shape[-1]
    return num_experts * (weights.mean(dim=0) * probs.mean(dim=0)).sum()


def own_expert_routing(num_domains: int, num_experts: int) -> Tensor:
    """``[D, E]``: each domain's weight on its own experts (1/k on each of its k experts).

    The experts of domain ``d`` are those phase 2 assigns to it
    (:func:`~moe_mlora.data.batches.expert_assignment`): ``e mod D == d`` when
    ``E >= D``, else the single expert ``d mod E``.
    """
    table = torch.zeros(num_domains, num_experts)
    for domain in range(num_domains):
        if num_experts >= num_domains:
            table[domain, domain::num_domains] = 1.0
        else:
            table[domain, domain % num_experts] = 1.0
    return table / table.sum(dim=1, keepdim=True)
