#!/usr/bin/env bash
# The GPU checks of issues 2 and 3, prepared to run as is on a GPU machine that gets a copy of this
# working tree (the device tool's `run`), in one call well under 10 minutes:
#   1. ViT-B-16-quickgelu, batch 128 per GPU, bf16 autocast: open_clip's own train_one_epoch (A) vs
#      our step with MIM off (B) and on (C); images/s per GPU and model FLOP utilisation against the
#      H200's 989 TFLOP/s bf16 dense peak (PEAK_TFLOPS to change it);
#   2. `python -m train.pretrain` on CUDA in bf16 (the tiny config over the demo shards): the loop,
#      checkpoints and metrics on a GPU;
#   3. the train/ tests that need no Ray, on the GPU (test_metrics' CUDA case runs there).
#
#     bash bench/gpu_check.sh      # from the device tool: carry [".whl", "out/demo/shards"]
#
# Python: .venv when it exists; else the machine's python3 (which holds torch) plus the pure-Python
# wheels it lacks, carried in .whl/ (open_clip_torch, ftfy, wcwidth, webdataset, braceexpand,
# tensorboardX; fetch them with `pip download` as docs/PERFORMANCE.md says). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
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

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
git rev-parse --short HEAD 2>/dev/null || true

echo "== 1. ViT-B-16-quickgelu, batch 128, bf16: (A) open_clip, (B) ours MIM off, (C) ours MIM on"
timeout 240 "$PY" -m bench.train_speed --model ViT-B-16-quickgelu --batch-size 128 --device cuda \
    --precision bf16 --steps 20 --rounds 5 --warmup 5 --idle-wait 10 --peak-tflops "${PEAK_TFLOPS:-989}" \
    2>&1 | tee "$OUT/train_speed.txt"

echo "== 2. train.pretrain on CUDA, bf16, tiny config, demo shards"
rm -rf /tmp/pretrain_gpu
timeout 120 "$PY" -m train.pretrain --config configs/pretrain_tiny.yaml --data out/demo/shards \
    --output /tmp/pretrain_gpu --steps 40 --batch-size 16 --no-progress 2>&1 | tail -5 | tee "$OUT/pretrain.txt"
cp /tmp/pretrain_gpu/metrics.jsonl "$OUT/pretrain_metrics.jsonl" 2>/dev/null || echo "no metrics written"

echo "== 3. train/ tests without Ray, on the GPU"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_metrics.py tests/test_model.py tests/test_losses.py \
    tests/test_face_model.py tests/test_finetune.py tests/test_geometry.py tests/test_augment.py 2>&1 \
    | tail -15 | tee "$OUT/tests.txt"
