#!/usr/bin/env bash
# Issue 17 before/after on one GPU box, in one call: this checkout's Python ("new") against an
# earlier copy of it in .carry/oldpy/python/gmtier ("old", e.g. `git archive HEAD python/gmtier |
# tar -x -C .carry/oldpy`), both over the wheel in .carry/new (its Rust). Alternating rounds of
# exp/grouped_steps.py (resident steps of small-dense, small and small with 64 experts, grouped),
# exp/grouped_layer.py (one Switch layer against a dense FFN) each way, then with the new code:
# pytest -m gpu of tests/test_grouped.py, exp/profile_resident.py (kernel totals and traces) and
# bench-train of small with every record in RAM and on the GPU. Run from the repo root:
#   bash exp/grouped_compare.sh [rounds]       (about 6 minutes for 2 rounds)
# STEPS_ONLY picks grouped_steps.py's runs, STEPS its timed steps; LAYER=0 skips grouped_layer.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash exp/compare_wheels.sh > "$OUT/setup.txt" 2>&1  # installs the wheels, copies the corpus
rm -rf /tmp/site_cmp_old /tmp/site_cmp_new
cp -r /tmp/site_new /tmp/site_cmp_old && cp -r .carry/oldpy/python/gmtier/. /tmp/site_cmp_old/gmtier/
cp -r /tmp/site_new /tmp/site_cmp_new && cp -r python/gmtier/. /tmp/site_cmp_new/gmtier/
SUM="$OUT/summary.txt"
for round in $(seq "${1:-2}"); do
  for w in old new; do
    echo "=== round $round $w steps $(date +%T)" | tee -a "$SUM"
    PYTHONPATH=/tmp/site_cmp_$w timeout 240 python3 exp/grouped_steps.py --steps "${STEPS:-10}" \
      --only "${STEPS_ONLY:-small-dense,small grouped,small 64 experts grouped}" 2>>"$OUT/err.txt" | sed -n '/^round/,$p' | tee -a "$SUM"
    if [ "${LAYER:-1}" = 1 ]; then
      echo "=== round $round $w layer" | tee -a "$SUM"
      PYTHONPATH=/tmp/site_cmp_$w timeout 120 python3 exp/grouped_layer.py 2>>"$OUT/err.txt" | sed -n '/^case/,$p' | tee -a "$SUM"
    fi
  done
done
export PYTHONPATH=/tmp/site_cmp_new
echo "=== pytest $(date +%T)" | tee -a "$SUM"
GMTIER_RUSLIT=$PWD/.carry/ruslit timeout 300 python3 -m pytest -q -m gpu tests/test_grouped.py 2>&1 | tail -4 | tee -a "$SUM"
echo "=== profile $(date +%T)" | tee -a "$SUM"
mkdir -p /tmp/prof && timeout 200 python3 exp/profile_resident.py --trace-dir /tmp/prof > "$OUT/profile.txt" 2>&1
grep "#####" "$OUT/profile.txt" | tee -a "$SUM"; cp /tmp/prof/kernels-*.json "$OUT/" 2>/dev/null
echo "=== bench $(date +%T)" | tee -a "$SUM"
timeout 300 python3 -m gmtier.cli bench-train --config configs/small.toml --dir /root/bench/grouped-small --no-prefetch-off \
  --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="1GiB"' --json 2>>"$OUT/err.txt" > "$OUT/bench-small.json"
python3 -c "
import json,sys
(r,) = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ('step_s','resident_step_s','tiered_vs_resident','dense_twin_step_s','resident_over_dense_twin','expert_gemm_resident','expert_gemm_tiered','resident_switch_launches')})" "$OUT/bench-small.json" | tee -a "$SUM"
echo "=== end $(date +%T)" | tee -a "$SUM"
