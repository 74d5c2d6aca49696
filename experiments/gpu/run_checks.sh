#!/usr/bin/env bash
# The GPU measurements and checks of the speed work, in one go, on a bare GPU machine.
#
#   make gpu-wheels                      # where pip reaches the registry: build/gpu-wheels
#   bash experiments/gpu/run_checks.sh   # on the GPU machine, from a copy of the repository
#
# Writes into $OUT (default experiments/gpu/out): log.txt (everything printed), gpu_fp32.md
# and gpu_bf16.md (python -m moe_mlora.bench gpu: DeepFM base and MoE-MLoRA E=8, batch
# 1024 and 8192, generated Taobao-20) and gpu_checks.md (python -m moe_mlora.bench
# gpu_checks: bf16 through the CIN's backward, a bf16 step of every method, bf16
# training, DDP on one device).
# Exits 1 when a step failed, 2 when the packages cannot be set up.
#
# The machine's own torch is used as it is. hydra-core, omegaconf, antlr4 and polars, when
# missing, are installed from $GPU_WHEELS (default build/gpu-wheels) into a scratch folder,
# without the network. Environment: PYTHON (default python3), ACCELERATOR (gpu; cpu runs
# the same steps on the CPU), CLICKS (generated clicks, default 1000000), EPOCHS (per
# phase, default 3), BATCH_SIZES (default "1024 8192").
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out="${OUT:-experiments/gpu/out}"
wheels="${GPU_WHEELS:-build/gpu-wheels}"
python="${PYTHON:-python3}"
accelerator="${ACCELERATOR:-gpu}"
clicks="${CLICKS:-1000000}"
epochs="${EPOCHS:-3}"
read -r -a batch_sizes <<< "${BATCH_SIZES:-1024 8192}"
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
tee_pid=$!
finish() {  # let tee write the last lines before the script (and its caller) moves on
    local code=$1
    exec >&- 2>&-
    wait "$tee_pid" 2> /dev/null
    exit "$code"
}

if ! "$python" -c "import hydra, omegaconf, polars" 2>/dev/null; then
    if ! compgen -G "$wheels/*.whl" > /dev/null; then
        echo "hydra-core, omegaconf or polars is missing and $wheels holds no wheels:"
        echo "run 'make gpu-wheels' where pip reaches the registry, and bring $wheels along"
        finish 2
    fi
    site="$(mktemp -d)/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl || finish 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed from $wheels into $site: $(ls "$wheels" | tr '\n' ' ')"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" - <<'PY'
import platform, torch, lightning, hydra, polars
print(f"python {platform.python_version()}, torch {torch.__version__}, lightning "
      f"{lightning.__version__}, hydra {hydra.__version__}, polars {polars.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
[ $? -eq 0 ] || finish 2
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

status=0
step() {
    echo "== $*"
    local start=$SECONDS
    "$python" -m moe_mlora.bench "$@" || status=1
    echo "== $1 took $((SECONDS - start)) s"
}
common=("accelerator=$accelerator" "clicks=$clicks" "max-epochs=$epochs")
step gpu "${common[@]}" "batch-sizes=$(IFS=,; echo "${batch_sizes[*]}")" "out=$out/gpu_fp32.md"
step gpu "${common[@]}" "batch-sizes=$(IFS=,; echo "${batch_sizes[*]}")" precision=bf16-mixed \
    "out=$out/gpu_bf16.md"
step gpu_checks "accelerator=$accelerator" "out=$out/gpu_checks.md"
echo "== done, status $status; results in $out"
finish $status
