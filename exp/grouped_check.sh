#!/usr/bin/env bash
# Issue 17 on the GPU machine (H200): grouped expert GEMMs (experts.gemm) against the per-expert
# loop, in one call. Run from the repo root with the wheel installed and this checkout's Python
# first on the path, the prepared corpus in .carry/data/ruslit (and the raw one in .carry/ruslit
# for the tests that prepare their own):
#   PYTHONPATH=python bash exp/grouped_check.sh [tests] [layer] [steps] [bench] [bench64]
# Expected GPU time: about 4 minutes for the default four steps; bench64 adds about 2.5.
#  tests    pytest -m gpu of tests/test_grouped.py and tests/test_train_gpu.py: grouped == loop in
#           bf16 (16 and 64 experts), no host sync in a grouped Switch forward, resident == tiered ~90 s
#  layer    exp/grouped_layer.py: one Switch layer of small fwd+bwd, loop vs grouped, 16 and 64
#           experts, beside a dense FFN of the same d_ff (CUDA events)                        ~20 s
#  steps    exp/grouped_steps.py: resident training steps of small (grouped as CUDA graphs, grouped
#           eagerly, loop), small-dense, small with 64 experts (the same); step / dense twin
#           (targets 1.25 and 1.5); STEPS_ROUNDS=N alternates N rounds, STEPS_ONLY picks runs   ~80 s
#  bench    gmtier bench-train of small with every record in RAM and on the GPU: tiered against
#           resident (target >= 0.9) and the dense twin, in the same run                      ~90 s
#  bench64  the same with 64 experts a layer (RAM 10 GiB, GPU 2 GiB; two 7 GB stores made) ~150 s
# Each step prints which GEMM path ran ("grouped"/"loop", and why where grouped fell back).
# Outputs under $OUT: gpu.txt, pytest-grouped.log, layer.jsonl, steps.jsonl, bench-small.json,
# bench-64.json, and summary.txt (the lines to read).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-python}
OUT=${OUT:-/tmp/gmtier-out}; mkdir -p "$OUT"
[ -d .carry/ruslit ] && export GMTIER_RUSLIT=${GMTIER_RUSLIT:-$PWD/.carry/ruslit}
mkdir -p data && cp -rn .carry/data/* data/ 2>/dev/null
BENCH=${BENCH_DIR:-/root/gmtier-bench}; mkdir -p "$BENCH"
python3 -c "import torch, gmtier; print(torch.__version__, torch.cuda.get_device_name(0), 'sm%d%d' % torch.cuda.get_device_capability(), gmtier.__file__)" | tee "$OUT/gpu.txt"
SUM="$OUT/summary.txt"
gm() { python3 -m gmtier.cli "$@"; }
# The figures of a bench-train JSON that answer the issue, one line.
brief() { python3 - "$1" "$2" <<'PY' | tee -a "$SUM"
import json, sys
(r,) = json.load(open(sys.argv[1]))
keys = ("step_s", "resident_step_s", "tiered_again_step_s", "tiered_vs_resident", "dense_twin_step_s",
        "resident_over_dense_twin", "tiered_over_dense_twin", "expert_gemm_resident", "expert_gemm_tiered",
        "resident_switch_launches",
        "gpu_hit_rate", "ram_hit_rate", "expert_fwd_s", "expert_bwd_s")
print(sys.argv[2], json.dumps({k: r.get(k) for k in keys}))
PY
}
for s in ${*:-tests layer steps bench}; do
  echo "=== $s $(date +%T)" | tee -a "$SUM"
  case $s in
    tests) sel=(tests/test_grouped.py tests/test_train_gpu.py)
           # Without a raw corpus (.carry/ruslit or ../shared) only the tests that need no data.
           [ -z "${GMTIER_RUSLIT:-}" ] && [ ! -d ../shared/data/ruslit ] && sel=(tests/test_grouped.py -k "kernel or sync")
           timeout 300 python3 -m pytest -q -m gpu "${sel[@]}" 2>&1 | tee "$OUT/pytest-grouped.log" | tail -15
           tail -1 "$OUT/pytest-grouped.log" >> "$SUM" ;;
    layer) timeout 200 python3 exp/grouped_layer.py > "$OUT/layer.txt" 2>"$OUT/layer.err"; grep '^{' "$OUT/layer.txt" > "$OUT/layer.jsonl"
           sed -n '/^case/,$p' "$OUT/layer.txt" | tee -a "$SUM" ;;
    steps) timeout 400 python3 exp/grouped_steps.py --rounds "${STEPS_ROUNDS:-1}" --only "${STEPS_ONLY:-}" --dir "$BENCH/grouped-steps" > "$OUT/steps.txt" 2>"$OUT/steps.err"
           grep '^{' "$OUT/steps.txt" > "$OUT/steps.jsonl"; sed -n '/^round/,$p' "$OUT/steps.txt" | tee -a "$SUM"
           rm -rf "$BENCH/grouped-steps" ;;
    bench) timeout 400 python3 -m gmtier.cli bench-train --config configs/small.toml --dir "$BENCH/grouped-small" \
             --no-prefetch-off --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="1GiB"' --json \
             2>"$OUT/bench-small.err" > "$OUT/bench-small.json"; brief "$OUT/bench-small.json" small ;;
    bench64) timeout 500 python3 -m gmtier.cli bench-train --config configs/small.toml --dir "$BENCH/grouped-64" \
             --no-prefetch-off --set model.n_experts=64 --set 'experts.ram_budget="10GiB"' \
             --set 'experts.gpu_budget="2GiB"' --json 2>"$OUT/bench-64.err" > "$OUT/bench-64.json"
             brief "$OUT/bench-64.json" small-64 ;;
    *) echo "unknown step $s (tests layer steps bench bench64)" ;;
  esac
done
echo "=== end $(date +%T)" | tee -a "$SUM"
