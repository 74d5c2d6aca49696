"""STAR (Sheng et al., "One Model to Serve All: Star Topology Adaptive Recommender for
Multi-Domain CTR Prediction", CIKM 2021).

* **Partitioned normalization** of the tower input: ``(gamma * gamma_d) x_hat + (beta +
  beta_d)``; ``x_hat`` uses domain ``d``'s statistics: within the batch in training (the
  paper's batches hold one domain each; ours mix them, see :class:`PartitionedNorm`) and
  its moving averages in evaluation.
* **Star-topology FCN**: every layer's weight is the shared weight times (elementwise) the
  domain's, its bias the sum: ``W = W_shared * W_d``, ``b = b_shared + b_d``. The domain
  weights start at 1 and their biases at 0, so training starts from the shared network.
* **Auxiliary network**: a small MLP over the domain's embedding and the tower input whose
  output is added to the backbone's logit (``logit_offset``).

Defaults: the backbone's hidden units and dropout for the FCN, a 2-layer auxiliary MLP
(domain embedding 8, hidden 32), normalization momentum 0.1 and per-domain statistics.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_mlora.models.layers import Dropout
from moe_mlora.models.multidomain.base import DomainGroups, MultiDomainTower, linear_init, rows_of

#: Where partitioned normalisation takes its training statistics from (``tower.statistics``).
STATISTICS = ("domain", "batch", "global", "none")


class PartitionedNorm(nn.Module):
    """BatchNorm whose scale and shift are shared x per-domain, with per-domain moving stats.

    STAR trains on batches of one domain each, so its batch statistics are that domain's,
    the same population as the domain's moving averages used in evaluation. Our batches
    mix domains; ``statistics="domain"`` keeps the paper's meaning by normalising each row
    with its own domain's statistics within the batch, so that a mixed batch gives exactly
    what one batch per domain would (a domain with fewer than two rows in the batch has no
    variance there and uses its moving averages). ``"batch"`` normalises every row with the
    whole mixed batch's statistics in training and with its domain's moving averages in
    evaluation (the first version here: it evaluates on other statistics than it trains on).
    ``"global"`` is plain BatchNorm under the partitioned scale and shift: the mixed batch's
    statistics in training, their moving averages over all domains in evaluation (kept in
    every domain's row of the buffers, so the weights' layout does not change). ``"none"``
    skips the normalisation and keeps the partitioned scale and shift only.

    A column that is constant within a domain (the domain field's embedding, which the tower
    reads) has zero variance under ``"domain"``: its moving variance decays to ~0 (1e-18 to
    1e-12 on MovieLens-100K, against ~5e-4 for the other columns), so evaluation divides any
    lag between its moving mean and the embedding's current value by ``sqrt(eps)``. Measured,
    that costs little (``experiments/baselines.md``, where the variants are compared).
    """

    def __init__(
        self,
        num_domains: int,
        width: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        statistics: str = "domain",
    ):
        super().__init__()
        if statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {list(STATISTICS)}, got {statistics!r}")
        self.momentum, self.eps, self.statistics = momentum, eps, statistics
        self.gamma = nn.Parameter(torch.ones(width))
        self.beta = nn.Parameter(torch.zeros(width))
        self.domain_gamma = nn.Parameter(torch.ones(num_domains, width))
        self.domain_beta = nn.Parameter(torch.zeros(num_domains, width))
        self.register_buffer("running_mean", torch.zeros(num_domains, width))
        self.register_buffer("running_var", torch.ones(num_domains, width))

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        if self.statistics == "none":
            normalized = x
        else:
            mean, var = self._statistics(x, domain) if self.training else self._moving(domain)
            normalized = (x - mean) / torch.sqrt(var + self.eps)
        scale = self.gamma * rows_of(self.domain_gamma, domain)
        return scale * normalized + self.beta + rows_of(self.domain_beta, domain)

    def _moving(self, domain: Tensor) -> tuple[Tensor, Tensor]:
        return self.running_mean[domain], self.running_var[domain]

    def _statistics(self, x: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and variance each row is normalised with in training; moves the averages."""
        if self.statistics == "global":
            mean, var = x.mean(0), x.var(0, unbiased=False)
            everyone = torch.full_like(self.running_mean[:, 0], len(x), dtype=torch.long)
            self._update_statistics(everyone, mean.detach(), var.detach())
            return mean, var
        counts, domain_mean, domain_var = self._domain_statistics(x, domain)
        self._update_statistics(counts, domain_mean.detach(), domain_var.detach())
        if self.statistics == "batch":
            return x.mean(0), x.var(0, unbiased=False)
        seen = (counts > 1).unsqueeze(1)
        mean = rows_of(torch.where(seen, domain_mean, self.running_mean), domain)
        return mean, rows_of(torch.where(seen, domain_var, self.running_var), domain)

    def _domain_statistics(self, x: Tensor, domain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Row counts, means and (biased) variances of each domain's rows in the batch."""
        domains, width = self.running_mean.shape
        counts = torch.bincount(domain, minlength=domains)
        denominator = counts.clamp(min=1).to(x.dtype).unsqueeze(1)
        mean = x.new_zeros(domains, width).index_add(0, domain, x) / denominator
        centered = x - rows_of(mean, domain)
        var = x.new_zeros(domains, width).index_add(0, domain, centered * centered) / denominator
        return counts, mean, var

    @torch.no_grad()
    def _update_statistics(self, counts: Tensor, mean: Tensor, var: Tensor) -> None:
        """Move each domain seen with at least two rows towards its batch statistics."""
        step = self.momentum * (counts > 1).to(mean.dtype).unsqueeze(1)
        self.running_mean.mul_(1 - step).add_(step * mean)
        self.running_var.mul_(1 - step).add_(step * var)


class STAR(MultiDomainTower):
    def __init__(
        self,
        num_domains: int,
        input_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        auxiliary_units: Sequence[int] = (32,),
        domain_embedding_dim: int = 8,
        momentum: float = 0.1,
        statistics: str = "domain",
    ) -> None:
        super().__init__(num_domains, input_dim)
        dims = [input_dim, *hidden_units]
        self.norm = PartitionedNorm(num_domains, input_dim, momentum, statistics=statistics)
        self.shared_weights = nn.ParameterList()
        self.shared_biases = nn.ParameterList()
        self.domain_weights = nn.ParameterList()
        self.domain_biases = nn.ParameterList()
        for i, o in itertools.pairwise(dims):
            weight, bias = nn.Parameter(torch.empty(i, o)), nn.Parameter(torch.empty(o))
            linear_init(weight, bias, i)
            self.shared_weights.append(weight)
            self.shared_biases.append(bias)
            self.domain_weights.append(nn.Parameter(torch.ones(num_domains, i, o)))
            self.domain_biases.append(nn.Parameter(torch.zeros(num_domains, o)))
        self.dropout = Dropout(dropout)
        self.output_dim = dims[-1]
        self.domain_embedding = nn.Embedding(num_domains, domain_embedding_dim)
        aux_dims = [domain_embedding_dim + input_dim, *auxiliary_units]
        layers: list[nn.Module] = []
        for i, o in itertools.pairwise(aux_dims):
            layers += [nn.Linear(i, o), nn.ReLU()]
        self.auxiliary = nn.Sequential(*layers, nn.Linear(aux_dims[-1], 1))

    def forward(self, x: Tensor, domain: Tensor, expert: Tensor | None = None) -> Tensor:
        # Every layer is per-domain, so the rows stay in domain order from the normalisation
        # to the last layer (one sort and one unsort per forward, not one per layer).
        groups = DomainGroups(domain, self.num_domains)
        x = self.norm(groups.sort(x), groups.domain_of_sorted)
        for shared_w, shared_b, domain_w, domain_b in zip(
            self.shared_weights,
            self.shared_biases,
            self.domain_weights,
            self.domain_biases,
            strict=True,
        ):
            weight = shared_w.unsqueeze(0) * domain_w  # [D, in, out]: W_shared * W_d
            bias = shared_b + domain_b  # [D, out]: b_shared + b_d
            x = self.dropout(torch.relu(groups.sorted_linear(x, weight, bias)))
        return groups.unsort(x)

    def logit_offset(self, x: Tensor, domain: Tensor) -> Tensor:
        """The auxiliary network's logit, added to the backbone's."""
        features = torch.cat([self.domain_embedding(domain), x], dim=1)
        return self.auxiliary(features).squeeze(1)

    def domain_parameters(self) -> list[nn.Parameter]:
        return [
            self.norm.domain_gamma, self.norm.domain_beta,
            *self.domain_weights, *self.domain_biases, self.domain_embedding.weight,
        ]  # fmt: skip
