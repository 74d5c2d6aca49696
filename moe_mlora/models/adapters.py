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
  "domain"   one_hot(domain mod E): the domain's own      mlora, moe
             expert (for MLoRA, E = D: its adapter)
  "expert"   one_hot(expert, E), no gate                  mlora, moe
  "mixture"  gate: softmax, or its top-k renormalised     moe
  ========== ============================================ ==============

MLoRA is the special case "one expert per domain, routed by domain". The gate
options (input, top-k, load-balancing loss) live in :mod:`.gate`
(:class:`GateConfig`, :class:`Gate`), the experts in :mod:`.lora`; a new
adapter is one more :class:`Adapter` subclass and an entry in :data:`ADAPTERS`.
Neither the tower nor any backbone changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_mlora.models.gate import (  # noqa: F401  (re-exported: the gate's home before)
    GATE_INPUTS,
    Gate,
    GateConfig,
    balance_loss,
    check_positive,
    own_expert_routing,
    top_k_weights,
)
from moe_mlora.models.lora import ExpertRows, LoRAExperts, static_shapes

ROUTINGS = ("off", "domain", "expert", "mixture")
PRODUCTS = ("auto", "dense", "rows")
# products=auto computes each row's own experts only (the rows path) from this many experts
# on (one expert per row; a gate's top-k); below it the dense path's two large GEMMs are as
# fast or faster. Measured on 2 CPU threads, DeepFM tower 256-128-64, batch 1024
# (python -m moe_mlora.bench scaling, experiments/scaling.md).
ROWS_FROM_EXPERTS = 8
ROWS_FROM_EXPERTS_TOP_K = 32


@dataclass
class AdapterConfig:
    """Which adapter the tower's Linear layers carry, and its sizes.

    ``kind``: "none" (base model), "mlora" (one LoRA per domain) or "moe"
    (``experts`` LoRA experts mixed by a gate). Rank per layer is
    ``max(1, out_features // lora_reduce)`` unless ``lora_rank`` fixes it.
    ``experts`` is the MoE expert count E (default: the number of domains);
    MLoRA ignores it. ``gate``: the MoE gate's options, a :class:`GateConfig`
    or a mapping of its fields (other kinds ignore it). ``products``: how the
    experts' products are computed when each row uses one expert or a gate's
    top-k (see :mod:`moe_mlora.models.lora`): "rows" (each row's own experts
    only), "dense" (every expert for every row, then weighted) or "auto" (rows
    on CPU from :data:`ROWS_FROM_EXPERTS` experts on, or
    :data:`ROWS_FROM_EXPERTS_TOP_K` for a top-k gate; dense otherwise). The
    results are the same up to float rounding; only speed differs.
    """

    kind: str = "none"
    lora_reduce: int = 32
    lora_rank: int | None = None
    experts: int | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    products: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(
                f"kind must be one of {sorted(ADAPTERS)}, got {self.kind!r}; "
                f"set adapter.kind to one of them"
            )
        if self.gate is None:
            self.gate = GateConfig()
        elif isinstance(self.gate, Mapping):
            self.gate = GateConfig.from_mapping(self.gate)
        elif not isinstance(self.gate, GateConfig):
            raise ValueError(
                f"gate must be a mapping of gate options, got {self.gate!r}; "
                f"write adapter.gate as a block (input, embedding_dim, top_k, balance_loss_weight)"
            )
        if self.products not in PRODUCTS:
            raise ValueError(
                f"products must be one of {list(PRODUCTS)}, got {self.products!r}; "
                f"set adapter.products to one of them (auto: chosen by speed)"
            )
        check_positive("lora_reduce", self.lora_reduce, "e.g. 32 (MovieLens) or 256 (Taobao)")
        check_positive("lora_rank", self.lora_rank, "or leave it unset to use lora_reduce")
        check_positive("experts", self.experts, "or leave it unset for one per domain")
        if self.kind == "moe" and self.experts is not None:
            self.gate.check_experts(self.experts)

    def rank(self, out_features: int) -> int:
        """LoRA rank of a layer with ``out_features`` outputs."""
        if self.lora_rank is not None:
            return self.lora_rank
        return max(1, out_features // self.lora_reduce)


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

    def forward(self, x: Tensor, routing: Tensor | ExpertRows | None) -> Tensor:
        h = self.linear(x)
        if routing is None or self.lora is None:
            return h
        return self.lora(x, routing, h)


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
        self._auxiliary_loss: Tensor | None = None  # set by the last forward, if any

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

    def mixture(self, tower_input: Tensor, domain: Tensor) -> Tensor:
        """Weights for routing "mixture"; adapters with a gate may record side results here."""
        return self.gate_weights(tower_input, domain)

    def auxiliary_loss(self) -> Tensor | None:
        """The last forward's auxiliary loss (unweighted), or None when it had none.

        Reset by every forward, so a value never outlives the batch it came from.
        """
        return self._auxiliary_loss

    @property
    def auxiliary_loss_weight(self) -> float:
        """Weight of :meth:`auxiliary_loss` in the loss of the phase that trains the gate."""
        return 0.0

    def sparse_top_k(self) -> int | None:
        """k when the "mixture" routing keeps only each row's k largest weights, else None."""
        return None

    def rows_path(self, tower_input: Tensor, top_k: bool = False) -> bool:
        """Whether a one-hot (or, ``top_k``, a top-k) routing takes the rows path
        (``AdapterConfig.products``). Never in a traced or exported graph: the rows
        path's tile shapes depend on the data."""
        products = self.config.products
        if products == "dense" or static_shapes():
            return False
        if products == "rows":
            return True
        threshold = ROWS_FROM_EXPERTS_TOP_K if top_k else ROWS_FROM_EXPERTS
        return tower_input.device.type == "cpu" and self.num_experts >= threshold

    def mixture_weights(
        self, routing: str, tower_input: Tensor, domain: Tensor, expert: Tensor | None
    ) -> Tensor | None:
        """``[B, E]`` weights of the experts for this batch, or ``None`` when routing is off."""
        routed = self._route(routing, tower_input, domain, expert, rows=False)
        assert not isinstance(routed, ExpertRows)
        return routed

    def route(
        self, routing: str, tower_input: Tensor, domain: Tensor, expert: Tensor | None
    ) -> Tensor | ExpertRows | None:
        """What the tower's layers take: as :meth:`mixture_weights`, or :class:`ExpertRows`
        when each row uses one expert or a gate's top-k and the rows path is chosen."""
        return self._route(routing, tower_input, domain, expert, rows=None)

    def _route(
        self,
        routing: str,
        tower_input: Tensor,
        domain: Tensor,
        expert: Tensor | None,
        rows: bool | None,
    ) -> Tensor | ExpertRows | None:
        """``rows``: False for dense weights always, None to choose by :meth:`rows_path`."""
        self.check_routing(routing)
        self._auxiliary_loss = None
        if routing == "off":
            return None
        if routing in ("domain", "expert"):
            index = self._one_expert(routing, domain, expert)
            if rows is None and self.rows_path(tower_input):
                return ExpertRows(index, self.num_experts)
            return one_hot(index, self.num_experts, tower_input.dtype)
        weights = self.mixture(tower_input, domain)
        k = self.sparse_top_k()
        if k is not None and rows is None and self.rows_path(tower_input, top_k=True):
            values, index = weights.topk(k, dim=-1)
            return ExpertRows(index, self.num_experts, values)
        return weights

    def _one_expert(self, routing: str, domain: Tensor, expert: Tensor | None) -> Tensor:
        """Each row's one expert: the domain's own (first) one, or the given ``expert``."""
        if routing == "domain":  # MLoRA: E = D, the domain's adapter
            return domain % self.num_experts
        if expert is None:
            raise ValueError(
                "routing 'expert' needs the expert of every sample: "
                "call model(sparse, domain, expert=LongTensor[B])"
            )
        return expert


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
    """MoE-MLoRA: E LoRA experts mixed by one gate shared by all tower layers.

    With ``gate.balance_loss_weight > 0`` every "mixture" forward records the
    batch's :func:`balance_loss`, read back by :meth:`Adapter.auxiliary_loss`,
    so the training step can add it without the backbone passing anything on.
    """

    kind = "moe"
    routings = ("off", "domain", "expert", "mixture")
    default_routing = "mixture"

    def __init__(self, config: AdapterConfig, num_domains: int, tower_input_dim: int) -> None:
        super().__init__(config, num_domains, tower_input_dim)
        self.num_experts = config.experts if config.experts is not None else num_domains
        gate = config.gate
        gate.check_experts(self.num_experts)
        # An anchored gate draws its init off the global random stream, so that the rest of
        # the model (backbone, experts) starts exactly as MLoRA's with the same seed: with one
        # expert per domain, a schedule's domain-routed phase then *is* an MLoRA run.
        with torch.random.fork_rng(devices=[], enabled=gate.anchored):
            self.gate = Gate(
                num_domains,
                self.num_experts,
                gate.embedding_dim,
                tower_input_dim if gate.input == "domain_features" else 0,
                gate.effective_top_k(self.num_experts),
                anchored=gate.anchored,
            )

    def gate_weights(self, tower_input: Tensor, domain: Tensor) -> Tensor:
        return self.gate(domain, tower_input)

    def sparse_top_k(self) -> int | None:
        """The gate's top-k, unless anchored (an anchored row may also use its own experts)."""
        return None if self.gate.anchored else self.gate.top_k

    def mixture(self, tower_input: Tensor, domain: Tensor) -> Tensor:
        if self.auxiliary_loss_weight == 0:
            return self.gate(domain, tower_input)
        weights, probs = self.gate.route(domain, tower_input)
        self._auxiliary_loss = balance_loss(weights, probs)
        return weights

    @property
    def auxiliary_loss_weight(self) -> float:
        return float(self.config.gate.balance_loss_weight)


ADAPTERS: dict[str, type[Adapter]] = {"none": NoAdapter, "mlora": MLoRAAdapter, "moe": MoEAdapter}


def build_adapter(config: AdapterConfig, num_domains: int, tower_input_dim: int) -> Adapter:
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    return ADAPTERS[config.kind](config, num_domains, tower_input_dim)
