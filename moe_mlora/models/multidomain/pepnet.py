"""PEPNet (Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing
with Personalized Prior Information", KDD 2023), with the domain as the prior.

* **Gate NU**: ``gamma * sigmoid(W2 relu(W1 z))``, gamma = 2, so a gate starts near 1
  and can scale a value up to twice.
* **EPNet** rescales every field's embedding by a Gate NU over the domain's embedding and
  the stop-gradient of the field embeddings (``embedding_gate``), before the backbone
  reads them: its interaction parts and its tower see the personalised embeddings.
* **PPNet**: each layer of the tower MLP is scaled, unit by unit, by its own Gate NU over
  the domain embedding and the stop-gradient of the tower input.

The paper's persona prior (user, item, author ids) is the domain here, the prior this task
has. Defaults: domain embedding 8, gate hidden width 64, the backbone's hidden units and
dropout for the tower. ``epnet=False`` or ``ppnet=False`` drops one of the two parts (the
paper's own ablations; ``method=ppnet`` and ``method=epnet``), to see which one a result
comes from. ``epnet_scope="tower"`` hands the gated embeddings to the tower only, the
backbone's interaction parts (FM, cross network...) reading the embeddings as they were;
the paper's ``"all"`` (the default) gates what every part reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.models.layers import Dropout
from moe_mlora.models.multidomain.base import MultiDomainTower

GATE_SCALE = 2.0  # gamma of the paper's Gate NU
EPNET_SCOPES = ("all", "tower")


class GateNU(nn.Module):
    """``2 * sigmoid(W2 relu(W1 z))``: a per-unit scale in (0, 2)."""

    def __init__(self, in_features: int, out_features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
        )

    def forward(self, z: Tensor) -> Tensor:
        return GATE_SCALE * torch.sigmoid(self.net(z))


class PEPNet(MultiDomainTower):
    def __init__(
        self,
        num_domains: int,
        input_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        embedding_shape: tuple[int, int] = (0, 0),
        domain_embedding_dim: int = 8,
        gate_hidden: int = 64,
        epnet: bool = True,
        ppnet: bool = True,
        epnet_scope: str = "all",
    ) -> None:
        super().__init__(num_domains, input_dim)
        if epnet_scope not in EPNET_SCOPES:
            raise ValueError(f"epnet_scope must be one of {EPNET_SCOPES}, got {epnet_scope!r}")
        self.embedding_gate_scope = epnet_scope
        fields, dim = embedding_shape
        if not (ppnet or (epnet and fields)):
            raise ValueError(
                "PEPNet needs ppnet, or epnet with field embeddings: without both it is "
                "method=base's tower"
            )
        self.domain_embedding = nn.Embedding(num_domains, domain_embedding_dim)
        self.epnet = (
            GateNU(domain_embedding_dim + fields * dim, fields, gate_hidden)
            if epnet and fields
            else None
        )
        dims = [input_dim, *hidden_units]
        self.layers_ = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(dims))
        self.ppnet = (
            nn.ModuleList(
                GateNU(domain_embedding_dim + input_dim, o, gate_hidden) for o in dims[1:]
            )
            if ppnet
            else None
        )
        self.dropout = Dropout(dropout)
        self.output_dim = dims[-1]

    def embedding_gate(self, embeddings: Tensor, domain: Tensor) -> Tensor:
        """EPNet: ``[B, F, dim]`` scaled per field by a gate over the domain and sg(embeddings)."""
        if self.epnet is None:
            return embeddings
        prior = torch.cat([self.domain_embedding(domain), embeddings.detach().flatten(1)], 1)
        return embeddings * self.epnet(prior).unsqueeze(2)

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        if self.ppnet is None:
            for layer in self.layers_:
                x = self.dropout(torch.relu(layer(x)))
            return x
        prior = torch.cat([self.domain_embedding(domain), x.detach()], dim=1)
        for layer, gate in zip(self.layers_, self.ppnet, strict=True):
            x = self.dropout(torch.relu(layer(x)) * gate(prior))
        return x

    def domain_parameters(self) -> list[nn.Parameter]:
        """The domain embedding and every gate: the parts conditioned on the domain."""
        gates = [
            gate
            for part in (self.epnet, self.ppnet)
            if part is not None
            for gate in part.parameters()
        ]
        return [self.domain_embedding.weight, *gates]
