"""FiBiNET (Huang et al. 2019), DeepCTR-Torch's math.

``v = SENET(e)`` reweights the fields; one bilinear layer (shared) maps both
``v`` and ``e`` to pair vectors ``(W e_i) * e_j``, and the tower reads
``[flat(bilinear(v)), flat(bilinear(e))]`` (``F (F - 1) dim`` values).
``logit = first-order linear + Linear(tower(...))`` (no output bias). The
tower carries the adapter; SENET and the bilinear layer are not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import BilinearInteraction, FirstOrderLinear, SENETLayer
from moe_mlora.models.multidomain import TowerConfig


class FiBiNET(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        bilinear_type: str = "interaction",
        reduction_ratio: int = 3,
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        num_fields = len(fields)
        self.linear = FirstOrderLinear(fields)
        self.senet = SENETLayer(num_fields, reduction_ratio)
        self.bilinear = BilinearInteraction(num_fields, embedding_dim, bilinear_type)
        input_dim = num_fields * (num_fields - 1) * embedding_dim
        self.tower = self.make_tower(input_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)

    def tower_input(self, embeddings: Tensor) -> Tensor:
        both = torch.stack([self.senet(embeddings), embeddings], dim=1)  # [B, 2, F, dim]
        return self.bilinear(both).flatten(1)  # [B, 2 * P * dim], SENET pairs first

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.linear(sparse) + self.out(deep).squeeze(1)
