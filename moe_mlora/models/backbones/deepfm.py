"""DeepFM (Guo et al. 2017), DeepCTR-Torch's math.

``logit = first-order linear + FM(embeddings) + Linear(tower(flat embeddings))``.
The output Linear has no bias (the first-order part holds it) and is not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import FactorizationMachine, FirstOrderLinear
from moe_mlora.models.multidomain import TowerConfig


class DeepFM(CTRModel):
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
        self.linear = FirstOrderLinear(fields)
        self.fm = FactorizationMachine()
        self.tower = self.make_tower(self.embeddings.output_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.linear(sparse) + self.fm(embeddings) + self.out(deep).squeeze(1)
