"""The one LightningModule: a CTR model trained in the phase set by the schedule.

The schedule (:mod:`moe_mlora.training.phases`) decides which parameters are
trainable and how the tower's adapters are routed; this module only computes
losses and metrics for the current :class:`Phase`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from moe_mlora.distributed import all_reduce_sum, average_running_statistics, gather_rows
from moe_mlora.metrics import DomainAUC, grouped_auc, weighted_auc
from moe_mlora.training.optim import make_adam
from moe_mlora.training.schedules import PhaseSpec

EVALUATION = PhaseSpec("test", "off", ("backbone",))  # what a Trainer that only tests runs


@dataclass
class Phase:
    """One training phase of the running schedule: its number in metric names and its spec.

    ``assignment`` (the domains of each expert) is set for phases that train experts on
    their own domains (``spec.per_expert``).
    """

    index: int
    spec: PhaseSpec
    assignment: list[list[int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The phase's name (``joint``, ``backbone``, ``experts``, ``gate``...)."""
        return self.spec.name

    @property
    def prefix(self) -> str:
        return f"phase{self.index}"

    @property
    def per_expert(self) -> bool:
        return self.spec.per_expert


def metric_safe(name: str) -> str:
    """A domain name usable as one metric-name component ("/" nests in W&B)."""
    return name.replace("/", "_").replace(" ", "_")


def expert_mean_bce(
    logits: torch.Tensor, label: torch.Tensor, expert: torch.Tensor
) -> torch.Tensor:
    """Sum over experts of each expert's mean BCE on its own rows.

    Experts share no trainable parameter in phase 2, so the gradient each one
    gets is exactly that of its own mean loss: the same as training it alone.
    """
    per_row = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    rows_per_expert = torch.bincount(expert)
    return (per_row / rows_per_expert[expert]).sum()


def sharded_expert_mean_bce(
    logits: torch.Tensor,
    label: torch.Tensor,
    expert: torch.Tensor,
    global_rows: torch.Tensor,
    world_size: torch.Tensor | int,
) -> torch.Tensor:
    """:func:`expert_mean_bce` for one DDP process's part of the global batch.

    An expert's rows are spread unevenly over the processes. Dividing by the expert's rows
    in the *global* batch (``global_rows``, per expert) and multiplying by ``world_size``
    makes DDP's average of the processes' gradients exactly the single-process gradient of
    each expert's mean.
    """
    per_row = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    return (per_row / global_rows[expert]).sum() * world_size


def batch_mean_bce(logits: torch.Tensor, label: torch.Tensor, batch: dict) -> torch.Tensor:
    """The mean BCE of the batch; under DDP, this shard's part of the global batch's mean.

    A sharded batch (see :mod:`moe_mlora.data.batches`) carries its global batch's rows:
    ``sum / global_rows * world_size`` averaged by DDP over the processes is the global
    mean whatever the shards' sizes.
    """
    if "global_rows" not in batch:
        return F.binary_cross_entropy_with_logits(logits, label)
    total = F.binary_cross_entropy_with_logits(logits, label, reduction="sum")
    return total / batch["global_rows"] * batch["world_size"]


def experts_in_global_batch(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The experts with rows in the batch; under DDP, in the global batch (same on every rank)."""
    if "global_rows" in batch:
        return torch.nonzero(batch["global_rows"], as_tuple=True)[0]
    return torch.unique(batch["expert"])


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Per row, the entropy (nats) of the routing weights ``[B, E]``: 0 = one expert, log E = all.

    An anchored gate may extrapolate (weights below 0 and above 1); the entropy is then that
    of the weights clipped at 0 and renormalised, the nearest routing that has one.
    """
    clipped = weights.clamp(min=0)
    probs = clipped / clipped.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def adapter_auxiliary_loss(model: torch.nn.Module) -> tuple[float, torch.Tensor | None]:
    """``(weight, loss)`` of the auxiliary loss the model's adapter recorded in its last forward.

    The adapter (not the backbone) owns the gate, so the loss is read from
    ``model.tower.adapter``; a model without one has none (``(0.0, None)``).
    """
    adapter = getattr(getattr(model, "tower", None), "adapter", None)
    if adapter is None:
        return 0.0, None
    return adapter.auxiliary_loss_weight, adapter.auxiliary_loss()


class CTRModule(L.LightningModule):
    """Binary cross-entropy training and weighted-AUC evaluation of a CTR model."""

    def __init__(
        self,
        model: torch.nn.Module,
        domain_names: list[str],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        auc_bins: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.domain_names = list(domain_names)
        self.num_domains = len(domain_names)
        self.lr = lr
        self.weight_decay = weight_decay
        self.phase = Phase(1, PhaseSpec("joint", "off", ("backbone",)))
        # (trainable positions, Adam state) of the last phase, for a phase with optimizer: carry
        self.carried_optimizer: tuple[list[int], dict] | None = None
        self.val_metric = DomainAUC(self.num_domains, self.domain_names, bins=auc_bins)
        self.test_metric = DomainAUC(self.num_domains, self.domain_names, bins=auc_bins)
        self._expert_val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._experts_in_batch: torch.Tensor | None = None
        self._absent_experts: frozenset[int] = frozenset()
        self.last_val: dict | None = None
        self.last_expert_val: torch.Tensor | None = None
        self.test_result: dict | None = None
        self._gate_sum: torch.Tensor | None = None
        self._gate_rows: torch.Tensor | None = None
        self._gate_entropy: torch.Tensor | None = None
        self._train_sums: dict[str, torch.Tensor] = {}  # this epoch's row-weighted sums
        self._train_rows: dict[str, int] = {}

    # ----------------------------------------------------------------- forward
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["sparse"], batch["domain"], batch.get("expert"))

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """A batch whose tensors are already on the device (a CPU run) as it is: Lightning's
        generic walk over the batch cost ~0.3 ms a step for nothing there."""
        there = isinstance(batch, dict) and all(
            isinstance(value, torch.Tensor) and value.device == device for value in batch.values()
        )
        return batch if there else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the trainable parameters at the phase's learning rate.

        With ``optimizer: carry`` and the same trainable parameters as the phase before,
        Adam's moments and step count continue from there (the reference's single Adam).
        """
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.phase.spec.lr if self.phase.spec.lr is not None else self.lr
        experts = self.model.expert_parameters() if hasattr(self.model, "expert_parameters") else []
        optimizer = make_adam(trainable, lr, self.weight_decay, experts, self._experts_to_skip)
        carried = self.carried_optimizer
        carry = self.phase.spec.optimizer == "carry" and carried is not None
        if carry and carried[0] == self._trainable_positions():
            state = carried[1]
            for group in state["param_groups"]:
                group["lr"] = lr
            optimizer.load_state_dict(state)
        return optimizer

    def keep_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember Adam's state at the end of a phase, for a next phase that carries it."""
        self.carried_optimizer = (self._trainable_positions(), optimizer.state_dict())

    def _trainable_positions(self) -> list[int]:
        """Which parameters train, as positions in ``model.parameters()`` (stable on resume)."""
        return [i for i, p in enumerate(self.model.parameters()) if p.requires_grad]

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        if self.phase.per_expert:
            self._experts_in_batch = experts_in_global_batch(batch)
            loss = self._experts_loss(logits, batch)
        else:
            loss = batch_mean_bce(logits, batch["label"], batch)
        if self.phase.spec.trains_gate:
            loss = loss + self._gate_auxiliary_loss(len(batch["label"]))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} in {self.phase.prefix} ({self.phase.kind}), "
                f"epoch {self.current_epoch}, step {batch_idx}"
            )
        self._add_to_epoch_mean(f"{self.phase.prefix}/train/loss", loss, len(batch["label"]))
        self._log_epoch_means_after_the_last_batch()
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_rows = {}, {}

    def _add_to_epoch_mean(self, name: str, value: torch.Tensor, rows: int) -> None:
        """Accumulate a per-batch training scalar for its epoch's row-weighted mean.

        Lightning's ``self.log`` costs ~1.5 ms a call on the CPU (it moves its result
        object to the device every time), 10-15% of a base DeepFM step; an add does not.
        """
        weighted = value.detach().float() * rows
        total = self._train_sums.get(name)
        self._train_sums[name] = weighted if total is None else total + weighted
        self._train_rows[name] = self._train_rows.get(name, 0) + rows

    def _log_epoch_means_after_the_last_batch(self) -> None:
        """Log each accumulated scalar once, at the epoch's last batch: the row-weighted mean
        over the epoch (under DDP over every process's rows), as a per-step ``self.log``
        with ``on_epoch=True`` gave. With no trainer (a test calling the step), every step.
        """
        trainer = self._trainer
        if trainer is not None and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        self._log_epoch_means()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means()  # a loader that could not tell its last batch in advance

    def _log_epoch_means(self) -> None:
        for name, total in self._train_sums.items():
            rows = self._train_rows[name]
            self.log(
                name,
                total / rows,
                on_step=False,
                on_epoch=True,
                prog_bar=name.endswith("/train/loss"),
                batch_size=rows,
                sync_dist=True,  # under DDP, over every process's rows; else a no-op
            )
        self._train_sums, self._train_rows = {}, {}

    @staticmethod
    def _experts_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Phase 2's loss: per-expert means, of the global batch under DDP."""
        if "global_rows" not in batch:
            return expert_mean_bce(logits, batch["label"], batch["expert"])
        return sharded_expert_mean_bce(
            logits, batch["label"], batch["expert"], batch["global_rows"], batch["world_size"]
        )

    def _gate_auxiliary_loss(self, batch_size: int) -> torch.Tensor | float:
        """``weight * balance loss`` while the gate trains, logged unweighted.

        Only phases that train the gate add it (the paper's phase 3); base and
        MLoRA have none. Zero when the weight is 0 (the reference).
        """
        weight, auxiliary = adapter_auxiliary_loss(self.model)
        if weight == 0 or auxiliary is None:
            return 0.0
        self._add_to_epoch_mean(f"{self.phase.prefix}/train/balance_loss", auxiliary, batch_size)
        return weight * auxiliary

    def on_after_backward(self) -> None:
        """Note the experts absent from the batch, which Adam then skips, as if trained alone.

        Under DDP "absent" means absent from the global batch, the same on every process
        (an expert absent from this shard but present in another's has an averaged grad).
        """
        self._absent_experts = frozenset()
        if not self.phase.per_expert or self._experts_in_batch is None:
            return
        present = set(self._experts_in_batch.tolist())
        experts = range(len(self.phase.assignment))
        self._absent_experts = frozenset(e for e in experts if e not in present)

    def _experts_to_skip(self) -> frozenset[int]:
        """What Adam leaves alone this step: frozen experts, and those absent from the batch."""
        frozen = getattr(self.model, "frozen_experts", frozenset())
        return frozenset(frozen) | self._absent_experts

    # -------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs = torch.sigmoid(self(batch))
        if self.phase.per_expert:
            group = batch["expert"] * self.num_domains + batch["domain"]
            self._expert_val.append((probs, batch["label"], group))
        else:
            self.val_metric.update(probs, batch["label"], batch["domain"])

    def on_validation_epoch_start(self) -> None:
        average_running_statistics(self.model)  # under DDP: one model on every process

    def on_validation_epoch_end(self) -> None:
        prefix = f"{self.phase.prefix}/val"
        if self.phase.per_expert:
            self._finish_expert_validation(prefix)
            return
        result = self.val_metric.compute()
        self.val_metric.reset()
        self.last_val = result
        self._log_summary(prefix, result)

    def _finish_expert_validation(self, prefix: str) -> None:
        """Each expert's WAUC over the domains it serves, backbone + that expert only.

        Under DDP the rows of every process are gathered first, so every process computes
        the same (single-process) AUCs and per-expert early stopping decides alike.
        """
        probs, label, group = (torch.cat(parts) for parts in zip(*self._expert_val, strict=True))
        probs, label, group = gather_rows(probs, label, group)
        self._expert_val.clear()
        num_experts = len(self.phase.assignment)
        auc, count = grouped_auc(probs, label, group, num_experts * self.num_domains)
        auc, count = auc.view(num_experts, self.num_domains), count.view(num_experts, -1)
        per_expert = torch.tensor([weighted_auc(auc[e], count[e]) for e in range(num_experts)])
        self.last_expert_val = per_expert
        for expert, value in enumerate(per_expert.tolist()):
            self.log(f"{prefix}/wauc/expert{expert}", value)
        self.log(f"{prefix}/wauc", weighted_auc(auc.flatten(), count.flatten()), prog_bar=True)

    # -------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        average_running_statistics(self.model)
        self.test_metric.reset()
        num_experts = getattr(self.model, "num_experts", 0)
        if getattr(self.model, "routing", "off") == "mixture" and num_experts:
            self._gate_sum = torch.zeros(self.num_domains, num_experts, dtype=torch.float64)
            self._gate_rows = torch.zeros(self.num_domains, dtype=torch.float64)
            self._gate_entropy = torch.zeros(self.num_domains, dtype=torch.float64)
        else:
            self._gate_sum = self._gate_rows = self._gate_entropy = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs = torch.sigmoid(self(batch))
        self.test_metric.update(probs, batch["label"], batch["domain"])
        if self._gate_sum is not None:
            weights = self.model.gate_weights(batch["sparse"], batch["domain"]).double().cpu()
            domain = batch["domain"].cpu()
            self._gate_sum.index_add_(0, domain, weights)
            self._gate_rows.index_add_(0, domain, torch.ones_like(domain, dtype=torch.float64))
            self._gate_entropy.index_add_(0, domain, routing_entropy(weights))

    def on_test_epoch_end(self) -> None:
        result = self.test_metric.compute()
        if self._gate_sum is not None:  # summed over the processes' shards under DDP
            gate_sum, gate_rows = all_reduce_sum(self._gate_sum), all_reduce_sum(self._gate_rows)
            rows = gate_rows.clamp(min=1)
            result["gate_weights"] = gate_sum / rows[:, None]
            result["gate_entropy"] = all_reduce_sum(self._gate_entropy) / rows
        self.test_result = result
        self._log_summary("test", result)

    # ----------------------------------------------------------------- helpers
    def _log_summary(self, prefix: str, result: dict) -> None:
        for key in ("wauc", "mean_auc", "auc", "logloss"):
            self.log(f"{prefix}/{key}", float(result[key]), prog_bar=key == "wauc")
        for name, value in zip(self.domain_names, result["auc_per_domain"].tolist(), strict=True):
            self.log(f"{prefix}/auc/{metric_safe(name)}", value)
