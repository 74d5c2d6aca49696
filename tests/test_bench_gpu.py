"""``bench gpu`` and ``bench gpu_checks`` on the CPU: the same code the GPU machine runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_mlora.bench import gpu, gpu_checks


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated data in a fresh cache folder (the DDP check's process inherits it)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOE_MLORA_CACHE", str(folder))
    return folder


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows[1:]]


def test_gpu_checks_pass_on_the_cpu(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "checks.md"
    gpu_checks.main(["accelerator=cpu", "clicks=20000", f"out={out}"])
    rows = table_rows(out.read_text())
    names = [
        "CIN backward, bf16 autocast",
        "every method, one bf16 step",
        "xDeepFM training, bf16-mixed",
        "DDP, one device",
    ]
    assert [row[0] for row in rows] == names
    assert [row[1] for row in rows] == ["pass"] * 4, rows
    assert rows[1][2].startswith("10 of 10 finite: base, mlora (dense), moe top-2 (dense)")
    assert "test WAUC 0." in rows[2][2] and "test WAUC 0." in rows[3][2]


def test_a_failing_check_fails_the_command_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def crash(*args) -> gpu_checks.Check:
        raise RuntimeError("expected scalar type Float but found BFloat16")

    def fine(name: str):
        return lambda *args: gpu_checks.Check(name, True, "ok")

    monkeypatch.setattr(gpu_checks, "cin_bf16_gradients", crash)
    monkeypatch.setattr(gpu_checks, "every_method_bf16_step", fine("every method, one bf16 step"))
    monkeypatch.setattr(gpu_checks, "bf16_training", fine("xDeepFM training, bf16-mixed"))
    monkeypatch.setattr(gpu_checks, "ddp_one_device", fine("DDP, one device"))
    with pytest.raises(SystemExit) as stopped:
        gpu_checks.main(["accelerator=cpu"])
    assert stopped.value.code == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][:2] == ["CIN backward, bf16 autocast", "FAIL"]
    assert "found BFloat16" in rows[0][2]
    assert [row[1] for row in rows[1:]] == ["pass"] * 3


def test_the_cin_check_fails_when_the_backward_strays_from_autograds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moe_mlora.models import cin

    original = cin._CINProductsMatmul.backward

    def off_by_a_tenth(ctx, grad):
        return tuple(None if g is None else g * 1.1 for g in original(ctx, grad))

    monkeypatch.setattr(cin._CINProductsMatmul, "backward", staticmethod(off_by_a_tenth))
    check = gpu_checks.cin_bf16_gradients("cpu", tolerance=0.02)
    assert not check.passed and "further from float32" in check.detail


def test_gpu_bench_runs_every_phase_on_the_cpu(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    argv = ["accelerator=cpu", "clicks=20000", "max-epochs=1", "batch-sizes=512", f"out={out}"]
    gpu.main(argv)
    rows = table_rows(out.read_text())
    assert [(row[0], row[1]) for row in rows] == [("base", "512")] + [("moe_mlora E=8", "512")] * 3
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)
    assert all(0.0 < float(row[5]) < 1.0 for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("module", [gpu, gpu_checks], ids=["gpu", "gpu_checks"])
def test_without_cuda_the_gpu_commands_stop_with_a_message(module) -> None:
    with pytest.raises(SystemExit, match="no CUDA device here"):
        module.main([])


def test_gpu_wheels_pins_what_is_installed_here_for_the_gpu_machines_python(
    tmp_path: Path,
) -> None:
    from importlib import metadata

    from moe_mlora.bench import gpu_wheels

    download, *built = gpu_wheels.commands(tmp_path, "3.12")
    hydra = f"hydra-core=={metadata.version('hydra-core')}"
    polars = f"polars=={metadata.version('polars')}"
    assert download[3:6] == ["download", "--no-deps", "--only-binary=:all:"]
    assert hydra in download and polars in download
    assert download[download.index("--python-version") + 1] == "3.12"
    assert download[download.index("-d") + 1] == str(tmp_path)
    antlr = f"antlr4-python3-runtime=={metadata.version('antlr4-python3-runtime')}"
    assert antlr not in download  # published as a source archive only: built into a wheel
    assert built == [[*download[:3], "wheel", "--no-deps", "-w", str(tmp_path), antlr]]


def test_the_gpu_script_without_packages_or_wheels_stops_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "experiments" / "gpu" / "run_checks.sh"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": "false"}
    env["GPU_WHEELS"] = str(tmp_path / "no-wheels")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "run 'make gpu-wheels'" in done.stdout
    assert "run 'make gpu-wheels'" in (tmp_path / "out" / "log.txt").read_text()  # tee done
