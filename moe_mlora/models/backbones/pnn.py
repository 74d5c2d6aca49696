"""PNN (Qu et al. 2016): IPNN by default, DeepCTR-Torch's math.

``logit = Linear(tower([flat(e), inner(e), outer(e)])) + bias`` where
``inner`` holds ``<e_i, e_j>`` and ``outer`` the kernel products
``e_j^T K_ij e_i`` for every field pair (each part only when enabled).
The tower reads that product layer and carries the adapter. PNN has no
first-order part: the output Linear has no weight bias, a separate zero-init
scalar plays DeepCTR-Torch's prediction-layer bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import InnerProduct, OuterProduct
from moe_mlora.models.multidomain import TowerConfig


class PNN(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        use_inner: bool = True,
        use_outer: bool = False,
        kernel_type: str = "mat",
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        num_fields = len(fields)
        self.inner = InnerProduct(num_fields) if use_inner else None
        self.outer = OuterProduct(num_fields, embedding_dim, kernel_type) if use_outer else None
        pairs = num_fields * (num_fields - 1) // 2
        input_dim = self.embeddings.output_dim + pairs * (int(use_inner) + int(use_outer))
        self.tower = self.make_tower(input_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def tower_input(self, embeddings: Tensor) -> Tensor:
        parts = [embeddings.flatten(1)]
        parts += [layer(embeddings) for layer in (self.inner, self.outer) if layer is not None]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        return self.out(deep).squeeze(1) + self.bias
