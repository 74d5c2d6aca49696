"""Field embeddings: integer-encoded fields ``sparse [B, F]`` -> vectors ``[B, F, dim]``.

Every backbone starts here. A field gets its own learned ``nn.Embedding``
(initialised ``normal(0, 1e-4)`` as DeepCTR-Torch does), unless its
:class:`~moe_mlora.data.processed.FieldSpec` carries a ``pretrained`` table
(Taobao's 128-d user and item vectors): then that table is used *frozen* and a
learned linear projection maps it to ``dim``, so every field has the same width
and FM-style interactions between fields stay defined. A spec whose
``freeze_pretrained`` is False (Taobao's ``data.freeze_pretrained=false``)
gets a trainable table initialised from the vectors instead, with the same
projection. ``project_pretrained`` False (``data.project_pretrained=false``)
drops the projection: the vectors go in at full width, as the reference feeds
them, and ``model.embedding_dim`` must equal their width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.data.processed import FieldSpec

EMBEDDING_INIT_STD = 1e-4  # DeepCTR-Torch's default init_std


class PretrainedEmbedding(nn.Module):
    """A frozen ``[vocab, pretrained_dim]`` table followed by a learned ``Linear -> dim``.

    The table is a non-persistent buffer, not a parameter: it can never be
    unfrozen by accident (``for p in model.parameters(): p.requires_grad_(True)``
    leaves it alone), it is not counted as a trainable parameter, and it is
    not copied into every checkpoint (the model is always built from the
    processed data, which holds the table). It still moves with ``.to(device)``.
    The projection has no bias, so a zero vector stays zero.

    With ``freeze=False`` the table is instead an ``nn.Parameter`` initialised
    from the vectors (fine-tuned with the backbone, counted and checkpointed).
    """

    def __init__(self, table: Tensor, dim: int, freeze: bool = True, project: bool = True) -> None:
        super().__init__()
        table = table.detach().float().clone()
        if freeze:
            self.register_buffer("table", table, persistent=False)
        else:
            self.table = nn.Parameter(table)
        if project:
            self.proj: nn.Module = nn.Linear(table.shape[1], dim, bias=False)
        elif table.shape[1] == dim:
            self.proj = nn.Identity()
        else:
            raise ValueError(
                f"data.project_pretrained=false feeds the {table.shape[1]}-d pretrained vectors "
                f"to the model as they are, so every field must be {table.shape[1]}-d: set "
                f"model.embedding_dim={table.shape[1]} (it is {dim})"
            )

    def forward(self, index: Tensor) -> Tensor:
        return self.proj(self.table[index])


def _learned_embedding(vocab_size: int, dim: int) -> nn.Embedding:
    embedding = nn.Embedding(vocab_size, dim)
    nn.init.normal_(embedding.weight, mean=0.0, std=EMBEDDING_INIT_STD)
    return embedding


def _check_field(spec: FieldSpec) -> None:
    if spec.vocab_size < 1:
        raise ValueError(
            f"field {spec.name!r}: vocab_size must be >= 1 (index 0 is OOV), got {spec.vocab_size}"
        )
    table = spec.pretrained
    if table is not None and (table.ndim != 2 or table.shape[0] != spec.vocab_size):
        raise ValueError(
            f"field {spec.name!r}: pretrained table must have shape [vocab_size={spec.vocab_size}, "
            f"dim], got {tuple(table.shape)}; rebuild the processed data so row i is index i"
        )


class FieldEmbeddings(nn.Module):
    """One embedding per field; ``forward`` stacks them to ``[B, F, dim]``.

    ``output_dim`` (``F * dim``) is the width of the flattened tower input
    ``flat(emb)``; the flattening is a view, no copy.
    """

    def __init__(self, fields: Sequence[FieldSpec], dim: int) -> None:
        super().__init__()
        if not fields:
            raise ValueError("fields is empty: a model needs at least one input field")
        if dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {dim}")
        for spec in fields:
            _check_field(spec)
        self.field_names = [spec.name for spec in fields]
        self.dim = dim
        self.tables = nn.ModuleList(
            _learned_embedding(spec.vocab_size, dim)
            if spec.pretrained is None
            else PretrainedEmbedding(
                spec.pretrained, dim, spec.freeze_pretrained, spec.project_pretrained
            )
            for spec in fields
        )

    @property
    def num_fields(self) -> int:
        return len(self.tables)

    @property
    def output_dim(self) -> int:
        return self.num_fields * self.dim

    def forward(self, sparse: Tensor) -> Tensor:
        """``sparse [B, F]`` (int64) -> ``[B, F, dim]``."""
        if sparse.ndim != 2 or sparse.shape[1] != self.num_fields:
            raise ValueError(
                f"sparse must have shape [batch, {self.num_fields}] (fields {self.field_names}), "
                f"got {tuple(sparse.shape)}"
            )
        return torch.stack([table(sparse[:, i]) for i, table in enumerate(self.tables)], dim=1)

    @staticmethod
    def flat(embeddings: Tensor) -> Tensor:
        """``[B, F, dim]`` -> ``[B, F * dim]``, the default tower input (a view)."""
        return embeddings.flatten(1)
