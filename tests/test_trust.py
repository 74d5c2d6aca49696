"""Hostile and careless cases: planted files, lost results, two writers, full disks, Ctrl-C.

Where the behaviour is about what a user sees, the real entry point runs as a subprocess
(``python -m moe_mlora.run``, or ``tests/faults.py`` for an injected fault) and the test
checks the exit status, the one line on stderr and what is left in the run folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_run import tiny

from moe_mlora.config import ConfigError, compose
from moe_mlora.data import cache as cache_code
from moe_mlora.data.cache import load_or_build
from moe_mlora.data.movielens import build_movielens
from moe_mlora.data.processed import DataError
from moe_mlora.data.taobao import build_taobao
from moe_mlora.pipeline.runner import train_and_evaluate
from moe_mlora.precheck import find_problem
from moe_mlora.runfolder import FolderBusy, owning
from moe_mlora.training.checkpoints import CheckpointError, RunCheckpoints

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "WANDB_MODE": "offline", "CI": "1"}


def cli(*args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m moe_mlora.run ARGS`` (through tests/faults.py when a fault is injected)."""
    entry = [str(TESTS / "faults.py")] if fault else ["-m", "moe_mlora.run"]
    env = {**ENV, "MOE_MLORA_FAULT": fault} if fault else ENV
    return subprocess.run(
        [sys.executable, *entry, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The run ended with ``status`` and one ``moe_mlora: error:`` line, no traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("moe_mlora: error")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


class Planted:
    """An object whose unpickling would create ``marker``: what an attacker's file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished(cache_dir, tmp_path_factory) -> Path:
    """A finished run folder (the default schedule, seed 1) made by the command line."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    result = cli(*tiny(cache_dir, f"hydra.run.dir={folder}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


# ----------------------------------------------------- 1. weights, never code
@pytest.mark.parametrize("name", ["phase1.pt", "phase1-last.ckpt"])
def test_a_planted_checkpoint_is_refused_without_running_it(name, cache_dir, tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "pwned"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(
        {"config_fingerprint": "x", "moe_mlora": Planted(marker)}, folder / "checkpoints" / name
    )

    line = one_error_line(cli(*tiny(cache_dir, f"resume={folder}")))
    assert not marker.exists()
    assert name in line and "not a readable checkpoint" in line and "was not run" in line


def test_a_planted_checkpoint_is_refused_in_process_too(tmp_path):
    marker = tmp_path / "pwned"
    checkpoints = RunCheckpoints(tmp_path, "abc")
    checkpoints.folder.mkdir()
    torch.save({"report": Planted(marker)}, checkpoints.phase_file(1))
    torch.save({"moe_mlora": Planted(marker)}, checkpoints.epoch_file(2))
    with pytest.raises(CheckpointError, match=r"phase1\.pt"):
        checkpoints.finished_phase(1)
    with pytest.raises(CheckpointError, match=r"phase2-last\.ckpt"):
        checkpoints.resume_path(2)
    assert not marker.exists()


def test_a_planted_cache_entry_is_rebuilt_without_running_it(ml100k_root, tmp_path):
    marker = tmp_path / "pwned"

    def build():
        return build_movielens(ml100k_root, "gender", progress=False)

    first = load_or_build(tmp_path / "cache", {"k": 1}, [], build, label="planted")
    (entry,) = (tmp_path / "cache" / "processed").iterdir()
    torch.save({"sparse": Planted(marker)}, entry / "data.pt")
    again = load_or_build(tmp_path / "cache", {"k": 1}, [], build, label="planted")
    assert not marker.exists()
    assert again.num_domains == first.num_domains


# --------------------------------------------- 2. no finished run overwritten
def snapshot(folder: Path) -> dict[str, bytes]:
    names = ["results.json", "model.pt", ".hydra/config.yaml", ".hydra/overrides.yaml"]
    return {name: (folder / name).read_bytes() for name in names}


def test_resume_of_a_finished_run_with_another_config_is_refused(cache_dir, finished):
    before = snapshot(finished)
    line = one_error_line(cli(*tiny(cache_dir, "seed=2", f"resume={finished}")))
    assert str(finished) in line and "another config" in line and "not overwritten" in line
    assert snapshot(finished) == before  # Hydra's record of the run is put back too


def test_a_new_run_into_a_finished_folder_of_another_config_is_refused(cache_dir, finished):
    before = snapshot(finished)
    one_error_line(cli(*tiny(cache_dir, "method=base", f"hydra.run.dir={finished}")))
    assert snapshot(finished) == before


def test_a_finished_run_resumed_with_its_config_reports_it(cache_dir, finished):
    before = snapshot(finished)
    result = cli(*tiny(cache_dir, f"resume={finished}", "threads=1"))  # threads: presentation
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already completed" in result.stdout
    assert snapshot(finished) == before


def test_a_sweep_rerun_into_a_folder_of_another_config_leaves_it(cache_dir, finished, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    os.symlink(finished, sweep / "job")  # the job's folder, holding another config's run
    before = snapshot(finished)
    sweep_args = [f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"]
    result = cli("-m", *tiny(cache_dir, "method=base", *sweep_args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "job refused" in result.stdout and "another config" in result.stdout
    assert snapshot(finished) == before


# ------------------------------------------------------ 3. commit marker last
def test_a_kill_between_model_and_results_resumes_instead_of_skipping(cache_dir, tmp_path):
    folder = tmp_path / "run"
    args = tiny(cache_dir, "seed=3")
    killed = cli(*args, f"hydra.run.dir={folder}", fault="kill_before_results")
    assert killed.returncode == -signal.SIGKILL
    assert (folder / "model.pt").is_file() and not (folder / "results.json").exists()

    resumed = cli(*args, f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((folder / "results.json").read_text())["status"] == "completed"
    assert not (folder / "checkpoints").exists()


# --------------------------------------------------- 4. one writer per folder
HOLD = """
import sys, time
from moe_mlora.runfolder import owning
with owning(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_told_who_holds_the_folder_and_a_killed_one_blocks_nothing(
    cache_dir, tmp_path
):
    folder = tmp_path / "run"
    holder = hold(folder)
    try:
        line = one_error_line(cli(*tiny(cache_dir, "method=base", f"hydra.run.dir={folder}")))
        assert str(folder) in line and f"pid {holder.pid}" in line
        assert not (folder / "csv").exists()
    finally:
        holder.kill()
        holder.wait()
    result = cli(*tiny(cache_dir, "method=base", f"hydra.run.dir={folder}"))
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_sweep_job_whose_folder_is_held_is_refused_and_the_sweep_goes_on(tmp_path, capsys):
    from moe_mlora.sweep import run_sweep_job

    holder = hold(tmp_path)
    try:
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"), owning(tmp_path):
            pass
        trained = []
        result = run_sweep_job(compose([]), tmp_path, lambda c, o: trained.append(o), print)
        assert result is None and trained == []
        assert "job refused" in capsys.readouterr().out
        assert not (tmp_path / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- 5. full disks
def test_a_full_cache_disk_is_a_warning_and_the_run_goes_on(
    ml100k_root, tmp_path, monkeypatch, caplog
):
    def full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    data = load_or_build(
        tmp_path, {"k": 1}, [], lambda: build_movielens(ml100k_root, "gender", progress=False)
    )
    assert data.num_domains == 2
    assert "going on uncached" in caplog.text
    assert list((tmp_path / "processed").iterdir()) == []  # no staging folder left


@pytest.mark.parametrize("kind", ["a file", "not creatable"])
def test_an_unusable_cache_folder_is_a_warning_and_a_temporary_one_is_used(kind, tmp_path, caplog):
    wanted = tmp_path / "taken"
    wanted.write_text("")
    if kind == "not creatable":
        wanted = wanted / "below"
    used = cache_code.usable_cache_dir(wanted)
    assert used != wanted and used.is_dir()
    assert "cannot be written" in caplog.text and str(wanted) in caplog.text


def test_a_killed_cache_build_leaves_no_staging_folder_for_long(tmp_path):
    processed = tmp_path / "processed"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = (
        processed
        / f".movielens-abc{cache_code.STAGING_MARK}{cache_code.host_tag()}-{dead.stdout.strip()}-x1"
    )
    live = (
        processed
        / f".movielens-abc{cache_code.STAGING_MARK}{cache_code.host_tag()}-{os.getpid()}-x2"
    )
    for folder in (stale, live):
        folder.mkdir(parents=True)
    cache_code.remove_stale_staging(processed)
    assert not stale.exists() and live.exists()


def test_a_full_run_folder_ends_in_one_line_and_the_run_resumes(cache_dir, tmp_path):
    folder = tmp_path / "run"
    args = tiny(cache_dir, "seed=4")
    full = cli(*args, f"hydra.run.dir={folder}", fault="disk_full_after_phase1")
    line = one_error_line(full)
    assert "could not write" in line and "phase2.pt" in line and "Free space" in line
    assert "resume=" in full.stderr
    assert not list((folder / "checkpoints").glob(".*.tmp"))

    resumed = cli(*args, f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((folder / "results.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ 12. Ctrl-C
def test_ctrl_c_keeps_the_checkpoints_and_prints_the_resume_command(cache_dir, tmp_path):
    folder = tmp_path / "run"
    args = tiny(cache_dir, "data.ratings=12000", "trainer.max_epochs=6", "seed=5")
    process = subprocess.Popen(
        [sys.executable, "-m", "moe_mlora.run", *args, f"hydra.run.dir={folder}"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    epoch = folder / "checkpoints" / "phase1-last.ckpt"
    deadline = time.monotonic() + 300
    while not epoch.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    command = next(line.strip() for line in stderr.splitlines() if "resume=" in line)
    assert command.startswith("python -m moe_mlora.run") and f"resume={folder}" in command
    assert (folder / "checkpoints").is_dir()

    resumed = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout


# ------------------------------------------- 6. every config value, before work
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
        (["data.eval_batch_size=-5"], "data.eval_batch_size=-5 must be an integer >= 1"),
        (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be a number > 0"),
        (["optimizer.lr=nan"], "optimizer.lr=nan must be a number > 0"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 must be a number >= 0"),
        (["seed=1.5"], "seed=1.5 must be an integer"),
        (["seed=abc"], "seed='abc' must be an integer"),
        (["experts=2.5"], "experts=2.5 must be an integer >= 1 or null"),
        (["experts_per_domain=0"], "experts_per_domain=0 must be an integer >= 1"),
        (["threads=0"], "threads=0 must be an integer >= 1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer >= 1"),
        (["callbacks.early_stopping.patience=-1"], "patience=-1 must be an integer >= 1"),
        (
            ["trainer.max_epoch=3"],
            "trainer.max_epoch is not a config key; did you mean trainer.max_epochs?",
        ),
        (["trainr.max_epochs=3"], "did you mean trainer.max_epochs?"),
        (["experts_per_domian=2"], "did you mean experts_per_domain?"),
        (["model=deepfmm"], "model=deepfmm: no such option; did you mean model=deepfm?"),
        (["method=mlroa"], "did you mean method=mlora?"),
        (["trainer=gpu"], "trainer=gpu"),
        (["data=movielens_gender"], "data.root is not set"),
        (["data=taobao20", "data.root=/etc/hostname"], "is a file; give the folder"),
        (["data=movielens_gender", "data.root=/etc/hostname"], "a file, not the folder"),
        (["data=table"], "data.path is not set"),
        (["trainer.precision=bf15"], "did you mean trainer.precision=bf16?"),
        (["hydra.run.dir=/etc/hostname"], "hydra.run.dir=/etc/hostname is a file"),
        (["resume=/etc/hostname"], "resume=/etc/hostname is a file"),
        (["trainer.devices=abc"], "trainer.devices='abc' must be a count"),
    ],
)
def test_a_bad_value_is_named_with_its_fix_before_any_work(overrides, expected):
    if overrides == ["trainer=gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    problem = find_problem([*overrides, "logger.wandb.enabled=false"])  # what `run` checks first
    assert problem is not None and expected in problem
    assert "+trainer" not in problem


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
        (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be a number > 0"),
        (["data=taobao20", "data.root=/etc/hostname"], "is a file; give the folder"),
    ],
)
def test_the_command_line_shows_one_line_and_exit_status_2(overrides, expected, tmp_path):
    folder = tmp_path / "run"
    line = one_error_line(cli(*overrides, f"hydra.run.dir={folder}", "logger.wandb.enabled=false"))
    assert expected in line
    assert not folder.exists()  # refused before Hydra made the run folder


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.dropout=1.5", "model=deepfm: dropout must be in [0, 1)"),
        ("model.embedding_dim=0", "model=deepfm: embedding_dim must be >= 1"),
        ("trainer.devices=[0]", "trainer: Lightning refuses these settings"),
    ],
)
def test_model_and_trainer_options_out_of_range_are_config_errors(
    override, expected, cache_dir, tmp_path
):
    if override.startswith("trainer.devices") and torch.cuda.is_available():
        pytest.skip("a GPU takes a list of device ids")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train_and_evaluate(compose(tiny(cache_dir, override)), tmp_path)


def test_values_are_checked_for_api_callers_too(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size=0 must be an integer >= 1"):
        train_and_evaluate(compose(tiny(cache_dir, "data.batch_size=0")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_expert_count_that_cannot_fit_is_refused_before_it_is_allocated(cache_dir, tmp_path):
    line = one_error_line(cli(*tiny(cache_dir, "experts=2000000", f"hydra.run.dir={tmp_path}")))
    assert "experts=2000000 needs about" in line and "GiB" in line and "lower experts" in line


# -------------------------------------------- 10. a sweep checks every job first
def test_a_sweep_recipe_without_its_data_root_launches_no_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("-m", "experiment=paper_movielens", f"hydra.sweep.dir={sweep}")
    line = one_error_line(result)
    assert "data.root is not set" in line and "in the sweep's job" in line
    assert not sweep.exists()


def test_a_bad_value_in_one_swept_job_stops_the_sweep_before_it_starts(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny(cache_dir, "experts=2,0", "method=moe_mlora", f"hydra.sweep.dir={sweep}")
    line = one_error_line(cli("-m", *args))
    assert "experts=0 must be an integer >= 1" in line and "experts=0" in line
    assert not sweep.exists()


def test_a_slurm_sweep_without_slurm_is_one_line(tmp_path):
    if subprocess.run(["which", "sbatch"], capture_output=True).returncode == 0:
        pytest.skip("SLURM is installed here")
    line = one_error_line(cli("-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 's'}"))
    assert "hydra/launcher=slurm needs SLURM" in line and "hydra/launcher=parallel" in line


# ----------------------------------------------------- 7. one domain is plain CTR
@pytest.fixture(scope="module")
def one_domain_csv(tmp_path_factory) -> Path:
    """A click table whose domain column has a single value."""
    rng = np.random.default_rng(0)
    users, items = rng.integers(1, 200, 4000), rng.integers(1, 150, 4000)
    label = rng.random(4000) < 1 / (1 + np.exp(-(np.sin(users) + np.cos(items))))
    path = tmp_path_factory.mktemp("one") / "logs.csv"
    frame = {"user_id": users, "item_id": items, "domain": "all", "label": label.astype(int)}
    pl.DataFrame(frame).write_csv(path)
    return path


def one_domain_args(path: Path, cache_dir: Path, *overrides: str) -> list[str]:
    tiny_run = [o for o in tiny(cache_dir) if not o.startswith("data.")]
    return [*tiny_run, "data=table", f"data.path={path}", *overrides]


@pytest.mark.parametrize(
    "overrides",
    [["method=base"], ["method=mlora"], ["method=moe_mlora"], ["method/schedule=paper"]],
)
def test_one_domain_trains_and_tests_with_every_method(
    one_domain_csv, cache_dir, tmp_path, overrides
):
    args = one_domain_args(one_domain_csv, cache_dir, *overrides)
    results = train_and_evaluate(compose(args), tmp_path)
    assert results["status"] == "completed"
    assert list(results["test"]["per_domain"]) == ["all"]
    assert results["test"]["wauc"] == pytest.approx(results["test"]["auc"])


def test_one_domain_on_the_command_line(one_domain_csv, cache_dir, tmp_path):
    folder = tmp_path / "run"
    args = one_domain_args(one_domain_csv, cache_dir, f"hydra.run.dir={folder}")
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((folder / "results.json").read_text())["status"] == "completed"


# ------------------------------------------- 8. bad values in input files, at load
@pytest.fixture(scope="module")
def cloudtheme(tmp_path_factory) -> Path:
    from moe_mlora.data.synthetic_taobao import generate_taobao

    return generate_taobao(
        tmp_path_factory.mktemp("cloudtheme"),
        n_themes=4,
        n_users=300,
        n_items=200,
        n_clicks=6000,
        seed=1,
        dim=8,
    )


def copy_of(root: Path, target: Path) -> Path:
    return Path(shutil.copytree(root, target))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e39"])
def test_a_non_finite_pretrained_vector_is_refused_naming_its_line(cloudtheme, tmp_path, bad):

    root = copy_of(cloudtheme, tmp_path / "root")
    vectors = root / "user_embedding.csv"
    lines = vectors.read_text().splitlines()
    user, values = lines[3].split(",", 1)
    numbers = values.strip('"').split(" ")
    numbers[2] = bad
    lines[3] = f"{user},{' '.join(numbers)}"
    vectors.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"user_embedding\.csv, line 4: expected finite numbers"):
        build_taobao(root, themes=2, progress=False)


@pytest.mark.parametrize("case", ["empty", "unmatched"])
def test_a_click_log_without_usable_clicks_says_why(cloudtheme, tmp_path, case):

    root = copy_of(cloudtheme, tmp_path / "root")
    log = root / "theme_click_log.csv"
    header, *rows = log.read_text().splitlines()
    if case == "unmatched":
        rows = [f"x{row}" for row in rows]  # user ids that have no vector
    log.write_text("\n".join([header, *([] if case == "empty" else rows)]) + "\n")
    with pytest.raises(DataError) as error:
        build_taobao(root, themes=2, progress=False)
    message = str(error.value)
    assert "themes <= 0" not in message
    assert ("no clicks" if case == "empty" else "do not match") in message


def test_a_byte_order_mark_is_read_past(cloudtheme, ml100k_root, tmp_path):
    root = copy_of(cloudtheme, tmp_path / "root")
    for name in ("theme_click_log.csv", "user_embedding.csv"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    assert build_taobao(root, themes=2, progress=False).num_domains == 2
    movielens = copy_of(ml100k_root, tmp_path / "ml")
    for name in ("u.data", "u.user", "u.item"):
        (movielens / name).write_bytes(b"\xef\xbb\xbf" + (movielens / name).read_bytes())
    assert build_movielens(movielens, "gender", progress=False).num_domains == 2


# ------------------------------------------------------------------- 9. predict
def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_mlora.predict", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def known_rows(finished, tmp_path_factory) -> Path:
    """Rows of ids the finished model knows, written plainly."""
    from moe_mlora.serving import load_model

    served = load_model(finished)
    users, items = served.vocabularies["user"][1:21], served.vocabularies["item"][1:21]
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    domain = [served.domain_names[i % served.num_domains] for i in range(20)]
    pl.DataFrame({"user": users, "item": items, "domain": domain}).write_csv(path)
    return path


def test_ids_written_as_floats_or_zero_padded_are_the_same_ids(finished, known_rows, tmp_path):
    from moe_mlora.serving.predict import predict

    rows = pl.read_csv(known_rows, infer_schema=False)
    plain = predict(finished, known_rows, tmp_path / "plain.csv")
    for name, written in [("float", "{}.0"), ("padded", "0{}"), ("exponent", "{}e0")]:
        path = tmp_path / f"{name}.csv"
        rows.with_columns(pl.col("user", "item").map_elements(written.format, pl.String)).write_csv(
            path
        )
        report = predict(finished, path, tmp_path / f"{name}-scored.csv")
        assert report.oov == {"user": 0, "item": 0}, name
        scores = pl.read_csv(tmp_path / f"{name}-scored.csv")["score"]
        assert scores.to_list() == pl.read_csv(plain.output)["score"].to_list()


def test_mostly_unknown_ids_are_refused_with_examples(finished, known_rows, tmp_path):
    rows = pl.read_csv(known_rows, infer_schema=False)
    path = tmp_path / "wrong.csv"
    rows.with_columns(pl.col("user").map_elements("u-{}".format, pl.String)).write_csv(path)
    result = predict_cli(f"ckpt={finished}", f"input={path}", f"output={tmp_path / 'out.csv'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "100% of column 'user' is unknown" in result.stderr and "max_unseen" in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_predict_refuses_to_write_over_its_input_or_into_a_folder_it_cannot_make(
    finished, known_rows, tmp_path
):
    before = known_rows.read_bytes()
    same = predict_cli(f"ckpt={finished}", f"input={known_rows}", f"output={known_rows}")
    assert same.returncode == 2 and "is the input file" in same.stderr
    assert known_rows.read_bytes() == before
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    inside = predict_cli(f"ckpt={finished}", f"input={known_rows}", f"output={blocked}/sub/o.csv")
    assert inside.returncode == 2 and "Traceback" not in inside.stderr
    assert "cannot create its folder" in inside.stderr


def test_a_table_model_scores_its_own_training_file(one_domain_csv, cache_dir, tmp_path):
    from moe_mlora.serving.predict import predict

    renamed = tmp_path / "logs.csv"
    columns = {"user_id": "uid", "item_id": "iid", "domain": "country"}
    pl.read_csv(one_domain_csv).rename(columns).write_csv(renamed)
    names = ["data.user_col=uid", "data.item_col=iid", "data.domain_col=country"]
    args = one_domain_args(renamed, cache_dir, "method=base", *names)
    train_and_evaluate(compose(args), tmp_path / "run")
    report = predict(tmp_path / "run", renamed, tmp_path / "scored.parquet")
    assert report.rows == 4000 and report.oov["user"] == 0


# --------------------------------------------- 11. off a terminal, say what happens
def test_off_a_terminal_every_epoch_and_phase_is_one_line_and_run_log_has_the_tables(finished):
    log = (finished / "run.log").read_text()
    epochs = [line for line in log.splitlines() if " epoch " in line and "train loss" in line]
    assert len(epochs) >= 2 and "phase 1 (joint) epoch 1/2 · train loss" in epochs[0]
    assert "val WAUC" in epochs[0] and "samples/s" in epochs[0]
    assert "phase 1 (joint) ended after" in log and "phase 2 (finetune) ended after" in log
    assert "test: WAUC" in log and "mean AUC" in log  # the final tables


def test_in_a_terminal_the_progress_bar_names_the_phase(cache_dir, tmp_path, monkeypatch):
    from moe_mlora.training.callbacks import PhaseProgressBar

    descriptions = []
    real = PhaseProgressBar.on_train_epoch_start

    def spy(self, trainer, pl_module):
        real(self, trainer, pl_module)
        descriptions.append(self.train_progress_bar.desc)

    monkeypatch.setattr(PhaseProgressBar, "on_train_epoch_start", spy)
    train_and_evaluate(compose(tiny(cache_dir, "progress=true", "trainer.max_epochs=1")), tmp_path)
    assert descriptions[0].startswith("phase 1 (joint) epoch 1")
    assert descriptions[-1].startswith("phase 2 (finetune) epoch 1")


# ------------------------------------------------------------------ 14. debug runs
def test_a_debug_run_goes_to_debug_and_is_marked(cache_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moe_mlora.run", "debug=default", f"paths.cache_dir={cache_dir}",
         "data.users=200", "data.items=150", "data.ratings=6000"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (tmp_path / "debug").rglob("results.json")
    record = json.loads(results.read_text())
    assert record["run"]["debug"] == "default"
    assert record["phases"][0]["epochs"] == 2
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("mode", ["fdr", "overfit"])
def test_fast_dev_run_and_overfitting_one_batch_work(mode, cache_dir, tmp_path):
    small = [o for o in tiny(cache_dir) if not o.startswith("trainer.")]  # debug sets epochs
    results = train_and_evaluate(compose([*small, f"debug={mode}"]), tmp_path)
    assert results["run"]["debug"] == mode
    if mode == "overfit":
        metrics = pl.read_csv(tmp_path / "csv" / "metrics.csv")
        loss = metrics["phase1/train/loss"].drop_nulls()
        assert len(loss) == 50 and loss[-5:].mean() < 0.6 * loss[0]  # it memorises the batch


def test_export_into_a_folder_it_cannot_make_is_one_line(finished, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "moe_mlora.export", f"ckpt={finished}", "format=torchscript",
         f"output={blocked}/m.ts"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("moe_mlora.export: error:") and str(blocked) in result.stderr


def test_without_a_bar_taobao_preprocessing_logs_each_stage(cloudtheme, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="moe_mlora"):
        build_taobao(cloudtheme, themes=2, progress=False)
    stages = [r.getMessage() for r in caplog.records if "preprocessing" in r.getMessage()]
    assert len(stages) == 5 and stages[3] == "Taobao-2 preprocessing: negatives (stage 4 of 5)"
