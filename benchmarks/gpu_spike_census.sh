#!/usr/bin/env bash
# Issue 28 on one GPU: AdamW's gradient-spike census at LLaMA-60M on the Gutenberg books, at the paper's rate
# (1e-3) and hotter ones, the runs side by side (one 60M model leaves most of an H200 idle). Each run is the
# Table 1 census command (REPRODUCTION.md) with its own rate; each stops after CENSUS_SECONDS (its checkpoint
# every 250 steps lets a later session continue it with --resume), then `spamopt spikes report` summarises it.
# Needs shards carried in data/gutenberg (an ignored folder), e.g. four train shards and the validation one:
#   mkdir -p data/gutenberg && cp ../shared/data/gutenberg/{train-0000[0-3],validation}* data/gutenberg/
# CENSUS_TOKENIZE_ONLY=1 stops after tokenizing. Writes $OUT/census.tar.gz (configs, metrics, summaries, reports) and $OUT/spikes-lr*.jsonl.xz (the records).
set -uo pipefail
OUT=${OUT:-results/gpu}
MODEL=${CENSUS_MODEL:-60m}
STEPS=${CENSUS_STEPS:-1500}
LIMIT=${CENSUS_SECONDS:-360}
LRS=${CENSUS_LRS:-1e-3 3e-3 1e-2}
DATA=${CENSUS_DATA:-data/gutenberg}
RUNS=${CENSUS_RUNS:-runs/census}
read -ra EXTRA <<< "${CENSUS_ARGS:-}"  # more train options (later ones win), e.g. a smaller batch for a CPU try
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
spamopt() { python -m spamopt.cli "$@"; }
common=(--model "$MODEL" --data "$DATA" --seq-len 256 --batch-size 128 --warmup-steps 150 --optimizer adamw
        --spikes --no-progress --eval-every 100 --checkpoint-every 250 --cache-dir "$RUNS/cache" "${EXTRA[@]}")
# tokenize once, so that the runs side by side do not race on the cache
spamopt train "${common[@]}" --lr 1e-3 --steps 1 --eval-tokens 4096 --run-dir "$RUNS/tokenize" --overwrite \
    > "$RUNS/tokenize.log" 2>&1 || { tail -20 "$RUNS/tokenize.log"; exit 1; }
[ "${CENSUS_TOKENIZE_ONLY:-0}" = 1 ] && exit 0  # e.g. while something else has the GPU to itself
for lr in $LRS; do
    timeout -s INT "$LIMIT" python -m spamopt.cli train "${common[@]}" --lr "$lr" --steps "$STEPS" \
        --run-dir "$RUNS/adamw-lr$lr" --resume > "$RUNS/adamw-lr$lr.log" 2>&1 &
done
wait
for lr in $LRS; do
    run="$RUNS/adamw-lr$lr"
    echo "== $run: $(grep -c . "$run/metrics.jsonl" 2>/dev/null) metric records"; tail -3 "$run.log"
    spamopt spikes report "$run/spikes" > "$run/report.log" 2>&1 || tail -5 "$run/report.log"
    xz -T0 -9 -c "$run/spikes/spikes.jsonl" > "$OUT/spikes-lr$lr.jsonl.xz" 2>/dev/null || true
done
tar --exclude='*.pt' --exclude='spikes.jsonl' --exclude='cache' -czf "$OUT/census.tar.gz" "$RUNS"
ls -la "$OUT"
