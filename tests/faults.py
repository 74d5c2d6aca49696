"""``python -m moe_mlora.run`` with one fault injected, for the tests of what a user sees.

Usage: ``MOE_MLORA_FAULT=<fault> python tests/faults.py [overrides]``. Faults:

* ``kill_before_results``: SIGKILL right before results.json is written (model.pt is);
* ``disk_full_after_phase1``: once phase 1 has ended, every torch.save of a file into a
  run's checkpoints/ fails the way torch reports a full disk.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import moe_mlora.pipeline.results as results
import moe_mlora.run as run


def kill_before_results() -> None:
    write = results.write_json_atomically

    def killed(path: Path, payload: dict) -> None:
        if path.name == "results.json" and payload.get("status") == "completed":
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, payload)

    results.write_json_atomically = killed


def disk_full_after_phase1() -> None:
    save = torch.save

    def failing(payload, target, *args, **kwargs):
        if not isinstance(target, (str, os.PathLike)):  # Lightning saves into a buffer first
            return save(payload, target, *args, **kwargs)
        target = Path(target)
        if target.parent.name == "checkpoints" and (target.parent / "phase1.pt").exists():
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                "PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return save(payload, target, *args, **kwargs)

    torch.save = failing


FAULTS = {
    "kill_before_results": kill_before_results,
    "disk_full_after_phase1": disk_full_after_phase1,
}

if __name__ == "__main__":
    FAULTS[os.environ["MOE_MLORA_FAULT"]]()
    sys.argv[0] = "moe_mlora.run"
    run.main()
