#!/usr/bin/env bash
# On the GPU machine, after exp/gpu_session.sh installed the wheel and the data: a short
# `small` run fully resident and the same run tiered (experts paged through the store), same
# seed; metrics.jsonl of each run and a summary JSON (loss curves, tokens/s, tier hit rates,
# prefetch precision/recall, peak GPU memory) under $OUT.
# Usage: bash exp/gpu_train.sh [steps] [config]     (defaults: 150, configs/small.toml)
# Extra overrides for both runs: GPU_TRAIN_SET='--set experts.ram_budget="4GiB"'
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gmtier-out}; mkdir -p "$OUT"
STEPS=${1:-150}
CONFIG=${2:-configs/small.toml}
RUNS=${GPU_TRAIN_DIR:-/root/gmtier-train}
mkdir -p data && { [ -d .carry/data ] && cp -rn .carry/data/* data/ 2>/dev/null || true; }
for mode in resident tiered; do
  echo "=== $mode"
  python3 -m gmtier.cli train --config "$CONFIG" --fresh \
    --set "experts.mode=\"$mode\"" --set "train.steps=$STEPS" --set "train.run_dir=\"$RUNS/$mode\"" \
    --set "train.log_every=10" --set "train.eval_every=$STEPS" --set "train.checkpoint_every=$STEPS" \
    ${GPU_TRAIN_SET:-} 2>&1 | tee "$OUT/train-$mode.log" | tail -8
  cp "$RUNS/$mode/metrics.jsonl" "$OUT/metrics-$mode.jsonl"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
summary = {}
for mode in ("resident", "tiered"):
    rows = [json.loads(l) for l in open(f"{out}/metrics-{mode}.jsonl")]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    tps = [r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]]
    s = {"loss": {r["step"]: round(r["loss"], 4) for r in train}, "val_loss": val[-1]["val_loss"] if val else None,
         "tokens_per_s_median": sorted(tps)[len(tps) // 2]}
    for k in ("ram_hit_rate", "gpu_hit_rate", "prefetch_precision", "prefetch_recall", "wait_s", "adam_s", "skipped_updates"):
        vals = [r[k] for r in train[1:] if r.get(k) is not None]
        if vals:
            s[k] = sum(vals) / len(vals)
    summary[mode] = s
r, t = summary["resident"], summary["tiered"]
common = sorted(set(r["loss"]) & set(t["loss"]))
summary["max_abs_loss_diff"] = max(abs(r["loss"][k] - t["loss"][k]) for k in common)
summary["tiered_vs_resident_tokens_per_s"] = t["tokens_per_s_median"] / r["tokens_per_s_median"]
json.dump(summary, open(f"{out}/gpu-train-summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))
for mode in ("resident", "tiered"):
    print(mode, {k: v for k, v in summary[mode].items() if k != "loss"})
PY
