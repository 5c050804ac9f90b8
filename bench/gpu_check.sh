#!/usr/bin/env bash
# The GPU check of issue 2 (section 7), prepared to run as is on a GPU machine that gets a copy of
# this working tree: ViT-B-16-quickgelu, batch 128 per GPU, bf16 autocast; open_clip's own
# train_one_epoch (A) vs our step with MIM off (B) and on (C), images/s per GPU and model FLOP
# utilisation against the H200's 989 TFLOP/s bf16 dense peak (PEAK_TFLOPS to change it).
#
#     bash bench/gpu_check.sh            # about 2-3 minutes once .venv exists; well under 8 in all
#
# It installs nothing beyond the repository's own lock: .venv comes from `make .venv/.installed`
# when it is missing (the Makefile's set-up target; that step needs the lock's wheels reachable,
# e.g. through PIP_FIND_LINKS). PY=/path/to/python uses another interpreter instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "== $PY is missing: make .venv/.installed"
    make .venv/.installed
fi
export PYTHONPATH=.
export NO_ALBUMENTATIONS_UPDATE=1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
git rev-parse --short HEAD 2>/dev/null || true

# The whole check has a hard cap, so that a hang cannot eat the session's device time.
# 30 steps x 7 rounds per contender: ~0.05-0.15 s a step, about a minute of measuring.
echo "== ViT-B-16-quickgelu, batch 128, bf16: (A) open_clip, (B) ours MIM off, (C) ours MIM on"
timeout 420 "$PY" -m bench.train_speed --model ViT-B-16-quickgelu --batch-size 128 --device cuda \
    --precision bf16 --steps 30 --rounds 7 --warmup 5 --idle-wait 10 --peak-tflops "${PEAK_TFLOPS:-989}"
