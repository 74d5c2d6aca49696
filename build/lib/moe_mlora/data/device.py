"""Keeping the data splits on the accelerator, so batches are sliced there instead of copied."""

from __future__ import annotations

import logging

import torch

from moe_mlora.data.processed import ProcessedData

log = logging.getLogger("moe_mlora")

MAX_SHARE_OF_FREE_MEMORY = 0.5  # the rest is for the model, activations and evaluation


def split_bytes(data: ProcessedData) -> int:
    """Bytes of every split's tensors (sparse ids, domains, labels)."""
    return sum(
        t.numel() * t.element_size()
        for split in data.splits.values()
        for t in (split.sparse, split.domain, split.label)
    )


def move_splits(data: ProcessedData, device: torch.device) -> None:
    """Move every split's tensors to ``device`` in place."""
    for split in data.splits.values():
        split.sparse = split.sparse.to(device)
        split.domain = split.domain.to(device)
        split.label = split.label.to(device)


def place_on_gpu(data: ProcessedData, accelerator: str, devices) -> bool:
    """Move the splits to the (single) CUDA device when training there and they fit.

    With one device, every training and evaluation batch is then an index slice on the GPU:
    no host-to-device copy per batch. Several devices (DDP) keep them on the CPU, each rank
    copying only its shard's batches. Returns whether the splits moved.
    """
    wants_gpu = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if not wants_gpu or not torch.cuda.is_available() or str(devices) not in ("1", "[0]"):
        return False
    free, _ = torch.cuda.mem_get_info()
    needed = split_bytes(data)
    if needed > MAX_SHARE_OF_FREE_MEMORY * free:
        log.info("data splits (%.1f GB) stay on the CPU: too large for the GPU", needed / 1e9)
        return False
    move_splits(data, torch.device("cuda", torch.cuda.current_device()))
    log.info("data splits (%.1f MB) moved to the GPU once", needed / 1e6)
    return True
