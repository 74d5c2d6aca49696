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
options (input, top-k, load-balancing loss) live in :class:`GateConfig` and
:class:`Gate`; a new adapter is one more :class:`Adapter` subclass and an
entry in :data:`ADAPTERS`. Neither the tower nor any backbone changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from moe_mlora.models.lora import ExpertRows, LoRAExperts, static_shapes

ROUTINGS = ("off", "domain", "expert", "mixture")
GATE_INPUTS = ("domain", "domain_features")
PRODUCTS = ("auto", "dense", "rows")
# products=auto computes each row's own experts only (the rows path) from this many experts
# on (one expert per row; a gate's top-k); below it the dense path's two large GEMMs are as
# fast or faster. Measured on 2 CPU threads, DeepFM tower 256-128-64, batch 1024
# (python -m moe_mlora.bench scaling, experiments/scaling.md).
ROWS_FROM_EXPERTS = 8
ROWS_FROM_EXPERTS_TOP_K = 32


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
        _check_positive("gate.embedding_dim", self.embedding_dim, "e.g. 8")
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
        _check_positive("lora_reduce", self.lora_reduce, "e.g. 32 (MovieLens) or 256 (Taobao)")
        _check_positive("lora_rank", self.lora_rank, "or leave it unset to use lora_reduce")
        _check_positive("experts", self.experts, "or leave it unset for one per domain")
        if self.kind == "moe" and self.experts is not None:
            self.gate.check_experts(self.experts)

    def rank(self, out_features: int) -> int:
        """LoRA rank of a layer with ``out_features`` outputs."""
        if self.lora_rank is not None:
            return self.lora_rank
        return max(1, out_features // self.lora_reduce)


def _check_positive(key: str, value: int | None, fix: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}; set adapter.{key} >= 1 ({fix})")


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
            return weights[domain], probs[domain]
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
