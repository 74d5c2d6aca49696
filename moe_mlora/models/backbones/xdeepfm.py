"""xDeepFM (Lian et al. 2018), DeepCTR-Torch's math.

``logit = first-order linear + Linear_cin(CIN(e)) + Linear_dnn(tower(flat(e)))``,
both output Linears without bias (the linear part holds it). The tower
carries the adapter; the CIN is not adapted.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.backbones.base import CTRModel
from moe_mlora.models.layers import CIN, FirstOrderLinear
from moe_mlora.models.multidomain import TowerConfig


class XDeepFM(CTRModel):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        num_domains: int,
        adapter: AdapterConfig,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        tower: TowerConfig | None = None,
        cin_layer_size: Sequence[int] = (256, 128),
        cin_split_half: bool = True,
        cin_activation: str = "relu",
    ) -> None:
        super().__init__(fields, num_domains, adapter, embedding_dim, tower)
        self.linear = FirstOrderLinear(fields)
        self.cin = CIN(len(fields), tuple(cin_layer_size), cin_activation, cin_split_half)
        self.cin_out = nn.Linear(self.cin.output_dim, 1, bias=False)
        self.tower = self.make_tower(self.embeddings.output_dim, hidden_units, dropout)
        self.out = nn.Linear(self.tower.output_dim, 1, bias=False)

    def head(self, sparse: Tensor, embeddings: Tensor, deep: Tensor) -> Tensor:
        cin_logit = self.cin_out(self.cin(embeddings))
        return self.linear(sparse) + (cin_logit + self.out(deep)).squeeze(1)
