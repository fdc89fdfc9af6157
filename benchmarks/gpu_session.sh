#!/usr/bin/env bash
# The checks a session with a GPU should run first, most valuable first; each writes under $OUT, and each part
# has a time limit so that one slow part cannot cost the others (about 9 minutes in all):
#   step timings (benchmarks/step_speed.py) with the GPU to themselves, while the census's corpus is tokenized
#   on the CPU; then the CUDA tests of the fused and compiled steps beside issue 28's spike census at LLaMA-60M
#   (benchmarks/gpu_spike_census.sh; it needs the Gutenberg shards carried in data/gutenberg, see that script).
# Runs from the repository root without installing (the device machine has torch and Triton, no network).
# pytorch-optimizer's SPAM joins the timings if its pure-Python wheel is carried in .whl/ (an ignored folder):
#   pip download --no-deps pytorch-optimizer==4.1.0 -d .whl
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for wheel in .whl/*.whl; do [ -e "$wheel" ] && PYTHONPATH="$PYTHONPATH:$PWD/$wheel"; done
command -v python > /dev/null || { mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python; export PATH="/tmp/bin:$PATH"; }
census=0; [ -d data/gutenberg ] && census=1
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$log"
[ $census = 1 ] && { CENSUS_TOKENIZE_ONLY=1 RAYON_NUM_THREADS=8 bash benchmarks/gpu_spike_census.sh > "$OUT/tokenize.log" 2>&1 & }
timeout -s INT "${STEP_SPEED_SECONDS:-200}" python benchmarks/step_speed.py --device cuda --models 350m 1b \
    --num-warps 4 8 16 --out "$OUT/step_speed.json" 2>&1 | tee -a "$log"
wait
[ $census = 1 ] && { CENSUS_SECONDS=${CENSUS_SECONDS:-270} bash benchmarks/gpu_spike_census.sh > "$OUT/census.log" 2>&1 & }
# SIGINT: a test run cut at its limit still prints its failures
timeout -s INT "${TESTS_SECONDS:-250}" python -m pytest tests/optim/test_fused.py tests/optim/test_compiled.py -q \
    --tb=short -p no:cacheprovider 2>&1 | tee -a "$log"
wait
cat "$OUT/tokenize.log" "$OUT/census.log" >> "$log" 2>/dev/null; rm -f "$OUT/tokenize.log" "$OUT/census.log"
ls -la "$OUT"
