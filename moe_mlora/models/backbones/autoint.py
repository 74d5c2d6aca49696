"""AutoInt (Song et al. 2019) with a DNN, DeepCTR-Torch's math.

``a = flat(Interacting^L(e))`` (``att_layer_num`` layers of multi-head
self-attention over the fields, residual and ReLU), then
``logit = first-order linear + Linear([a, tower(flat embeddings)])``.
The tower reads the flat embeddings and carries the adapter; the attention
layers and the output Linear (no bias) are not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import FirstOrderLinear, InteractingLayer
from moe_mlora.models.multidomain import TowerConfig


class AutoInt(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        att_layer_num: int = 3,
        att_head_num: int = 2,
        att_res: bool = True,
        att_scaling: bool = False,
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        if att_layer_num < 1:
            raise ValueError(f"att_layer_num must be >= 1, got {att_layer_num}; use model=mlp")
        self.linear = FirstOrderLinear(fields)
        self.attention = nn.Sequential(
            *(
                InteractingLayer(embedding_dim, att_head_num, att_res, att_scaling)
                for _ in range(att_layer_num)
            )
        )
        self.tower = self.make_tower(self.embeddings.output_dim, hidden_units, dropout)
        self.out = nn.Linear(self.embeddings.output_dim + self.tower.output_dim, 1, bias=False)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        attended = self.attention(embeddings).flatten(1)
        return self.linear(sparse) + self.out(torch.cat([attended, deep], dim=1)).squeeze(1)
