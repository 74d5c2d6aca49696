"""What a run leaves: results.json (written last), model.pt, the printed and logged tables."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moe_mlora.models import build_model
from moe_mlora.models.complexity import complexity
from moe_mlora.models.multidomain import MultiDomainTower
from moe_mlora.pipeline.build import schedule_spec
from moe_mlora.pipeline.loggers import log_to_wandb
from moe_mlora.pipeline.schema import RunInfo, RunRecord, final_validation
from moe_mlora.serving import save_model
from moe_mlora.sweep import (
    run_fields,
)
from moe_mlora.training.module import CTRModule
from moe_mlora.training.reports import PhaseReport, metrics_to_json

log = logging.getLogger("moe_mlora")


FLOP_BATCH = 1024  # test rows the FLOPs are counted on (a training batch's size)


def model_complexity(module: CTRModule, datamodule, cfg: DictConfig) -> dict:
    """Forward FLOPs per sample of the final model and of its base, on test rows.

    A multi-domain tower is not an adapter that routing "off" removes: its base is the
    same backbone with its plain DNN tower, built here (under ``fork_rng``) and counted.
    """
    test = datamodule.processed.splits["test"]
    rows = slice(0, min(FLOP_BATCH, len(test)))
    sparse, domain = test.sparse[rows], test.domain[rows]
    result = complexity(module.model, sparse, domain)
    if isinstance(module.model.tower, MultiDomainTower):
        plain = plain_backbone(cfg, datamodule).to(next(module.model.parameters()).device)
        base = complexity(plain, sparse, domain)["per_sample"]
        overhead = result["per_sample"] - base
        result.update(
            base_per_sample=base,
            overhead_per_sample=overhead,
            overhead_pct=100.0 * overhead / base if base else math.nan,
        )
    return result


def plain_backbone(cfg: DictConfig, datamodule) -> torch.nn.Module:
    """The run's backbone with its plain DNN tower and no adapter (for its base FLOPs)."""
    options = OmegaConf.to_container(cfg.model, resolve=True)
    options.pop("name", None)
    data = datamodule.processed
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg.model.name, data.fields, data.num_domains, None, **options)


def build_results(cfg, module, datamodule, reports, test, wall_time, output_dir) -> dict:
    """The run's record (results.json, see :class:`RunRecord`): run, data, parameters, flops,
    phases, the tested model's validation scores, test."""
    counts = module.model.parameter_counts()
    backbone = counts["backbone"]
    overhead = counts["adapter"] + counts["gate"]
    phases = [report.to_json() for report in reports]
    run = RunInfo(
        **{
            **run_fields(cfg),
            "output_dir": str(output_dir),
            "experts": module.model.num_experts if cfg.method.adapter.kind == "moe" else None,
        }
    )
    record = RunRecord(
        status="completed",
        run=run,
        schedule=schedule_spec(cfg).to_json(),
        hyperparameters=hyperparameters(cfg, module),
        data=datamodule.processed.summary(),
        parameters={
            **counts,
            "adapter_overhead": overhead,
            "adapter_overhead_pct": 100.0 * overhead / backbone if backbone else math.nan,
        },
        flops=model_complexity(module, datamodule, cfg),
        phases=phases,
        validation=final_validation(phases),
        test=metrics_to_json(test, datamodule.domain_names),
        wall_time_s=wall_time,
    )
    return record.to_json()


def hyperparameters(cfg: DictConfig, module: CTRModule) -> dict:
    """The settings that differ between the project's defaults and the authors' configs."""
    adapter = module.model.adapter_config
    return {
        "lora_reduce": adapter.lora_reduce if adapter.kind != "none" else None,
        "lora_rank": adapter.lora_rank,
        "embedding_dim": cfg.model.get("embedding_dim"),
        "project_pretrained": cfg.data.get("project_pretrained"),
        "freeze_pretrained": cfg.data.get("freeze_pretrained"),
        "max_epochs": cfg.trainer.get("max_epochs"),
    }


def write_json_atomically(path: Path, payload: dict) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(staging, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def summary_table(results: dict, reports: list[PhaseReport]) -> str:
    run = results["run"]
    experts = f" · experts={run['experts']}" if run["experts"] else ""
    schedule = f" ({run['schedule']} schedule)" if run.get("schedule") else ""
    lines = [
        f"{run['method']}{schedule} · {run['model']} · {run['data']}{experts} · seed {run['seed']}",
        f"{'phase':<6}{'trains':<10}{'epochs':>7}{'best val WAUC':>15}{'time':>9}{'samples/s':>12}",
    ]
    for r in reports:
        kept = "" if r.kept else "  (not kept: the run's best came back)"
        lines.append(
            f"{r.index:<6}{r.kind:<10}{r.epochs:>7}{r.best_val_wauc:>15.4f}"
            f"{r.wall_time_s:>8.1f}s{r.train_samples_per_s:>12,.0f}{kept}"
        )
    test, validation = results["test"], results.get("validation") or {}
    if validation.get("wauc") is not None:
        lines.append(f"validation (the tested model): WAUC {validation['wauc']:.4f}")
    lines.append(
        f"test: WAUC {test['wauc']:.4f} · mean domain AUC {test['mean_auc']:.4f} · "
        f"AUC {test['auc']:.4f} · log loss {test['logloss']:.4f}"
    )
    params, flops = results["parameters"], results["flops"]
    lines.append(
        f"parameters: backbone {params['backbone']:,} · per-domain parts and gate "
        f"{params['adapter_overhead']:,} ({params['adapter_overhead_pct']:.1f}% of backbone)"
    )
    lines.append(
        f"forward FLOPs/sample: {flops['per_sample']:,.0f} (base {flops['base_per_sample']:,.0f},"
        f" +{flops['overhead_pct']:.1f}%) · wall time {results['wall_time_s']:.1f}s"
    )
    return "\n".join(lines)


def to_log_files(text: str) -> None:
    """Append ``text`` to the log files (Hydra's ``run.log``) without the console seeing it
    twice: the final tables are printed, and the log must hold them too."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.stream.write(text + "\n")
                handler.flush()
            finally:
                handler.release()


def write_results(loggers, output_dir: Path, results: dict, module, cfg, datamodule) -> None:
    """model.pt, the W&B summary, the loggers' files, then results.json (global rank 0's job).

    results.json is the commit marker, so it comes last: a kill before it leaves a run that
    resumes from its checkpoints (cleared only after it), never a "completed" run without
    its model.
    """
    save_model(output_dir / "model.pt", module, cfg, datamodule.processed)
    log_to_wandb(loggers, results, datamodule.domain_names)
    for logger in loggers:
        logger.save()
    write_json_atomically(output_dir / "results.json", results)
