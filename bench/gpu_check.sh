#!/usr/bin/env bash
# The GPU checks of issues 2 and 3, prepared to run as is on a GPU machine that gets a copy of this
# working tree (the device tool's `run`), in one call of about 9 minutes. Steps in order of value
# (the open question is issue 2's MFU >= 40 %: 35.2 % in the last run, docs/PERFORMANCE.md "GPU: H200");
# a step is skipped when it could run past BUDGET seconds (default 540) from the start:
#   0. the machine, and the bf16 matrix-product ceiling it really reaches (8192^3, random data);
#   1. ViT-B-16-quickgelu, batch 256 per GPU, bf16 autocast, torch.compile (as configs/pretrain_vitb16.yaml):
#      our step with MIM off (B) and on (C), images/s per GPU and model FLOP utilisation against the
#      H200's 989 TFLOP/s bf16 dense peak (PEAK_TFLOPS to change it); then a profile of each
#      (operators by device time, device-busy share of the wall time) into $OUT/profile/;
#   2. C again with torch's fused AdamW: the optimiser step is one kernel instead of many;
#   3. `python -m train.pretrain` with configs/pretrain_vitb16.yaml (pixel targets) over the demo
#      shards: the whole loop (loader, masks, compiled step, logging) in images/s on one GPU;
#   4. batch 128, eager: open_clip's own train_one_epoch (A) vs B and C (measured before: 1.001, 1.82);
#   5. the tiny config with checkpoints: the loop, checkpoints and metrics on CUDA;
#   6. the train/ tests that need no Ray, on the GPU (test_metrics' CUDA case runs there).
#
#     bash bench/gpu_check.sh      # from the device tool: carry [".whl", "out/demo/shards"]
#
# Python: .venv when it exists; else the machine's python3 (which holds torch) plus the pure-Python
# wheels it lacks, carried in .whl/ (open_clip_torch, ftfy, wcwidth, webdataset, braceexpand,
# tensorboardX; fetch them with `pip download` as docs/PERFORMANCE.md says). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"

PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    PY=python3
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

step() {  # step SECONDS NAME COMMAND...: run it under `timeout SECONDS` if the budget allows
    local limit=$1 name=$2; shift 2
    if (( SECONDS + limit > BUDGET )); then echo "== $name: skipped, ${SECONDS}s of ${BUDGET}s used"; return; fi
    echo "== $name (at ${SECONDS}s)"
    timeout "$limit" bash -c '"$@"' _ "$@"  # bash -c: the command may be one of the functions below
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
git rev-parse --short HEAD 2>/dev/null || true
step 60 "0. bf16 matmul ceiling" "$PY" -c '
import torch, time
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); print(f"bf16 8192^3 matmul: {20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
' 2>&1 | tee "$OUT/ceiling.txt"

speed() {  # speed BATCH [FLAGS...]
    "$PY" -m bench.train_speed --model ViT-B-16-quickgelu --batch-size "$1" "${@:2}" --device cuda \
        --precision bf16 --steps 20 --rounds 5 --warmup 5 --retries 1 --idle-wait 3 --peak-tflops "${PEAK_TFLOPS:-989}"
}
pretrain_vitb() {  # pretrain_vitb OUTPUT [FLAGS...]
    local output=$1; shift
    rm -rf "$output"
    "$PY" -m train.pretrain --config configs/pretrain_vitb16.yaml --mim-target pixel --data out/demo/shards \
        --output "$output" --steps 60 --warmup-steps 10 --log-every 10 --checkpoint-every 1000 --loader-workers 12 --no-progress "$@" 2>&1 | tail -4
    cat "$output/metrics.jsonl" 2>/dev/null || echo "no metrics written"
}

export PY; export -f speed pretrain_vitb

step 300 "1. train_speed, batch 256, torch.compile, B and C, profiled" speed 256 --compile --only BC --rounds 3 \
    --profile "$OUT/profile" 2>&1 | tee "$OUT/train_speed_compiled.txt"
step 180 "2. train_speed, batch 256, torch.compile, C, fused AdamW" speed 256 --compile --only C --rounds 3 --fused-adamw 2>&1 \
    | tee "$OUT/train_speed_fused.txt"
step 150 "3. train.pretrain, ViT-B/16, batch 128, bf16, compiled" pretrain_vitb /tmp/pretrain_vitb 2>&1 | tee "$OUT/pretrain_vitb.txt"
step 120 "4. train_speed, batch 128, eager" speed 128 2>&1 | tee "$OUT/train_speed.txt"
step 90 "5. train.pretrain, tiny, CUDA" bash -c "rm -rf /tmp/pretrain_gpu; $PY -m train.pretrain --config configs/pretrain_tiny.yaml \
    --data out/demo/shards --output /tmp/pretrain_gpu --steps 40 --batch-size 16 --checkpoint-every 20 --no-progress 2>&1 | tail -5; \
    ls /tmp/pretrain_gpu/checkpoints; tail -2 /tmp/pretrain_gpu/metrics.jsonl" 2>&1 | tee "$OUT/pretrain_tiny.txt"
step 120 "6. train/ tests without Ray, on the GPU" "$PY" -m pytest -q -p no:cacheprovider tests/test_metrics.py tests/test_model.py \
    tests/test_losses.py tests/test_face_model.py tests/test_finetune.py tests/test_geometry.py tests/test_augment.py 2>&1 \
    | tail -15 | tee "$OUT/tests.txt"
echo "== done at ${SECONDS}s"
