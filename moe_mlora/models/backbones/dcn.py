"""Deep & Cross Network (Wang et al. 2017; DCN-M with "matrix"), DeepCTR-Torch's math.

``x0 = flat(e)``; ``logit = first-order linear + Linear([cross(x0), tower(x0)])``
with ``cross_num`` cross layers (see :class:`~moe_mlora.models.layers.CrossNet`).
The tower carries the adapter; the cross network and the output Linear (no
bias: the linear part holds it) are not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import CrossNet, FirstOrderLinear
from moe_mlora.models.multidomain import TowerConfig


class DCN(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        cross_num: int = 2,
        cross_parameterization: str = "vector",
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        if cross_num < 1:
            raise ValueError(f"cross_num must be >= 1, got {cross_num}; use model=mlp")
        width = self.embeddings.output_dim
        self.linear = FirstOrderLinear(fields)
        self.cross = CrossNet(width, cross_num, cross_parameterization)
        self.tower = self.make_tower(width, hidden_units, dropout)
        self.out = nn.Linear(width + self.tower.output_dim, 1, bias=False)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        crossed = self.cross(embeddings.flatten(1))
        return self.linear(sparse) + self.out(torch.cat([crossed, deep], dim=1)).squeeze(1)
