"""Plain MLP: ``logit = Linear(tower(flat embeddings))``; the output Linear is not adapted."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.multidomain import TowerConfig


class MLP(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        self.tower = self.make_tower(self.embeddings.output_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.out(deep).squeeze(1)
