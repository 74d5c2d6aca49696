#!/usr/bin/env bash
# The schedules study (experiments/schedules.md): base, MLoRA and the MoE-MLoRA schedules on
# generated Taobao-20 (300k clicks) and the real MovieLens-100K, seeds 1-3, then the reports.
# Usage: experiments/schedules_study.sh STUDY_DIR [ML100K_DIR]   (from the repository root)
# About 2.5 hours on 2 CPU cores; rerunning skips every run that already has its results.json.
set -euo pipefail
study=${1:?usage: $0 STUDY_DIR [ML100K_DIR]}
ml100k=${2:-../shared/data/ml-100k}
python=${PYTHON:-.venv/bin/python}
quiet="logger.wandb.enabled=false progress=false checkpoint=false"

# Taobao-format data: 30 themes in clusters of similar themes plus a Zipf long tail
# (the generator's default heterogeneity 0.5); Taobao-20 keeps the first 20 themes.
[ -f "$study/taobao300k/theme_click_log.csv" ] || $python -m moe_mlora.data.generate taobao \
    --out "$study/taobao300k" --themes 30 --clicks 300000 --users 15000 --items 6000 --seed 7

taobao_run() {  # NAME OVERRIDES...: one Taobao-20 run (no epoch cap but trainer.max_epochs=50)
    local name=$1; shift
    [ -f "$study/runs/$name/results.json" ] && return
    $python -m moe_mlora.run data=taobao20 data.root="$study/taobao300k" threads=2 $quiet \
        hydra.run.dir="$study/runs/$name" "$@" > "$study/runs/$name.log" 2>&1
}
mkdir -p "$study/runs"
for seed in 1 2 3; do
    taobao_run "base_s$seed" method=base seed=$seed
    taobao_run "mlora_s$seed" method=mlora seed=$seed
    for schedule in warm paper reference warm_no_finetune warm_gate_phase; do
        taobao_run "${schedule}_s$seed" method=moe_mlora method/schedule=$schedule seed=$seed
    done
    taobao_run "mlora_finetune_s$seed" method=mlora method/schedule=mlora_finetune seed=$seed
done

# MovieLens-100K: gender / age / occupation x DeepFM x MLoRA and MoE-MLoRA (warm), seeds 1-3
# (2 jobs x 1 thread); the recipe supplies the MovieLens data config that data.root belongs to
$python -m moe_mlora.run -m experiment=paper_movielens model=deepfm method=mlora,moe_mlora \
    data.root="$ml100k" $quiet hydra/launcher=parallel hydra.sweep.dir="$study/ml100k"

# experts per domain (k = 2, 4; k = 1 is the run above) for warm, DeepFM
for split in movielens_gender movielens_age movielens_occupation; do
    $python -m moe_mlora.run -m experiment=experts_per_domain data=$split data.root="$ml100k" \
        model=deepfm experts_per_domain=2,4 $quiet hydra/launcher=parallel \
        hydra.sweep.dir="$study/ml100k_k/$split"
done

$python -m moe_mlora.report "$study/runs" out=experiments/results/schedules/taobao20
$python -m moe_mlora.report "$study/ml100k" out=experiments/results/schedules/ml100k
$python -m moe_mlora.report "$study/ml100k" "$study/ml100k_k" out=experiments/results/schedules/ml100k_experts
