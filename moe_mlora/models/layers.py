"""Interaction layers shared by the backbones (the math of DeepCTR-Torch, batched).

Backbones compose these; a layer knows nothing about domains, adapters or
routing. First-order linear and FM (DeepFM, WDL), bi-interaction pooling
(NFM), the interacting self-attention layer (AutoInt), inner and outer
products (PNN), the cross network (DCN), CIN (xDeepFM), SENET and bilinear
interaction (FiBiNET). Pairwise layers gather all field pairs with index
tensors built once in ``__init__``: no Python loop over pairs or samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models.cin import CIN, CINMap  # noqa: F401  (re-exported: xDeepFM's layer)
from moe_mlora.models.features import EMBEDDING_INIT_STD
from moe_mlora.models.lora import static_shapes


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


#: How dropout draws its keep mask on the CPU (``dropout_mask=`` in the run config).
DROPOUT_MASKS = ("bits", "uniform")
#: ``bits`` draws are 16-bit integers: the drop probability is ``p`` rounded to a multiple
#: of 1 / DRAW_LEVELS (within 7.6e-6 of ``p``).
DRAW_LEVELS = 1 << 16


class Dropout(nn.Module):
    """Inverted dropout, the distribution of ``nn.Dropout``, faster on the CPU.

    On the CPU ``F.dropout`` samples its mask with ``bernoulli_``, about 4x the cost of a
    uniform draw. Here an element is kept when its draw clears ``p``, and scaled by
    ``1 / (1 - p)``. ``mask`` picks the draws:

    * ``bits`` (default): 16-bit integers cut from torch's 64-bit random integers, four per
      draw of the generator. torch's CPU generator is serial, so a quarter as many draws
      makes the mask about 2x cheaper (a 1024x4x256 mask in 2.2 ms instead of 4.2-5.3) and
      a DeepFM training step about 15% faster (``python -m moe_mlora.bench dropout``).
    * ``uniform``: one float draw per element (``uniform >= p``), the masks of releases
      before ``bits`` existed.

    Both depend only on the seed, never on the thread count. On the GPU the fused
    ``F.dropout`` runs either way.
    """

    def __init__(self, p: float = 0.5, mask: str = "bits") -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.mask = check_dropout_mask(mask)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * self.keep(x)

    def keep(self, x: Tensor) -> Tensor:
        """A mask like ``x``: 0 where dropped, ``1 / (1 - p)`` where kept."""
        if self.mask == "uniform":
            return torch.rand_like(x).ge_(self.p).div_(1.0 - self.p)
        count = x.numel()
        words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        draws = words.view(torch.int16)[:count].view(x.shape)  # uniform over [-2^15, 2^15)
        threshold = round(self.p * DRAW_LEVELS) - DRAW_LEVELS // 2
        return draws.ge(threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, mask={self.mask}"


def check_dropout_mask(mask: str) -> str:
    if mask not in DROPOUT_MASKS:
        raise ValueError(f"dropout_mask must be one of {', '.join(DROPOUT_MASKS)}, got {mask!r}")
    return mask


def set_dropout_mask(model: nn.Module, mask: str) -> None:
    """Make every :class:`Dropout` in ``model`` draw its masks the ``mask`` way."""
    check_dropout_mask(mask)
    for module in model.modules():
        if isinstance(module, Dropout):
            module.mask = mask


# -- pairwise field interactions -------------------------------------------------
def field_pairs(num_fields: int) -> Tensor:
    """Field pairs ``i < j`` as a ``[2, P]`` index tensor, in ``itertools.combinations`` order.

    Computed once in a layer's ``__init__`` (as a buffer), so the forward pass
    gathers all pairs with one ``index_select`` instead of a loop over pairs.
    """
    return torch.triu_indices(num_fields, num_fields, offset=1)


def _check_fields(num_fields: int, layer: str) -> None:
    if num_fields < 2:
        raise ValueError(f"{layer} needs at least 2 fields to form a pair, got {num_fields}")


class BiInteractionPooling(nn.Module):
    """NFM's bi-interaction pooling: ``sum_{i<j} e_i * e_j`` (element-wise) -> ``[B, dim]``.

    The FM identity without the final sum over ``dim``:
    ``0.5 * ((sum_i e_i)^2 - sum_i e_i^2)``, linear in the number of fields.
    """

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> ``[B, dim]``."""
        square_of_sum = embeddings.sum(dim=1).square()
        sum_of_square = embeddings.square().sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square)


class InnerProduct(nn.Module):
    """PNN's inner products ``<e_i, e_j>`` for every field pair ``i < j`` -> ``[B, P]``.

    Element-wise products of the gathered pair halves, summed over ``dim``:
    one gather per side, no loop over pairs.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        _check_fields(num_fields, "InnerProduct")
        rows, cols = field_pairs(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.num_pairs = len(rows)

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> ``[B, P]``."""
        left = embeddings.index_select(1, self.rows)
        right = embeddings.index_select(1, self.cols)
        return (left * right).sum(dim=-1)


class OuterProduct(nn.Module):
    """PNN's kernel outer products, one scalar per field pair ``i < j`` -> ``[B, P]``.

    ``kernel_type``:

    * ``"mat"``: ``e_j^T K_p e_i`` with a ``dim x dim`` kernel per pair, stored
      ``[dim, P, dim]`` (index ``[j-side, pair, i-side]``) as DeepCTR-Torch does,
      so that ``xavier_uniform`` draws from the same distribution;
    * ``"vec"``: ``sum_k e_ik e_jk w_pk``;  ``"num"``: ``w_p <e_i, e_j>``.
    """

    KERNEL_TYPES = ("mat", "vec", "num")

    def __init__(self, num_fields: int, embedding_dim: int, kernel_type: str = "mat") -> None:
        super().__init__()
        _check_fields(num_fields, "OuterProduct")
        if kernel_type not in self.KERNEL_TYPES:
            raise ValueError(
                f"kernel_type must be one of {list(self.KERNEL_TYPES)}, got {kernel_type!r}"
            )
        rows, cols = field_pairs(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.kernel_type = kernel_type
        pairs, dim = len(rows), embedding_dim
        shape = {"mat": (dim, pairs, dim), "vec": (pairs, dim), "num": (pairs, 1)}[kernel_type]
        self.kernel = nn.Parameter(torch.empty(shape))
        nn.init.xavier_uniform_(self.kernel)
        self.num_pairs = pairs

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> ``[B, P]``."""
        left = embeddings.index_select(1, self.rows)  # [B, P, dim]
        right = embeddings.index_select(1, self.cols)
        if self.kernel_type == "mat":
            # K_p e_i for every pair at once: a batched (over pairs) matmul
            left = torch.einsum("bpk,jpk->bpj", left, self.kernel)
            return (left * right).sum(dim=-1)
        return (left * right * self.kernel).sum(dim=-1)


class _FieldSoftmax(torch.autograd.Function):
    """Softmax over a short last dim (a row of F field scores), forward and backward by hand.

    torch's CPU softmax kernel is slow for short rows: over ``[1024, 2, 7, 7]`` it took about
    1.0 ms forward and 1.4 ms with backward, against 0.2 and 0.37 ms here, which made it a
    fifth of an AutoInt step. Computed in float32 (autocast runs softmax in float32 too).
    """

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:
        ctx.input_dtype = scores.dtype
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        weights = (scores - scores.amax(-1, keepdim=True)).exp_()
        weights = weights.div_(weights.sum(-1, keepdim=True))
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (weights,) = ctx.saved_tensors
        grad = grad.to(weights.dtype)
        return (weights * (grad - (grad * weights).sum(-1, keepdim=True))).to(ctx.input_dtype)


def field_softmax(scores: Tensor) -> Tensor:
    """``softmax(scores, dim=-1)``; by hand on CPU (see :class:`_FieldSoftmax`), torch's own on
    other devices and in traced or exported graphs (an autograd Function does not export)."""
    if scores.device.type != "cpu" or static_shapes():
        return torch.softmax(scores, dim=-1)
    return _FieldSoftmax.apply(scores)


class InteractingLayer(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention over fields, residual, ReLU.

    For each head ``h``: ``softmax(Q_h K_h^T [/ sqrt(d_h)]) V_h`` with
    ``Q = e W_Q``, ``K = e W_K``, ``V = e W_V``; heads concatenated along
    ``dim``; plus ``e W_Res`` when ``residual``; then ReLU. ``[B, F, dim]`` in
    and out. The projection matrices (``dim x dim`` each, ``normal(0, 0.05)``
    as DeepCTR-Torch) are stored side by side in one ``[dim, n * dim]``
    parameter so all projections are a single matmul. DeepCTR-Torch's AutoInt
    does not scale the scores (``scaling=False``).
    """

    def __init__(
        self, embedding_dim: int, num_heads: int = 2, residual: bool = True, scaling: bool = False
    ) -> None:
        super().__init__()
        if num_heads < 1 or embedding_dim % num_heads:
            raise ValueError(
                f"att_head_num must be >= 1 and divide embedding_dim={embedding_dim}, "
                f"got {num_heads}"
            )
        self.dim, self.num_heads, self.residual = embedding_dim, num_heads, residual
        self.scale = (embedding_dim // num_heads) ** -0.5 if scaling else 1.0
        projections = 4 if residual else 3  # Q, K, V (, Res)
        self.weight = nn.Parameter(torch.empty(embedding_dim, projections * embedding_dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.05)

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> ``[B, F, dim]``."""
        batch, fields, dim = embeddings.shape
        projected = embeddings @ self.weight  # [B, F, n * dim]
        qkv = projected[..., : 3 * dim].unflatten(-1, (3, self.num_heads, dim // self.num_heads))
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, F, d_h]
        scores = field_softmax(query @ key.transpose(-1, -2) * self.scale)
        out = (scores @ value).transpose(1, 2).reshape(batch, fields, dim)
        if self.residual:
            out = out + projected[..., 3 * dim :]
        return torch.relu(out)


class CrossNet(nn.Module):
    """DCN's cross network over ``x0 [B, in]`` -> ``[B, in]``, ``num_layers`` layers.

    * ``"vector"`` (DCN): ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l``;
    * ``"matrix"`` (DCN-M): ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.

    Kernels ``xavier_normal`` per layer (a ``[in, 1]`` column for "vector"),
    biases zero, as DeepCTR-Torch.
    """

    PARAMETERIZATIONS = ("vector", "matrix")

    def __init__(
        self, in_features: int, num_layers: int = 2, parameterization: str = "vector"
    ) -> None:
        super().__init__()
        if parameterization not in self.PARAMETERIZATIONS:
            raise ValueError(
                f"cross_parameterization must be one of {list(self.PARAMETERIZATIONS)}, "
                f"got {parameterization!r}"
            )
        self.parameterization = parameterization
        columns = 1 if parameterization == "vector" else in_features
        kernels = torch.empty(num_layers, in_features, columns)
        for kernel in kernels:
            nn.init.xavier_normal_(kernel)
        self.kernels = nn.Parameter(kernels)
        self.bias = nn.Parameter(torch.zeros(num_layers, in_features))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for kernel, bias in zip(self.kernels, self.bias, strict=True):
            if self.parameterization == "vector":
                x = torch.addcmul(x + bias, x0, x @ kernel)  # x @ kernel: [B, 1]
            else:
                x = torch.addcmul(x, x0, F.linear(x, kernel, bias))
        return x


class SENETLayer(nn.Module):
    """FiBiNET's squeeze-excitation over fields: reweights each field embedding.

    ``z = mean_k e_k`` (``[B, F]``), ``a = ReLU(W2 ReLU(W1 z))`` with
    ``W1: F -> max(1, F // reduction_ratio)`` and ``W2`` back to ``F``, both
    without bias; output ``e * a`` (``[B, F, dim]``).
    """

    def __init__(self, num_fields: int, reduction_ratio: int = 3) -> None:
        super().__init__()
        if reduction_ratio < 1:
            raise ValueError(f"reduction_ratio must be >= 1, got {reduction_ratio}")
        reduced = max(1, num_fields // reduction_ratio)
        self.squeeze = nn.Linear(num_fields, reduced, bias=False)
        self.excite = nn.Linear(reduced, num_fields, bias=False)

    def field_weights(self, embeddings: Tensor) -> Tensor:
        """``[..., F, dim]`` -> the field weights ``a [..., F]``."""
        z = embeddings.mean(dim=-1)
        return torch.relu(self.excite(torch.relu(self.squeeze(z))))

    def forward(self, embeddings: Tensor) -> Tensor:
        return embeddings * self.field_weights(embeddings).unsqueeze(-1)


class BilinearInteraction(nn.Module):
    """FiBiNET's bilinear interaction: ``(W e_i) * e_j`` for every field pair ``i < j``.

    ``bilinear_type`` (FuxiCTR's ``field_`` prefixed names are accepted too):

    * ``"all"``: one ``W`` shared by all pairs;
    * ``"each"``: ``W_i`` per field (of the pair's first field);
    * ``"interaction"``: ``W_ij`` per pair.

    Each ``W`` is an ``nn.Linear(dim, dim, bias=False)`` weight (``[out, in]``,
    same init), all of them stacked in one ``[n, dim, dim]`` parameter.
    ``[..., F, dim]`` -> ``[..., P, dim]``: leading axes are batched, so FiBiNET
    runs its SENET and raw embeddings through one call.
    """

    TYPES = ("all", "each", "interaction")

    def __init__(
        self, num_fields: int, embedding_dim: int, bilinear_type: str = "interaction"
    ) -> None:
        super().__init__()
        _check_fields(num_fields, "BilinearInteraction")
        kind = bilinear_type.removeprefix("field_")
        if kind not in self.TYPES:
            raise ValueError(
                f"bilinear_type must be one of {list(self.TYPES)}, got {bilinear_type!r}"
            )
        rows, cols = field_pairs(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.bilinear_type = kind
        count = {"all": 1, "each": num_fields, "interaction": len(rows)}[kind]
        self.weight = nn.Parameter(torch.empty(count, embedding_dim, embedding_dim))
        bound = embedding_dim**-0.5  # nn.Linear's default init: kaiming_uniform(a=sqrt(5))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[..., F, dim]`` -> ``[..., P, dim]``."""
        right = embeddings.index_select(-2, self.cols)
        if self.bilinear_type == "interaction":
            left = embeddings.index_select(-2, self.rows)
            return torch.einsum("...pk,pjk->...pj", left, self.weight) * right
        if self.bilinear_type == "all":
            transformed = embeddings @ self.weight[0].T
        else:  # each field transformed once by its own W_i, then gathered per pair
            transformed = torch.einsum("...fk,fjk->...fj", embeddings, self.weight)
        return transformed.index_select(-2, self.rows) * right
