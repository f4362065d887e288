#!/usr/bin/env bash
# Issue 16 on the GPU machine: the compact expert state (experts.state = "compact") against the
# fp32 state, in one call. Run from the repo root after carrying the wheel (.carry/*.whl), the
# prepared corpus (.carry/data/ruslit) and the raw one (.carry/ruslit):
#   bash exp/compact_check.sh [adam] [seed] [quality]          (default: all three, ~9 minutes)
# adam:    gmtier bench-adam on 16 threads: the compact row beside the fp32-state pipeline, params/s
#          and the fraction of the copy bandwidth (targets: >= 2.5x, >= 85 %)        ~1 min
# seed:    bench-train of seed-envelope scaled to 8 experts a layer (RAM 4 GB, GPU 2 GB, bf16),
#          fp32 state then compact state: step time and disk bytes a step shrink together  ~4 min
# quality: `small` for 1000 steps, fp32 state then compact, same seed and data (RAM holds every
#          record, so the run is compute-bound), the two runs side by side on the GPU; validation
#          loss every 250 steps   ~3 min
# Outputs under $OUT: bench-adam.json, seed-{fp32,compact}.json, metrics-{fp32,compact}.jsonl,
# compact-summary.json (the val losses and their ratio; target: compact within 1 %).
set -uo pipefail
. exp/gpu_setup.sh
lscpu | grep -E "^CPU\(s\)|Model name|avx512f" -o | sort -u | tee -a "$OUT/gpu.txt"
gm() { python3 -m gmtier.cli "$@"; }
for s in ${*:-adam seed quality}; do
  echo "=== $s $(date +%T)"
  case $s in
    adam) gm bench-adam --threads 16 --no-deepspeed --json 2>"$OUT/bench-adam.err" > "$OUT/bench-adam.json"
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('gmtier_mparams_s',
'compact_mparams_s', 'compact_speedup_vs_fp32_state', 'bandwidth_fraction', 'bandwidth_fraction_compact', 'dram_copy_gbps')})" \
            "$OUT/bench-adam.json" ;;
    seed) for state in fp32 compact; do
            gm bench-train --config configs/seed-envelope.toml --dir "$BENCH/seed-$state" --steps 2 --warmup 1 \
              --no-resident --no-prefetch-off --set model.n_experts=8 --set 'experts.ram_budget="4GB"' \
              --set 'experts.gpu_budget="2GB"' --set 'train.precision="bf16"' --set "experts.state=\"$state\"" \
              --json 2>"$OUT/seed-$state.err" > "$OUT/seed-$state.json"
            rm -rf "$BENCH/seed-$state"
            python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], json.dumps(r)[:600])" \
              "$OUT/seed-$state.json" $state
          done ;;
    quality) for state in fp32 compact; do  # side by side on the GPU: equal steps compare, wall times do not
            (gm train --config configs/small.toml --fresh --set "experts.state=\"$state\"" --set train.steps=1000 \
              --set "train.run_dir=\"$BENCH/small-$state\"" --set 'experts.ram_budget="4GiB"' \
              --set 'experts.gpu_budget="1GiB"' --set train.log_every=50 --set train.eval_every=250 \
              --set train.checkpoint_every=1000 > "$OUT/train-$state.log" 2>&1
             tail -4 "$OUT/train-$state.log"; cp "$BENCH/small-$state/metrics.jsonl" "$OUT/metrics-$state.jsonl") &
          done
          wait
          python3 - "$OUT" <<'PY'
import json, sys
out, s = sys.argv[1], {}
for state in ("fp32", "compact"):
    rows = [json.loads(l) for l in open(f"{out}/metrics-{state}.jsonl")]
    s[state] = {"val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
                "wall_s": rows[-1].get("wall_s")}
f, c = (s[k]["val_loss"][max(s[k]["val_loss"])] for k in ("fp32", "compact"))
s["final_val_loss"] = {"fp32": f, "compact": c, "compact_over_fp32": c / f, "within_1pct": c <= 1.01 * f}
json.dump(s, open(f"{out}/compact-summary.json", "w"), indent=1)
print(json.dumps(s["final_val_loss"]))
PY
          ;;
  esac
done
echo "=== end $(date +%T)"
