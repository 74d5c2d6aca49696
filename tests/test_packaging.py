"""A real package: the wheel carries conf/, runs outside the repository, and one console
command (``moe-mlora``) reaches every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moe_mlora.console import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "CI": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(out), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("moe_mlora-*.whl")
    return path


def test_the_wheel_ships_every_module_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"moe_mlora/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    modules = {str(p.relative_to(REPO)) for p in (REPO / "moe_mlora").rglob("*.py")}
    assert configs <= names, sorted(configs - names)
    assert modules <= names, sorted(modules - names)  # a new subpackage must join pyproject
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "moe-mlora = moe_mlora.console:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_a_non_editable_install_runs_from_anywhere(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**ENV, "PYTHONPATH": str(target)}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "moe_mlora.run", "method=base", "data.users=200", "data.items=150",
         "data.ratings=6000", "trainer.max_epochs=1", "logger.wandb.enabled=false",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "name: base" in config and (run / "results.json").is_file()
    where = subprocess.run(
        [sys.executable, "-c", "import moe_mlora.config as c; print(c.CONF_DIR)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.strip() == str(target / "moe_mlora" / "conf")


def test_the_console_command_dispatches_and_names_a_mistyped_command(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    assert main(["rnu"]) == 2
    assert "did you mean run?" in capsys.readouterr().err
    assert main(["predict", "--help"]) == 0
    assert "ckpt=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:  # argparse's --help exits
        main(["generate", "--help"])
    assert done.value.code == 0


def test_tab_completion_of_run_overrides_through_the_console_command():
    env = {**ENV, "COMP_LINE": "moe-mlora run trainer.max_epo"}
    result = subprocess.run(
        [sys.executable, "-m", "moe_mlora.console", "-sc", "query=bash"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer.max_epochs=" in result.stdout
