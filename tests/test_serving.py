"""Serving a trained model: model.pt, predict on raw ids, errors on bad files, exports.

One tiny MoE-MLoRA run (gender split: domains F and M) is trained once for the
module; every test scores with it or with files derived from it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_run import tiny

import moe_mlora.pipeline.results as results_module
import moe_mlora.serving.bundle as serving
from moe_mlora.config import compose
from moe_mlora.data.processed import FieldSpec, ProcessedData
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.pipeline.runner import train_and_evaluate
from moe_mlora.serving import ServingError, load_model, save_model, score
from moe_mlora.serving.export import export_model
from moe_mlora.serving.export import main as export_main
from moe_mlora.serving.predict import main as predict_main
from moe_mlora.serving.predict import predict

REPO = Path(__file__).resolve().parents[1]
ROWS = 1000


class Trained:
    """The run folder, the trained module and the data it was trained on."""

    def __init__(self, run_dir: Path, module, processed: ProcessedData) -> None:
        self.run_dir = run_dir
        self.module = module
        self.processed = processed

    def test_rows(self, n: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        test = self.processed.splits["test"]
        return test.sparse[:n], test.domain[:n]

    def raw_frame(self, n: int = ROWS) -> pl.DataFrame:
        """Test rows as raw values: ids back through the vocabularies, domains by name."""
        sparse, domain = self.test_rows(n)
        vocab = self.processed.vocabularies
        columns = {
            name: np.asarray(vocab[name], dtype=object)[sparse[:, i].numpy()].tolist()
            for i, name in enumerate(self.processed.field_names)
            if name != "domain"
        }
        names = np.asarray(self.processed.domain_names, dtype=object)[domain.numpy()].tolist()
        return pl.DataFrame({**columns, "domain": names, "row": list(range(n))})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """Train once through train_and_evaluate, keeping what run.py hands to save_model."""
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("run")
    seen = {}

    def spy(path, module, cfg, processed):
        seen.update(module=module, processed=processed)
        return save_model(path, module, cfg, processed)

    overrides = tiny(cache, "data.split_by=gender", "trainer.max_epochs=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(results_module, "save_model", spy)
        train_and_evaluate(compose(overrides), run_dir)
    return Trained(run_dir, seen["module"], seen["processed"])


def expected_scores(trained: Trained, n: int = ROWS) -> np.ndarray:
    sparse, domain = trained.test_rows(n)
    return score(trained.module.model, sparse, domain)


# ----------------------------------------------------------------------------- model.pt


def test_run_writes_model_pt_and_reload_scores_identically(trained):
    assert (trained.run_dir / "model.pt").is_file()
    assert not list(trained.run_dir.glob(".model.pt.*.tmp"))
    served = load_model(trained.run_dir)
    test = trained.processed.splits["test"]
    original = score(trained.module.model, test.sparse, test.domain)
    np.testing.assert_array_equal(score(served.model, test.sparse, test.domain), original)
    # another batch size may change the float summation order, nothing more
    reloaded = score(served.model, test.sparse, test.domain, batch_size=300)
    np.testing.assert_allclose(reloaded, original, atol=1e-6)
    assert served.model_name == "deepfm"
    assert served.domain_names == ["F", "M"]
    assert served.feature_order == ["user", "item", "domain"]
    assert served.adapter["kind"] == "moe" and served.adapter["experts"] == 2
    assert served.config["model"]["hidden_units"] == [32, 16]
    assert served.data_name == "synthetic_age"  # the config's data.name, as the run saw it


def test_load_uses_cpu_map_location_and_weights_only(trained, monkeypatch):
    """A GPU-saved file loads on a CPU-only machine because torch.load maps it to the CPU."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(serving.torch, "load", recording_load)
    served = load_model(trained.run_dir / "model.pt")
    assert calls == [{"map_location": "cpu", "weights_only": True}]
    assert all(p.device.type == "cpu" for p in served.model.parameters())


# ----------------------------------------------------------------------------- predict


def test_predict_csv_matches_the_model(trained, tmp_path):
    source = tmp_path / "in.csv"
    trained.raw_frame().write_csv(source)
    report = predict(trained.run_dir, source, tmp_path / "out.csv")
    out = pl.read_csv(tmp_path / "out.csv")
    assert out.columns == ["user", "item", "domain", "row", "score"]
    assert out["row"].to_list() == list(range(ROWS))
    np.testing.assert_allclose(out["score"].to_numpy(), expected_scores(trained), atol=1e-6)
    assert report.rows == ROWS and report.oov == {"user": 0, "item": 0}
    assert report.rows_per_s > 0 and "rows/s" in report.summary()


def test_predict_parquet_with_integer_ids(trained, tmp_path):
    frame = trained.raw_frame().with_columns(pl.col("user", "item").cast(pl.Int64))
    frame.write_parquet(tmp_path / "in.parquet")
    predict(trained.run_dir / "model.pt", tmp_path / "in.parquet", tmp_path / "out.parquet", 128)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["user"].dtype == pl.Int64
    np.testing.assert_allclose(out["score"].to_numpy(), expected_scores(trained), atol=1e-6)


def test_unseen_ids_are_counted_and_scored_as_oov(trained, tmp_path):
    frame = trained.raw_frame(20)
    frame = frame.with_columns(
        pl.when(pl.col("row") < 3).then(pl.lit("999999")).otherwise("user").alias("user"),
        pl.when(pl.col("row") == 5).then(pl.lit("no-such-item")).otherwise("item").alias("item"),
    )
    frame.write_csv(tmp_path / "in.csv")
    report = predict(trained.run_dir, tmp_path / "in.csv", tmp_path / "out.csv")
    assert report.oov == {"user": 3, "item": 1}
    scores = pl.read_csv(tmp_path / "out.csv")["score"].to_numpy()
    sparse, domain = trained.test_rows(20)
    sparse = sparse.clone()
    sparse[:3, 0] = 0
    sparse[5, 1] = 0
    np.testing.assert_allclose(scores, score(trained.module.model, sparse, domain), atol=1e-6)


def test_unknown_domain_is_an_error_naming_it(trained, tmp_path):
    frame = trained.raw_frame(10).with_columns(
        pl.when(pl.col("row") == 2).then(pl.lit("X")).otherwise("domain").alias("domain")
    )
    frame.write_csv(tmp_path / "in.csv")
    with pytest.raises(ServingError, match=r"unknown domain\(s\) \['X'\].*\['F', 'M'\]"):
        predict(trained.run_dir, tmp_path / "in.csv", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_missing_columns_are_named(trained, tmp_path):
    trained.raw_frame(10).drop("item").write_csv(tmp_path / "in.csv")
    with pytest.raises(ServingError, match=r"missing column\(s\) \['item'\].*has \['user'"):
        predict(trained.run_dir, tmp_path / "in.csv", tmp_path / "out.csv")


def test_cli_scores_and_reports_usage_errors(trained, tmp_path, capsys):
    trained.raw_frame(50).write_csv(tmp_path / "in.csv")
    args = [f"ckpt={trained.run_dir}", f"input={tmp_path / 'in.csv'}"]
    assert predict_main([*args, f"output={tmp_path / 'out.csv'}", "batch_size=7"]) == 0
    assert "scored 50 rows" in capsys.readouterr().err
    assert predict_main(["--help"]) == 0
    assert "usage: python -m moe_mlora.predict" in capsys.readouterr().out
    assert predict_main([*args, "outptu=x.csv"]) == 2
    assert "unknown key 'outptu'" in capsys.readouterr().err
    assert predict_main(args) == 2
    assert "moe_mlora.predict: error: missing output=..." in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad files


def test_missing_file_and_folder_without_model(tmp_path):
    with pytest.raises(ServingError, match="no model file at"):
        load_model(tmp_path / "nothing.pt")
    with pytest.raises(ServingError, match=r"folder without model\.pt"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_a_clear_error(trained, tmp_path, damage):
    data = (trained.run_dir / "model.pt").read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00not a model\xff" * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ServingError, match=r"not a moe_mlora model file or corrupt: .*model\.pt"):
        load_model(bad)


def test_cli_on_corrupt_file_exits_2_without_traceback(trained, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"garbage" * 100)
    trained.raw_frame(5).write_csv(tmp_path / "in.csv")
    args = [f"ckpt={tmp_path}", f"input={tmp_path / 'in.csv'}", f"output={tmp_path / 'o.csv'}"]
    done = subprocess.run(
        [sys.executable, "-m", "moe_mlora.predict", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("moe_mlora.predict: error: not a moe_mlora model file")
    assert "Traceback" not in done.stderr


def tampered(trained: Trained, tmp_path: Path, **changes) -> Path:
    bundle = torch.load(trained.run_dir / "model.pt", weights_only=True)
    bundle.update(changes)
    path = tmp_path / "model.pt"
    torch.save(bundle, path)
    return path


def test_other_format_version_is_refused(trained, tmp_path):
    path = tampered(trained, tmp_path, format_version=99)
    with pytest.raises(ServingError, match=r"format version 99; .* reads format version 1"):
        load_model(path)


def test_weights_that_do_not_fit_are_named(trained, tmp_path):
    bundle = torch.load(trained.run_dir / "model.pt", weights_only=True)
    options = {**bundle["model_options"], "hidden_units": [64, 16]}
    with pytest.raises(ServingError, match=r"shapes differ: tower\.layers\.0\..*\(32, .*\(64, "):
        load_model(tampered(trained, tmp_path, model_options=options))
    with pytest.raises(ServingError, match=r"checkpoint is model=dcn .* lacks: .*cross"):
        load_model(tampered(trained, tmp_path, model_name="dcn"))


# ----------------------------------------------------------------------------- export


def test_torchscript_export_matches_on_a_new_batch_size(trained, tmp_path):
    path = export_model(trained.run_dir, "torchscript", tmp_path / "model.ts")
    sparse, domain = trained.test_rows()
    exported = torch.jit.load(str(path))
    with torch.no_grad():
        got = exported(sparse[:, 0], sparse[:, 1], domain).numpy()
    np.testing.assert_allclose(got, expected_scores(trained), atol=1e-6)
    assert (tmp_path / "model.ts.json").is_file()


def test_onnx_export_matches_on_a_new_batch_size(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = tmp_path / "model.onnx"
    args = [f"ckpt={trained.run_dir}", "format=onnx", f"output={output}"]
    assert export_main(args) == 0
    session = ort.InferenceSession(str(output))
    assert [i.name for i in session.get_inputs()] == ["user", "item", "domain"]
    sparse, domain = trained.test_rows()
    feeds = {"user": sparse[:, 0].numpy(), "item": sparse[:, 1].numpy(), "domain": domain.numpy()}
    (got,) = session.run(None, feeds)
    np.testing.assert_allclose(got, expected_scores(trained), atol=1e-6)


def test_export_with_extra_fields_takes_sparse_and_domain(tmp_path):
    """Fields beyond user, item, domain: the exported graph takes sparse [B, F] and domain."""
    fields = [FieldSpec("user", 30), FieldSpec("gender", 3), FieldSpec("item", 20)]
    model = build_model("mlp", fields, 2, AdapterConfig(kind="mlora"), hidden_units=[8])
    vocab = {"user": ["<oov>", *map(str, range(29))], "gender": ["<oov>", "F", "M"]}
    vocab["item"] = ["<oov>", *map(str, range(19))]
    processed = ProcessedData(fields, ["a", "b"], {}, vocab)
    cfg = {"model": {"name": "mlp", "hidden_units": [8]}, "data": {"name": "made-up"}}
    save_model(tmp_path / "model.pt", model, cfg, processed)
    path = export_model(tmp_path, "torchscript", tmp_path / "model.ts")
    generator = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, v, (37,), generator=generator) for v in (30, 3, 20)], 1)
    domain = torch.randint(0, 2, (37,), generator=generator)
    with torch.no_grad():
        got = torch.jit.load(str(path))(sparse, domain).numpy()
    np.testing.assert_allclose(got, score(model, sparse, domain), atol=1e-6)


def test_export_rejects_an_unknown_format(trained, tmp_path):
    with pytest.raises(ServingError, match="format must be one of torchscript, onnx"):
        export_model(trained.run_dir, "tflite", tmp_path / "m")


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_xdeepfm_exports_its_cin_and_matches(tmp_path, format):
    """xDeepFM's CIN trains through a custom autograd function; export takes the plain path."""
    if format == "onnx":
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    fields = [FieldSpec("user", 30), FieldSpec("item", 20)]
    model = build_model("xdeepfm", fields, 2, AdapterConfig(kind="mlora"), hidden_units=[8])
    vocab = {"user": ["<oov>", *map(str, range(29))], "item": ["<oov>", *map(str, range(19))]}
    processed = ProcessedData(fields, ["a", "b"], {}, vocab)
    cfg = {"model": {"name": "xdeepfm", "hidden_units": [8]}, "data": {"name": "made-up"}}
    save_model(tmp_path / "model.pt", model, cfg, processed)
    path = export_model(tmp_path, format, tmp_path / f"model.{format}")
    generator = torch.Generator().manual_seed(0)
    user = torch.randint(0, 30, (37,), generator=generator)
    item = torch.randint(0, 20, (37,), generator=generator)
    domain = torch.randint(0, 2, (37,), generator=generator)
    if format == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(user, item, domain).numpy()
    else:
        session = ort.InferenceSession(str(path))
        feeds = {"user": user.numpy(), "item": item.numpy(), "domain": domain.numpy()}
        (got,) = session.run(None, feeds)
    expected = score(model, torch.stack([user, item], 1), domain)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_xdeepfm_checkpoint_with_the_old_conv1d_cin_still_loads(tmp_path):
    """model.pt files from before the CIN rewrite hold cin.convs.k (Conv1d [out, in, 1])."""
    fields = [FieldSpec("user", 30), FieldSpec("item", 20)]
    model = build_model("xdeepfm", fields, 2, AdapterConfig(kind="mlora"), hidden_units=[8])
    vocab = {"user": ["<oov>", *map(str, range(29))], "item": ["<oov>", *map(str, range(19))]}
    processed = ProcessedData(fields, ["a", "b"], {}, vocab)
    cfg = {"model": {"name": "xdeepfm", "hidden_units": [8]}, "data": {"name": "made-up"}}
    path = save_model(tmp_path / "model.pt", model, cfg, processed)
    bundle = torch.load(path, weights_only=True)
    old_layout = {}
    for key, value in bundle["state_dict"].items():
        if ".maps." in key:
            key = key.replace(".maps.", ".convs.")
            value = value.t().unsqueeze(-1) if key.endswith("weight") else value
        old_layout[key] = value
    assert "cin.convs.1.weight" in old_layout
    bundle["state_dict"] = old_layout
    torch.save(bundle, path)
    sparse = torch.stack([torch.arange(10) % 30, torch.arange(10) % 20], 1)
    domain = torch.arange(10) % 2
    loaded = load_model(path)
    np.testing.assert_allclose(
        score(loaded.model, sparse, domain), score(model, sparse, domain), atol=1e-6
    )
