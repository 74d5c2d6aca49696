"""The CTR model base class: ``embeddings -> (interaction parts, DNN tower) -> logit``.

A backbone subclass declares its interaction parts and the tower in
``__init__`` and says how they combine in :meth:`CTRModel.head` (and, if its
tower does not read the flat embeddings, in :meth:`CTRModel.tower_input`).
Everything about adapters lives in the tower: routing, the gate, the expert
parameters. The parameter groups below are what the training phases freeze
and optimise.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig, build_adapter
from moe_mlora.models.features import FieldEmbeddings
from moe_mlora.models.multidomain import DNN, MultiDomainTower, TowerConfig, build_tower
from moe_mlora.models.tower import Tower


class CTRModel(nn.Module):
    """Base of every backbone. ``forward(sparse, domain, expert=None)`` returns logits ``[B]``.

    ``routing`` ("off" | "domain" | "expert" | "mixture") is a settable
    attribute, validated against the adapter kind; defaults: none -> "off",
    mlora -> "domain", moe -> "mixture".
    """

    tower: Tower | MultiDomainTower  # set by every subclass through make_tower

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int,
        tower: TowerConfig | None = None,
    ) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.adapter_config = adapter
        self.tower_config = tower or TowerConfig()
        if self.tower_config.kind != DNN and adapter.kind != "none":
            raise ValueError(
                f"tower.kind={self.tower_config.kind} is a multi-domain structure of its own; "
                f"it takes no adapter (adapter.kind={adapter.kind}): use adapter.kind=none"
            )
        self.embeddings = FieldEmbeddings(fields, embedding_dim)
        self.frozen_experts: frozenset[int] = frozenset()  # set by set_trainable: Adam skips them

    def make_tower(
        self, input_dim: int, hidden_units: Sequence[int], dropout: float
    ) -> Tower | MultiDomainTower:
        """The DNN tower carrying the configured adapter, or the configured multi-domain tower
        (``method.tower.kind``: shared_bottom, mmoe, ple, star, pepnet) in its place."""
        if self.tower_config.kind != DNN:
            shape = (self.embeddings.num_fields, self.embeddings.dim)
            return build_tower(
                self.tower_config, self.num_domains, input_dim, hidden_units, dropout, shape
            )
        adapter = build_adapter(self.adapter_config, self.num_domains, input_dim)
        return Tower(input_dim, hidden_units, dropout, adapter)

    # -- what a backbone defines -------------------------------------------------
    def tower_input(self, embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> the tower's input; by default the flat embeddings."""
        return FieldEmbeddings.flat(embeddings)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        """Combine the interaction parts and the tower output ``deep`` into logits ``[B]``."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------
    def forward(self, sparse: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        """Logits ``[B]`` (no sigmoid). ``expert [B]`` is needed only with routing "expert"."""
        embeddings = self.embeddings(sparse)
        gated = embeddings
        gate = getattr(self.tower, "embedding_gate", None)  # PEPNet's EPNet
        if gate is not None:
            gated = gate(embeddings, domain)
            if getattr(self.tower, "embedding_gate_scope", "all") == "all":
                embeddings = gated  # every part reads them, not the tower alone
        tower_input = self.tower_input(gated)
        logits = self.head(sparse, embeddings, self.tower(tower_input, domain, expert))
        offset = getattr(self.tower, "logit_offset", None)  # STAR's auxiliary network
        return logits if offset is None else logits + offset(tower_input, domain)

    def gate_weights(self, sparse: Tensor, domain: Tensor) -> Tensor:
        """MoE only: the gate's softmax weights ``[B, E]`` (whatever the routing)."""
        tower_input = self.tower_input(self.embeddings(sparse))
        return self.tower.adapter.gate_weights(tower_input, domain)

    # -- routing -----------------------------------------------------------------
    @property
    def routing(self) -> str:
        return self.tower.routing

    @routing.setter
    def routing(self, value: str) -> None:
        self.tower.adapter.check_routing(value)
        self.tower.routing = value

    @property
    def num_experts(self) -> int:
        """0 for none, the number of domains for mlora, E for moe."""
        return self.tower.adapter.num_experts

    # -- parameter groups (the training phases freeze and optimise these) --------
    def expert_parameters(self) -> list[nn.Parameter]:
        """The LoRA experts' parameters across all tower layers: ``A``, ``B`` and ``bias`` of
        each layer, every one stacked over the experts (``[E, ...]``)."""
        return [p for bank in self._expert_banks() for p in bank.parameters()]

    def expert_tensors(self, expert: int) -> list[Tensor]:
        """Expert ``expert``'s slices of :meth:`expert_parameters` (views: writes go through).

        For MLoRA, expert ``d`` is domain ``d``'s adapter.
        """
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        return [t for bank in self._expert_banks() for t in bank.expert_tensors(expert)]

    def _expert_banks(self) -> list[nn.Module]:
        return [layer.lora for layer in self.tower.layers if layer.lora is not None]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate's parameters (empty unless the adapter is MoE)."""
        return list(self.tower.adapter.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is neither an expert's nor the gate's."""
        adapter_ids = {id(p) for p in self.expert_parameters() + self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in adapter_ids]

    def domain_parameters(self) -> list[nn.Parameter]:
        """A multi-domain tower's per-domain parts (trained with the backbone); else none."""
        parts = getattr(self.tower, "domain_parameters", None)
        return parts() if parts is not None else []

    def parameter_counts(self) -> dict[str, int]:
        """Element counts: ``backbone``, ``adapter`` (all experts, or a multi-domain tower's
        per-domain parts), ``gate``, ``total``.

        Frozen pretrained tables are buffers, not parameters, so not counted.
        """
        per_domain = self.expert_parameters() + self.domain_parameters()
        shared = {id(p) for p in per_domain}
        counts = {
            "backbone": _numel([p for p in self.backbone_parameters() if id(p) not in shared]),
            "adapter": _numel(per_domain),
            "gate": _numel(self.gate_parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts


def _numel(parameters: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)
