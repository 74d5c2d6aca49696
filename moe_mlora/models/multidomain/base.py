"""What every multi-domain tower shares: the contract, and per-domain products without loops.

A *multi-domain tower* replaces a backbone's DNN tower (the adapted :class:`Tower`) with a
structure that is multi-domain by construction: per-domain towers, experts with per-domain
gates, star-topology weights. The backbone does not change: it hands the tower its input
and reads ``[B, output_dim]`` back, as with any tower. The contract:

* ``forward(x, domain, expert=None) -> [B, output_dim]``;
* ``domain_parameters()``: the per-domain parts (counted apart from the shared backbone in
  results.json; trained with it, as the one-phase ``base`` schedule does);
* optional ``embedding_gate(embeddings, domain)`` (rescales the field embeddings before the
  backbone reads them: PEPNet's EPNet; with ``embedding_gate_scope = "tower"`` only the
  tower's input is rescaled) and ``logit_offset(x, domain)`` (added to the
  backbone's logit: STAR's auxiliary network);
* ``adapter``: a "none" adapter, so routing, experts and the gate read as "no adapter" to
  the schedules (these towers are not adapters and take no routing but "off").

:class:`DomainGroups` gives per-domain Linear layers without a Python loop over domains, each
row meeting only its own domain's weights (no D-fold product). The rows are sorted by domain
once per forward; then, on the CPU in float32 with widths that are multiples of 4 (the
kernel's 16-byte alignment), one grouped GEMM (``F.grouped_mm``) multiplies each domain's
contiguous run of rows by its ``[in, out]`` weight, reading no padding. Elsewhere (the GPU,
whose grouped kernel wants bfloat16, other dtypes or widths) the sorted rows go into a
padded ``[D, rows of the largest domain, in]`` block and one ``bmm``; with a long tail of
small domains that padding multiplies the work (about 20x on Taobao-20), which is why the
grouped GEMM is preferred where it runs. A narrow layer the grouped GEMM cannot run (PLE's
2-wide gates) is computed for every domain at once, one ``[in, D * out]`` GEMM, and each
row keeps its own domain's columns: at most :data:`DENSE_COLUMNS` columns in all, that
is 2-4x faster than the padded block (measured on the CPU at 2 to 30 domains). A traced
or exported graph (TorchScript, ONNX) cannot have shapes that depend on the data, so there
each row's weights are gathered instead (``[B, in, out]``) and multiplied in one ``bmm``.

A tower whose every layer is per-domain (STAR) can keep its rows in domain order from its
input to its output (:meth:`DomainGroups.sort`, :meth:`DomainGroups.sorted_linear`,
:meth:`DomainGroups.unsort`) instead of sorting and restoring them around every layer.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_mlora.models.adapters import AdapterConfig, build_adapter
from moe_mlora.models.layers import Dropout
from moe_mlora.models.lora import static_shapes

#: Bytes the CPU grouped GEMM needs every row of its operands aligned to.
GROUPED_MM_ALIGNMENT = 16
#: Widest ``domains x out`` product computed for every domain (each row keeping its own).
DENSE_COLUMNS = 128


def rows_of(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` (each row's entry of a per-domain table), with a deterministic backward.

    Autograd's backward of ``table[index]`` is an accumulating ``index_put_``, whose sums on
    the CPU change with the thread schedule when the gradient is large (two runs with the
    same seed then differ in the last digits). ``index_select``'s backward, ``index_add_``,
    adds the rows in order, as one thread would, and is several times faster.
    """
    return table.index_select(0, index)


class _PermuteRows(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``, with ``grad[inverse]`` as its backward.

    Autograd's backward of ``x[order]`` is an accumulating scatter (``index_put_`` with
    ``accumulate=True``), which on the CPU took ~1 ms for a ``[1024, 256]`` gradient. A
    permutation moves every row once, so the gather by the inverse permutation gives the
    same gradient, bit for bit, at the cost of a copy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@functools.cache
def cpu_grouped_mm_available() -> bool:
    """Whether this torch has ``F.grouped_mm`` and runs it on the CPU (2.13 does; releases
    before it may not, and the towers then take the padded or dense path)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        offsets = torch.tensor([4], dtype=torch.int32)
        F.grouped_mm(torch.zeros(4, 4), torch.zeros(1, 4, 4), offs=offsets)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def grouped_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs ``x [N, in]`` by ``weight [G, in, out]`` (CPU float32)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if not cpu_grouped_mm_available():
        return False
    per_row = GROUPED_MM_ALIGNMENT // x.element_size()
    return x.shape[1] % per_row == 0 and weight.shape[2] % per_row == 0


def dense_is_cheaper(weight: Tensor) -> bool:
    """Whether every domain's product of ``weight [D, in, out]`` beats a padded block."""
    return weight.shape[0] * weight.shape[2] <= DENSE_COLUMNS


def own_columns(x: Tensor, weight: Tensor, domain: Tensor) -> Tensor:
    """``x [B, in]`` times every domain's ``weight [D, in, out]``; each row keeps its domain's.

    The gather's backward scatters each row's gradient into its own domain's columns only
    (one value per position, so it is exact at any thread count).
    """
    domains, width, out = weight.shape
    every = (x @ weight.permute(1, 0, 2).reshape(width, domains * out)).view(-1, domains, out)
    return every.gather(1, domain.view(-1, 1, 1).expand(-1, 1, out)).squeeze(1)


class DomainGroups:
    """The rows of a batch grouped by domain, to apply per-domain weights in one product."""

    def __init__(self, domain: Tensor, num_domains: int) -> None:
        self.num_domains = num_domains
        self.domain = domain
        self.static = static_shapes()
        if self.static:  # a traced or exported graph: no shape may depend on the data
            return
        self.order = torch.argsort(domain, stable=True)
        self.sorted_domain = domain[self.order]
        counts = torch.bincount(domain, minlength=num_domains)
        self.ends = torch.cumsum(counts, 0)
        self.position = (
            torch.arange(len(domain), device=domain.device)
            - (self.ends - counts)[self.sorted_domain]
        )
        self.rows = int(counts.max()) if len(domain) else 0
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(domain), device=domain.device)
        self._offsets: Tensor | None = None
        self._one_hot: Tensor | None = None

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x [B, in]`` times its row's domain's ``weight [D, in, out]`` (+ ``bias [D, out]``)."""
        path = self.product_path(x, weight)
        if path == "gathered":  # each row's own weights: more memory, fixed shapes
            out = torch.bmm(x.unsqueeze(1), weight[self.domain]).squeeze(1)
        elif path == "grouped":
            out = self.unsort(self._grouped(self.sort(x), weight))
        elif path == "dense":
            out = own_columns(x, weight, self.domain)
        else:
            out = self._padded(x, weight)
        return out if bias is None else out + rows_of(bias, self.domain)

    def product_path(self, x: Tensor, weight: Tensor) -> str:
        """How :meth:`linear` multiplies ``x`` by ``weight`` (see the module docstring):
        ``gathered`` (traced graphs), ``grouped``, ``dense`` or ``padded``."""
        if self.static:
            return "gathered"
        if grouped_mm_fits(x, weight):
            return "grouped"
        return "dense" if dense_is_cheaper(weight) else "padded"

    def sort(self, x: Tensor) -> Tensor:
        """The rows of ``x [B, ...]`` in domain order (unchanged in a traced graph)."""
        return x if self.static else _PermuteRows.apply(x, self.order, self.inverse)

    def unsort(self, x: Tensor) -> Tensor:
        """Rows in domain order (from :meth:`sort`) back in the batch's order."""
        return x if self.static else _PermuteRows.apply(x, self.inverse, self.order)

    @property
    def domain_of_sorted(self) -> Tensor:
        """The domain of each row after :meth:`sort`."""
        return self.domain if self.static else self.sorted_domain

    def sorted_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """:meth:`linear` for rows already in domain order; the result stays in that order."""
        domain = self.domain_of_sorted
        path = self.product_path(x, weight)
        if path == "gathered":
            out = torch.bmm(x.unsqueeze(1), weight[domain]).squeeze(1)
        elif path == "grouped":
            out = self._grouped(x, weight)
        elif path == "dense":
            out = own_columns(x, weight, domain)
        else:
            out = self._padded_sorted(x, weight)
        return out if bias is None else out + self.sorted_rows_of(bias)

    def sorted_rows_of(self, table: Tensor) -> Tensor:
        """``table [D, k]``'s row of each row's domain, for rows in domain order.

        A product with the rows' one-hot domains rather than ``table[domain]``: the same
        values, and a backward that is one small GEMM instead of an accumulating scatter
        (which took ~0.4 ms for a ``[1024, 256]`` gradient on the CPU).
        """
        if self.static:
            return table[self.domain]
        if self._one_hot is None:
            self._one_hot = F.one_hot(self.sorted_domain, self.num_domains).to(table.dtype)
        return self._one_hot @ table

    def _grouped(self, x_sorted: Tensor, weight: Tensor) -> Tensor:
        """One grouped GEMM over the domain-sorted rows (each domain's run by its weight)."""
        if self._offsets is None:
            self._offsets = self.ends.to(torch.int32)
        return F.grouped_mm(x_sorted, weight, offs=self._offsets)

    def _padded(self, x: Tensor, weight: Tensor) -> Tensor:
        """Each domain's rows in a block padded to the largest domain's, and one ``bmm``."""
        return self.unsort(self._padded_sorted(self.sort(x), weight))

    def _padded_sorted(self, x_sorted: Tensor, weight: Tensor) -> Tensor:
        """:meth:`_padded` for rows in domain order, the product in that order."""
        slots = self.num_domains * self.rows
        slot = self.sorted_domain * self.rows + self.position  # each row's row of the block
        padded = x_sorted.new_zeros(slots, x_sorted.shape[1]).index_copy(0, slot, x_sorted)
        product = torch.bmm(padded.view(self.num_domains, self.rows, -1), weight)
        return product.view(slots, -1).index_select(0, slot)


def linear_init(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """nn.Linear's initialisation, for stacked ``[G, in, out]`` weights."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class StackedLinear(nn.Module):
    """G Linear layers in one tensor: ``[B, in]`` or ``[B, G, in]`` -> ``[B, G, out]``."""

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        linear_init(self.weight, self.bias, in_features)

    def forward(self, x: Tensor) -> Tensor:
        groups, width, out = self.weight.shape
        if x.dim() == 2:  # the same input for every group: one GEMM, the bias added in it
            flat = self.weight.permute(1, 0, 2).reshape(width, groups * out)
            return torch.addmm(self.bias.view(-1), x, flat).view(-1, groups, out)  # traceable
        # One product per group, reading [B, G, in] in place as G matrices of [B, in] (row
        # stride G * in) instead of copying it group-major as einsum did; the product is
        # written as G blocks of [B, out] and returned as a [B, G, out] view.
        product = torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight)
        return product.transpose(0, 1)


class StackedMLP(nn.Module):
    """G MLPs (Linear, ReLU, dropout) side by side: ``[B, in]`` -> ``[B, G, units[-1]]``."""

    def __init__(self, groups: int, in_features: int, units: Sequence[int], dropout: float):
        super().__init__()
        dims = [in_features, *units]
        self.layers = nn.ModuleList(
            StackedLinear(groups, i, o) for i, o in itertools.pairwise(dims)
        )
        self.dropout = Dropout(dropout)
        self.output_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x)))
        return x


class DomainMLP(nn.Module):
    """One MLP per domain; each row goes through its own domain's (see :class:`DomainGroups`)."""

    def __init__(self, num_domains: int, in_features: int, units: Sequence[int], dropout: float):
        super().__init__()
        dims = [in_features, *units]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in itertools.pairwise(dims):
            weight = nn.Parameter(torch.empty(num_domains, i, o))
            bias = nn.Parameter(torch.empty(num_domains, o))
            linear_init(weight, bias, i)
            self.weights.append(weight)
            self.biases.append(bias)
        self.dropout = Dropout(dropout)
        self.output_dim = dims[-1]

    def forward(self, x: Tensor, groups: DomainGroups) -> Tensor:
        for weight, bias in zip(self.weights, self.biases, strict=True):
            x = self.dropout(torch.relu(groups.linear(x, weight, bias)))
        return x


class MultiDomainTower(nn.Module):
    """Base of the multi-domain towers (see the module docstring for the contract)."""

    def __init__(self, num_domains: int, input_dim: int) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.input_dim = input_dim
        self.adapter = build_adapter(AdapterConfig(kind="none"), num_domains, input_dim)
        self.layers = nn.ModuleList()  # no adapted layers: no LoRA experts
        self.routing = "off"
        self.output_dim = input_dim

    def domain_parameters(self) -> list[nn.Parameter]:
        """The per-domain parameters; every tower names its own."""
        raise NotImplementedError
