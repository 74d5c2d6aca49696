"""Wide & Deep (Cheng et al. 2016), DeepCTR-Torch's WDL.

``logit = first-order linear (wide) + Linear(tower(flat embeddings))``.
The adapter lives in the tower's Linear layers (the deep part); the wide part
and the output Linear (no bias: the wide part holds it) are not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import FirstOrderLinear
from moe_mlora.models.multidomain import TowerConfig


class WDL(CTRModel):
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
        self.tower = self.make_tower(self.embeddings.output_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.linear(sparse) + self.out(deep).squeeze(1)
