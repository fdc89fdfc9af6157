#!/usr/bin/env bash
# The pre-training study behind REPRODUCTION.md: the mini LLaMA on the embedded corpus, 400 steps, one command
# per experiment. Each `spamopt compare` reuses the runs it finds finished (same config), so rerunning this
# script after an interruption continues where it stopped; with everything finished it only rewrites reports.
# About 2 h on 2 cores from scratch (77 runs of ~3 min on one core each, two at a time).
#
#   bash benchmarks/study.sh            # every experiment, then the paired comparisons
#   bash benchmarks/study.sh claims     # only the paired comparisons of finished runs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study}
COMMON=(--steps 400 --workers 2 --no-progress)
# SPAM's schedule scaled to 400 steps: a reset every 100 steps with a 30-step warmup (the paper's N/ΔT).
SPAM='"spam": {"reset_interval": 100, "warmup_steps": 30}'

if [[ "${1:-all}" != claims ]]; then
  # Rows 3, 4, 6, 7: the optimizers and the controls that isolate SPAM's mechanisms.
  spamopt compare "${COMMON[@]}" --seeds 0,1,2 --out-dir "$OUT/ablation" \
    --optimizers adamw,adamw-eps6=adamw,adam-clip,spam,spam-off=spam,spam-clip-only=spam,spam-reset-only=spam \
    --optimizer-args "{$SPAM, \"adamw-eps6\": {\"eps\": 1e-6},
      \"spam-off\": {\"threshold\": 0, \"reset_interval\": 0, \"warmup_steps\": 0},
      \"spam-clip-only\": {\"reset_interval\": 0, \"warmup_steps\": 0}, \"spam-reset-only\": {\"threshold\": 0}}"

  # Rows 5 and 14: no post-reset warmup; θ, ΔT (N kept at 0.3 ΔT) and bias_correction_reset, one at a time.
  spamopt compare "${COMMON[@]}" --seeds 0,1,2 --out-dir "$OUT/ablation" \
    --optimizers spam,spam-no-warmup=spam,theta500=spam,theta50000=spam,dt50=spam,dt200=spam,bc-reset=spam \
    --optimizer-args "{$SPAM, \"spam-no-warmup\": {\"warmup_steps\": 0},
      \"theta500\": {\"threshold\": 500}, \"theta50000\": {\"threshold\": 50000},
      \"dt50\": {\"reset_interval\": 50, \"warmup_steps\": 15}, \"dt200\": {\"reset_interval\": 200, \"warmup_steps\": 60},
      \"bc-reset\": {\"bias_correction_reset\": true}}"

  # Row 2: zeroing the gradient coordinates above GSS 50 (the paper's intervention) against AdamW as it is.
  spamopt compare "${COMMON[@]}" --seeds 0,1,2 --out-dir "$OUT/nullify" --optimizers adamw --nullify-spikes

  # Row 15: learning-rate sweep (the ablation's lr 3e-3 runs are the fourth point), seeds 0 and 1.
  spamopt compare "${COMMON[@]}" --seeds 0,1 --out-dir "$OUT/lr" \
    --optimizers adamw-1e-3=adamw,adamw-1e-2=adamw,adamw-3e-2=adamw,adamw-1e-1=adamw,adam-clip-1e-3=adam-clip,adam-clip-1e-2=adam-clip,adam-clip-3e-2=adam-clip,adam-clip-1e-1=adam-clip,spam-1e-3=spam,spam-1e-2=spam,spam-3e-2=spam,spam-1e-1=spam \
    --optimizer-args "{$SPAM, \"adamw-1e-3\": {\"lr\": 1e-3}, \"adamw-1e-2\": {\"lr\": 1e-2},
      \"adamw-3e-2\": {\"lr\": 3e-2}, \"adam-clip-1e-3\": {\"lr\": 1e-3}, \"adam-clip-1e-2\": {\"lr\": 1e-2},
      \"adam-clip-3e-2\": {\"lr\": 3e-2}, \"spam-1e-3\": {\"lr\": 1e-3}, \"spam-1e-2\": {\"lr\": 1e-2},
      \"spam-3e-2\": {\"lr\": 3e-2}, \"adamw-1e-1\": {\"lr\": 1e-1}, \"adam-clip-1e-1\": {\"lr\": 1e-1},
      \"spam-1e-1\": {\"lr\": 1e-1}}"

  # Rows 6 and 7 on a second corpus: Project Gutenberg books in C4's shard layout ($GUTENBERG, a folder of
  # train-*/validation-* .jsonl.xz shards; skipped when absent), the first 4M training tokens, seeds 0 and 1.
  GUTENBERG=${GUTENBERG:-../shared/data/gutenberg}
  if [[ -d "$GUTENBERG" ]]; then
    spamopt compare "${COMMON[@]}" --seeds 0,1 --out-dir "$OUT/gutenberg" --data "$GUTENBERG" \
      --max-train-tokens 4000000 --optimizers adamw,adam-clip,spam,spam-off=spam \
      --optimizer-args "{$SPAM, \"spam-off\": {\"threshold\": 0, \"reset_interval\": 0, \"warmup_steps\": 0}}"
  fi

  # Row 1: the spike census (every coordinate of every tensor, GSS > 50), AdamW at the study's settings.
  # The same at lr 1e-2 (where AdamW degrades) and on the Gutenberg books.
  spamopt train --optimizer adamw --steps 400 --spikes --resume --no-progress --run-dir "$OUT/census"
  spamopt train --optimizer adamw --steps 400 --spikes --resume --no-progress --lr 1e-2 --run-dir "$OUT/census-lr1e-2"
  for census in census census-lr1e-2; do spamopt spikes report "$OUT/$census/spikes"; done
  if [[ -d "$GUTENBERG" ]]; then
    spamopt train --optimizer adamw --steps 400 --spikes --resume --no-progress --data "$GUTENBERG" \
      --max-train-tokens 4000000 --run-dir "$OUT/census-gutenberg"
    spamopt spikes report "$OUT/census-gutenberg/spikes"
  fi
fi

python benchmarks/claims.py "$OUT/ablation" spam:adamw spam:adam-clip spam-off:adamw adamw-eps6:adamw \
  spam-clip-only:spam-off spam-reset-only:spam-off spam:spam-clip-only spam:spam-no-warmup \
  theta500:spam theta50000:spam dt50:spam dt200:spam bc-reset:spam --out results/claims.json
# Across experiments: labels are folders under $OUT.
python benchmarks/claims.py "$OUT" nullify/adamw:ablation/adamw \
  lr/spam-1e-3:lr/adamw-1e-3 lr/spam-1e-3:lr/adam-clip-1e-3 lr/spam-1e-2:lr/adamw-1e-2 \
  lr/spam-1e-2:lr/adam-clip-1e-2 lr/spam-3e-2:lr/adamw-3e-2 lr/spam-3e-2:lr/adam-clip-3e-2 \
  lr/spam-1e-1:lr/adamw-1e-1 lr/spam-1e-1:lr/adam-clip-1e-1 \
  --out results/claims_nullify_lr.json
if [[ -d "$OUT/gutenberg" ]]; then
  python benchmarks/claims.py "$OUT/gutenberg" spam:adamw spam:adam-clip spam-off:adamw spam:spam-off \
    --out results/claims_gutenberg.json
fi
