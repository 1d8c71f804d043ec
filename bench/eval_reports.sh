#!/usr/bin/env bash
# Rebuild the committed evaluation reports in docs/eval/ (report.md, report.json, plots) on CoCoNot's
# test files: the default model and the benchmark-recipe model by their first-token decision, the
# plain SmolLM2-135M base in generate mode with the string-match judge, side by side; the default
# model calibrated on CoCoNot's train files (held out for it: it trained on the built-in data only;
# the benchmark model trained on them) with its presets measured on test; and a generate-mode
# sample of both models.
#
#   bash bench/eval_reports.sh            # models by name from the models dir (RTLOCAL_HOME applies)
#   DEFAULT=path.gguf BENCH=path.gguf bash bench/eval_reports.sh
#
# Every step resumes from its per-prompt cache (OUT/*/records.jsonl, not committed), so an
# interrupted run loses nothing. Run it alone: llama.cpp uses every core. The base's generate run
# is the slow one (~15 min on 2 idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."
RT=.venv/bin/rtlocal
DATA=${DATA:-../shared/data/coconot}
OUT=${OUT:-docs/eval}
DEFAULT=${DEFAULT:-smollm2-135m-rt}
BENCH=${BENCH:-smollm2-135m-rt-bench}
BASE=${BASE:-$(.venv/bin/python -c 'from finetune.recipes import smollm2_gguf; print(smollm2_gguf())')}
mkdir -p "$OUT"

$RT eval "$BASE" --data "$DATA" --mode generate --out "$OUT/base-generate" --label "SmolLM2-135M base (generate)"
$RT eval "$DEFAULT" --data "$DATA" --out "$OUT/default-first-token" --label "default recipe (first-token)" \
  --compare "$OUT/base-generate"
$RT eval "$BENCH" --data "$DATA" --out "$OUT/bench-first-token" --label "benchmark recipe (first-token)" \
  --compare "$OUT/default-first-token" --compare "$OUT/base-generate"

# strictness that means measured rates: calibrate on the train files, evaluate the presets on test
$RT calibrate "$DEFAULT" --data "$DATA" --split train --target f1 --profile "$OUT/default.calibration.json" \
  --cache "$OUT/default-calibrate"
for preset in lenient balanced strict; do
  $RT eval "$DEFAULT" --data "$DATA" --calibration "$OUT/default.calibration.json" --strictness "$preset" \
    --out "$OUT/default-calibrated-$preset" --label "default recipe, calibrated $preset" --no-plots
done

# full answers: the refusal token's verdict next to the string-match judge's, on a fixed sample
for m in default bench; do
  model=$DEFAULT; [ $m = bench ] && model=$BENCH
  $RT eval "$model" --data "$DATA" --mode generate --limit 100 --out "$OUT/$m-generate-200" \
    --label "$m recipe (generate, 200)" --no-plots
done
