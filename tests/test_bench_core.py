"""Where the benchmarks look for MovieLens-100K when not told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_bench_reads_the_data_folder_from_the_environment_and_says_how_to_set_it(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-ml-100k"
    env = {**os.environ, "MOE_MLORA_ML100K": str(missing)}
    done = subprocess.run(
        [sys.executable, "-m", "moe_mlora.bench", "core", "--steps-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert str(missing) in error
    assert "--root DIR or set MOE_MLORA_ML100K" in error
