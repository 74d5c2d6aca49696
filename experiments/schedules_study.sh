#!/usr/bin/env bash
# The schedules study (experiments/schedules.md): base, MLoRA and the MoE-MLoRA schedules on
# generated Taobao-10/20/30 (300k clicks) and the real MovieLens-100K, seeds 1-3, then the reports.
# Usage: experiments/schedules_study.sh STUDY_DIR [ML100K_DIR]   (from the repository root)
# TAOBAO=DIR runs the Taobao part on your own CloudTheme-format files (the real Tianchi data,
# or any log in its format) instead of the generated log.
# About 9 hours on 2 CPU cores; rerunning skips every run that already has its results.json.
set -euo pipefail
study=${1:?usage: $0 STUDY_DIR [ML100K_DIR]}
ml100k=${2:-${MOE_MLORA_ML100K:-data/ml-100k}}
python=${PYTHON:-.venv/bin/python}
quiet="logger.wandb.enabled=false progress=false checkpoint=false"

# Taobao-format data: 30 themes in clusters of similar themes plus a Zipf long tail
# (the generator's default heterogeneity 0.5); Taobao-20 keeps the first 20 themes.
if [ -n "${TAOBAO:-}" ]; then
    taobao=$TAOBAO
    [ -f "$taobao/theme_click_log.csv" ] || { echo "no theme_click_log.csv in $taobao" >&2; exit 2; }
else
    taobao=$study/taobao300k
    [ -f "$taobao/theme_click_log.csv" ] || $python -m moe_mlora.data.generate taobao \
        --out "$taobao" --themes 30 --clicks 300000 --users 15000 --items 6000 --seed 7
fi

taobao_run() {  # NAME OVERRIDES...: one Taobao-20 run (no epoch cap but trainer.max_epochs=50)
    local name=$1; shift
    [ -f "$study/runs/$name/results.json" ] && return
    $python -m moe_mlora.run data=taobao20 data.root="$taobao" threads=2 $quiet \
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

# Taobao-10 and Taobao-30 (the first 10 / all 30 themes of the same log): base, MLoRA and the
# warm, paper and reference schedules, seeds 1-3
other_run() {  # DATA NAME OVERRIDES...: one Taobao-10 or -30 run into runs10/ or runs30/
    local data=$1 name=$2; shift 2
    local dir="$study/runs${data#taobao}"
    [ -f "$dir/$name/results.json" ] && return
    mkdir -p "$dir"
    $python -m moe_mlora.run data=$data data.root="$taobao" threads=2 $quiet \
        hydra.run.dir="$dir/$name" "$@" > "$dir/$name.log" 2>&1
}
for seed in 1 2 3; do
    for data in taobao10 taobao30; do
        other_run $data "base_s$seed" method=base seed=$seed
        other_run $data "mlora_s$seed" method=mlora seed=$seed
        for schedule in warm paper reference; do
            other_run $data "${schedule}_s$seed" method=moe_mlora method/schedule=$schedule seed=$seed
        done
    done
done

# Taobao-20 beyond DeepFM's defaults: DCN (base, MLoRA, warm) and warm with k = 2 and 4 experts
# per theme (k = 1 is warm above), seeds 1-3, into dcn20/ and epd20/
extra_run() {  # FOLDER NAME OVERRIDES...
    local dir="$study/$1" name=$2; shift 2
    [ -f "$dir/$name/results.json" ] && return
    mkdir -p "$dir"
    $python -m moe_mlora.run data=taobao20 data.root="$taobao" threads=2 $quiet \
        hydra.run.dir="$dir/$name" "$@" > "$dir/$name.log" 2>&1
}
for seed in 1 2 3; do
    extra_run dcn20 "base_s$seed" model=dcn method=base seed=$seed
    extra_run dcn20 "mlora_s$seed" model=dcn method=mlora seed=$seed
    extra_run dcn20 "warm_s$seed" model=dcn method=moe_mlora seed=$seed
    for k in 2 4; do
        extra_run epd20 "k${k}_s$seed" method=moe_mlora experts_per_domain=$k seed=$seed
    done
done

# MovieLens-100K: gender / age / occupation x DeepFM x MLoRA and MoE-MLoRA (warm), seeds 1-3
# (2 jobs x 1 thread); the recipe supplies the MovieLens data config that data.root belongs to
$python -m moe_mlora.run -m experiment=paper_movielens model=deepfm method=mlora,moe_mlora \
    data.root="$ml100k" $quiet hydra/launcher=parallel hydra.sweep.dir="$study/ml100k"

# the paper schedule beside them
$python -m moe_mlora.run -m experiment=paper_movielens hydra.sweeper.params.model=deepfm \
    hydra.sweeper.params.method=moe_mlora method=moe_mlora method/schedule=paper \
    data.root="$ml100k" $quiet hydra.sweep.dir="$study/ml100k_paper"
# ... and with DCN (DCN's MLoRA and warm runs are part of experiment=baselines_movielens)
$python -m moe_mlora.run -m experiment=paper_movielens hydra.sweeper.params.model=dcn \
    hydra.sweeper.params.method=moe_mlora method=moe_mlora method/schedule=paper \
    data.root="$ml100k" $quiet hydra.sweep.dir="$study/ml100k_dcn_paper"
# the reference schedule with both backbones
$python -m moe_mlora.run -m experiment=paper_movielens 'hydra.sweeper.params.model="deepfm,dcn"' \
    hydra.sweeper.params.method=moe_mlora method=moe_mlora method/schedule=reference \
    data.root="$ml100k" $quiet hydra/launcher=parallel hydra.sweep.dir="$study/ml100k_reference"

# experts per domain (k = 2, 4; k = 1 is the run above) for warm, DeepFM
for split in movielens_gender movielens_age movielens_occupation; do
    $python -m moe_mlora.run -m experiment=experts_per_domain data=$split data.root="$ml100k" \
        model=deepfm experts_per_domain=2,4 $quiet hydra/launcher=parallel \
        hydra.sweep.dir="$study/ml100k_k/$split"
done

$python -m moe_mlora.report "$study/runs" out=experiments/results/schedules/taobao20
$python -m moe_mlora.report "$study/runs10" out=experiments/results/schedules/taobao10
$python -m moe_mlora.report "$study/runs30" out=experiments/results/schedules/taobao30
$python -m moe_mlora.report "$study/dcn20" out=experiments/results/schedules/taobao20_dcn
$python -m moe_mlora.report "$study/epd20" "$study"/runs/{mlora,warm}_s{1,2,3} \
    out=experiments/results/schedules/taobao20_experts
$python -m moe_mlora.report "$study/ml100k" "$study/ml100k_paper" out=experiments/results/schedules/ml100k
$python -m moe_mlora.report "$study/ml100k" "$study/ml100k_k" out=experiments/results/schedules/ml100k_experts
