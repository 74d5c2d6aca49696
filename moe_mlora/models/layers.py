"""Interaction layers shared by the backbones (the math of DeepCTR-Torch, batched).

Backbones compose these; a layer knows nothing about domains, adapters or
routing. Later backbones (AutoInt, PNN, DCN, xDeepFM, FiBiNET, NFM, WDL) add
their parts here (attention, products, cross net, CIN, SENET/bilinear,
bi-interaction pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.features import EMBEDDING_INIT_STD


class FirstOrderLinear(nn.Module):
    """The "wide" first-order term: ``sum_f w_f[sparse[:, f]] + bias`` -> ``[B]``.

    One scalar weight per (field, index), as DeepCTR-Torch's linear part for
    sparse features. All fields share one table with per-field row offsets, so
    the lookup is a single gather instead of one per field. Fields with a
    pretrained table also get a learned scalar per index here (the table itself
    only feeds the embeddings).
    """

    def __init__(self, fields: Sequence[FieldSpec]) -> None:
        super().__init__()
        sizes = torch.tensor([spec.vocab_size for spec in fields])
        offsets = torch.cumsum(sizes, 0) - sizes
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), 1))
        nn.init.normal_(self.weight, mean=0.0, std=EMBEDDING_INIT_STD)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, sparse: Tensor) -> Tensor:
        """``sparse [B, F]`` -> ``[B]``."""
        return F.embedding(sparse + self.offsets, self.weight).sum(dim=(1, 2)) + self.bias


class FactorizationMachine(nn.Module):
    """FM second-order term over field embeddings ``[B, F, dim]`` -> ``[B]``.

    ``sum_{i<j} <e_i, e_j> = 0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2)``,
    linear in F instead of quadratic.
    """

    def forward(self, embeddings: Tensor) -> Tensor:
        square_of_sum = embeddings.sum(dim=1).square()
        sum_of_square = embeddings.square().sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class Dropout(nn.Module):
    """Inverted dropout, same distribution as ``nn.Dropout``, faster on CPU.

    On CPU ``F.dropout`` samples its mask with ``bernoulli_``, which costs
    about 4x a uniform draw and was ~40% of a DeepFM training step at batch
    1024. Here the mask is ``uniform >= p`` (kept with probability ``1 - p``),
    scaled by ``1 / (1 - p)``. On GPU the fused ``F.dropout`` is used.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.rand_like(x).ge_(self.p).div_(1.0 - self.p)
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
