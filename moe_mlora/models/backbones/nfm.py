"""NFM (He & Chua 2017), DeepCTR-Torch's math.

``logit = first-order linear + Linear(tower(dropout(bi(e))))`` where
``bi(e) = sum_{i<j} e_i * e_j`` is the bi-interaction pooling (``[B, dim]``).
The tower reads the pooled vector, not the flat embeddings; the adapter lives
in the tower's Linear layers. Output Linear without bias (the linear part holds it).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import BiInteractionPooling, Dropout, FirstOrderLinear
from moe_mlora.models.multidomain import TowerConfig


class NFM(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        bi_dropout: float = 0.0,
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        self.linear = FirstOrderLinear(fields)
        self.bi_pooling = BiInteractionPooling()
        self.bi_dropout = Dropout(bi_dropout)
        self.tower = self.make_tower(embedding_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)

    def tower_input(self, embeddings: Tensor) -> Tensor:
        return self.bi_dropout(self.bi_pooling(embeddings))

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.linear(sparse) + self.out(deep).squeeze(1)
