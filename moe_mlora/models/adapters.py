"""Adapters of the DNN tower's Linear layers: none, MLoRA, MoE-MLoRA.

An adapted layer computes ``h = W x + b + sum_e w[b, e] (B_e A_e x + b_e)``
(LoRA's column-vector notation: ``A_e`` maps in -> r, ``B_e`` maps r -> out).
The adapter has two halves, kept apart so that no backbone ever sees them:

* per tower layer, a bank of LoRA experts (:class:`LoRAExperts`) held by that
  layer (:class:`AdaptedLinear`);
* once per forward, the mixture weights ``w [B, E]`` saying how much each
  sample uses each expert (:meth:`Adapter.mixture_weights`), shared by every
  layer of the tower. Which weights depends on the *routing*:

  ========== ============================================ ==============
  routing    w                                            adapters
  ========== ============================================ ==============
  "off"      none: backbone only                          all
  "domain"   one_hot(domain, D)                           mlora
  "expert"   one_hot(expert, E), no gate                  mlora, moe
  "mixture"  softmax gate, one gate for all layers        moe
  ========== ============================================ ==============

MLoRA is the special case "one expert per domain, routed by domain". A new
adapter (say a top-k gate) is one more :class:`Adapter` subclass and an entry
in :data:`ADAPTERS`; neither the tower nor any backbone changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTINGS = ("off", "domain", "expert", "mixture")
GATE_INPUTS = ("domain", "domain_features")


@dataclass
class AdapterConfig:
    """Which adapter the tower's Linear layers carry, and its sizes.

    ``kind``: "none" (base model), "mlora" (one LoRA per domain) or "moe"
    (``experts`` LoRA experts mixed by a gate). Rank per layer is
    ``max(1, out_features // lora_reduce)`` unless ``lora_rank`` fixes it.
    ``experts`` is the MoE expert count E (default: the number of domains);
    MLoRA ignores it. ``gate_input``: "domain" (the reference: a dense layer
    over a learned domain embedding) or "domain_features" (domain embedding
    concatenated with the tower input).
    """

    kind: str = "none"
    lora_reduce: int = 32
    lora_rank: int | None = None
    experts: int | None = None
    gate_input: str = "domain"
    gate_embedding_dim: int = 8

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(
                f"kind must be one of {sorted(ADAPTERS)}, got {self.kind!r}; "
                f"set adapter.kind to one of them"
            )
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(
                f"gate_input must be one of {list(GATE_INPUTS)}, got {self.gate_input!r}; "
                f"set adapter.gate_input to one of them"
            )
        _check_positive("lora_reduce", self.lora_reduce, "e.g. 32 (MovieLens) or 256 (Taobao)")
        _check_positive("lora_rank", self.lora_rank, "or leave it unset to use lora_reduce")
        _check_positive("experts", self.experts, "or leave it unset for one per domain")
        _check_positive("gate_embedding_dim", self.gate_embedding_dim, "e.g. 8")

    def rank(self, out_features: int) -> int:
        """LoRA rank of a layer with ``out_features`` outputs."""
        if self.lora_rank is not None:
            return self.lora_rank
        return max(1, out_features // self.lora_reduce)


def _check_positive(key: str, value: int | None, fix: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}; set adapter.{key} >= 1 ({fix})")


class LoRAExperts(nn.Module):
    """E LoRA experts of one Linear layer: ``A_e``, ``B_e``, ``b_e [out]``.

    The expert computes ``(x A_e^T) B_e + b_e``. ``A_e`` is stored ``[r, in]``
    (as ``nn.Linear.weight`` and PEFT's ``lora_A``) because ``F.linear(x, A)``
    is ~2.5x faster on CPU than ``x @ A`` with a row-major ``[in, r]`` matrix,
    forward and backward; ``B_e`` is stored ``[r, out]`` (layout does not
    matter there). Each expert's tensors are separate parameters, so phase 2
    can give every expert its own optimizer state, freeze one, or leave its
    grad ``None``. ``forward`` concatenates them and mixes all experts with two
    matrix products (no Python loop over experts). Init as LoRA:
    ``kaiming_uniform(a=sqrt(5))`` for ``A``, zeros for ``B`` and ``b``, so a
    fresh adapter adds exactly zero.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank = num_experts, rank
        self.A = nn.ParameterList(torch.empty(rank, in_features) for _ in range(num_experts))
        self.B = nn.ParameterList(torch.zeros(rank, out_features) for _ in range(num_experts))
        self.bias = nn.ParameterList(torch.zeros(out_features) for _ in range(num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a, b, bias in zip(self.A, self.B, self.bias, strict=True):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
            nn.init.zeros_(bias)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.A[expert], self.B[expert], self.bias[expert]]

    def forward(self, x: Tensor, weights: Tensor, base: Tensor) -> Tensor:
        """``base + sum_e weights[:, e] * (x A_e B_e + b_e)``.

        ``x [B, in]``, ``weights [B, E]``, ``base [B, out]`` (the base Linear's
        output). Out-of-place ``addmm`` rather than ``addmm_``: autocast (AMP)
        covers it, and the ``[B, out]`` copy it costs is small.

        The per-sample weight scales the rank-r code ``x A_e^T`` (``[B, E, r]``);
        codes and weights then go through ``[B_cat; bias]`` in one product.
        """
        n, e, r = x.shape[0], self.num_experts, self.rank
        a_cat = torch.cat(tuple(self.A), dim=0)  # [E*r, in]
        code = F.linear(x, a_cat).view(n, e, r) * weights.unsqueeze(-1)  # [B, E, r]
        mixed_in = torch.cat((code.view(n, e * r), weights), dim=1)  # [B, E*r + E]
        mix = torch.cat((*self.B, torch.stack(tuple(self.bias))), dim=0)  # [E*r + E, out]
        return torch.addmm(base, mixed_in, mix)


class AdaptedLinear(nn.Module):
    """``nn.Linear`` plus an optional bank of LoRA experts.

    The base layer is always ``self.linear``, so its state-dict keys
    (``linear.weight``, ``linear.bias``) are the same for every adapter kind
    and a base model's weights load into an adapted model unchanged.
    """

    def __init__(self, in_features: int, out_features: int, lora: LoRAExperts | None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.lora = lora

    def forward(self, x: Tensor, weights: Tensor | None) -> Tensor:
        h = self.linear(x)
        if weights is None or self.lora is None:
            return h
        return self.lora(x, weights, h)


class Gate(nn.Module):
    """Softmax over E experts from a learned domain embedding (and optionally the tower input).

    With ``input_dim == 0`` (gate_input "domain", the reference) the weights
    depend on the domain only, so they are computed for the D domains and
    gathered per sample. Otherwise (gate_input "domain_features") the domain
    embedding is concatenated with the tower input ``[B, input_dim]``.
    """

    def __init__(
        self, num_domains: int, num_experts: int, embedding_dim: int, input_dim: int = 0
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.domain_embedding = nn.Embedding(num_domains, embedding_dim)
        self.proj = nn.Linear(embedding_dim + input_dim, num_experts)

    def forward(self, domain: Tensor, features: Tensor | None = None) -> Tensor:
        if self.input_dim == 0:
            per_domain = torch.softmax(self.proj(self.domain_embedding.weight), dim=-1)
            return per_domain[domain]
        if features is None:
            raise ValueError("this gate (gate_input='domain_features') needs the tower input")
        inputs = torch.cat((self.domain_embedding(domain), features), dim=1)
        return torch.softmax(self.proj(inputs), dim=-1)


def one_hot(index: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[B]`` int64 -> ``[B, num_classes]`` in ``dtype``.

    A scatter rather than ``F.one_hot``: no int64 intermediate and no host sync
    on GPU. Out-of-range indices raise on CPU (device assert on GPU).
    """
    out = torch.zeros(index.shape[0], num_classes, dtype=dtype, device=index.device)
    return out.scatter_(1, index.unsqueeze(1), 1.0)


class Adapter(nn.Module):
    """What the tower needs from an adapter: experts per layer, mixture weights per forward.

    This base class is the "none" adapter: no experts, routing "off" only.
    Subclasses set ``kind``, ``routings``, ``default_routing`` and ``num_experts``,
    create experts in :meth:`make_experts`, and may own a gate; their
    parameters (the gate) are the model's gate parameters.
    """

    kind = "none"
    routings: tuple[str, ...] = ("off",)
    default_routing = "off"

    def __init__(self, config: AdapterConfig, num_domains: int, tower_input_dim: int) -> None:
        super().__init__()
        self.config = config
        self.num_domains = num_domains
        self.num_experts = 0

    def check_routing(self, routing: str) -> None:
        if routing not in self.routings:
            raise ValueError(
                f"routing must be one of {list(self.routings)} for adapter kind {self.kind!r}, "
                f"got {routing!r}"
            )

    def make_experts(self, in_features: int, out_features: int) -> LoRAExperts | None:
        if self.num_experts == 0:
            return None
        rank = self.config.rank(out_features)
        return LoRAExperts(in_features, out_features, self.num_experts, rank)

    def gate_weights(self, tower_input: Tensor, domain: Tensor) -> Tensor:
        raise ValueError(f"adapter kind {self.kind!r} has no gate; gate weights need kind 'moe'")

    def mixture_weights(
        self, routing: str, tower_input: Tensor, domain: Tensor, expert: Tensor | None
    ) -> Tensor | None:
        """``[B, E]`` weights of the experts for this batch, or ``None`` when routing is off."""
        self.check_routing(routing)
        if routing == "off":
            return None
        if routing == "domain":
            return one_hot(domain, self.num_experts, tower_input.dtype)
        if routing == "expert":
            if expert is None:
                raise ValueError(
                    "routing 'expert' needs the expert of every sample: "
                    "call model(sparse, domain, expert=LongTensor[B])"
                )
            return one_hot(expert, self.num_experts, tower_input.dtype)
        return self.gate_weights(tower_input, domain)


class NoAdapter(Adapter):
    """The base model: plain Linear layers."""


class MLoRAAdapter(Adapter):
    """MLoRA: one LoRA adapter per domain, each sample uses its domain's."""

    kind = "mlora"
    routings = ("off", "domain", "expert")
    default_routing = "domain"

    def __init__(self, config: AdapterConfig, num_domains: int, tower_input_dim: int) -> None:
        super().__init__(config, num_domains, tower_input_dim)
        self.num_experts = num_domains


class MoEAdapter(Adapter):
    """MoE-MLoRA: E LoRA experts mixed by one softmax gate shared by all tower layers."""

    kind = "moe"
    routings = ("off", "expert", "mixture")
    default_routing = "mixture"

    def __init__(self, config: AdapterConfig, num_domains: int, tower_input_dim: int) -> None:
        super().__init__(config, num_domains, tower_input_dim)
        self.num_experts = config.experts if config.experts is not None else num_domains
        gate_dim = tower_input_dim if config.gate_input == "domain_features" else 0
        self.gate = Gate(num_domains, self.num_experts, config.gate_embedding_dim, gate_dim)

    def gate_weights(self, tower_input: Tensor, domain: Tensor) -> Tensor:
        return self.gate(domain, tower_input)


ADAPTERS: dict[str, type[Adapter]] = {"none": NoAdapter, "mlora": MLoRAAdapter, "moe": MoEAdapter}


def build_adapter(config: AdapterConfig, num_domains: int, tower_input_dim: int) -> Adapter:
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    return ADAPTERS[config.kind](config, num_domains, tower_input_dim)
