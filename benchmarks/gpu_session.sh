#!/usr/bin/env bash
# The checks a session with a GPU should run first, most valuable first; each writes under $OUT.
#   fused kernel: CUDA tests (fused ≡ for-loop compiled, CUDA-graph replay, no host sync), the compiled
#   SPAM and Stable-SPAM steps on CUDA (Triton via torch.compile), then step timings
#   harness: the scaled-down Table 1 needs the Gutenberg shards carried in data/ (see BENCHMARKS.md)
# Runs from the repository root without installing (the device machine has torch and Triton, no network).
# pytorch-optimizer's SPAM joins the timings if its pure-Python wheel is carried in .whl/ (an ignored folder):
#   pip download --no-deps pytorch-optimizer==4.1.0 -d .whl
set -euo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for wheel in .whl/*.whl; do [ -e "$wheel" ] && PYTHONPATH="$PYTHONPATH:$PWD/$wheel"; done
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python -m pytest tests/optim/test_fused.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_fused.txt" || true
python -m pytest tests/optim/test_compiled.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_compiled.txt" || true
python benchmarks/step_speed.py --device cuda --models 350m 1b --num-warps 4 8 16 --out "$OUT/step_speed.json" 2>&1 \
    | tee "$OUT/step_speed.txt"
