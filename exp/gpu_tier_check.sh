#!/usr/bin/env bash
# The GPU tier's accounting in Rust (store/gpu.rs, copies reported by a cuLaunchHostFunc host
# function) against the wheel before it, on one GPU box in one call. Carry as for
# exp/compare_wheels.sh: the wheel before in .carry/old, this one in .carry/new, the prepared
# corpus in .carry/data/ruslit, the raw one in .carry/ruslit. From the repo root:
#   bash exp/gpu_tier_check.sh
# It runs pytest -m gpu with the new wheel (the host function path: test_gpu_tier.py's waiter on
# a RAM tier full of copies in flight, test_store_gpu.py), the host cost per acquire + release
# with each wheel (exp/gpu_tier_host_cost.py), then bench-paging and bench-train of `small` at
# both budget settings, alternating the wheels. Logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash exp/compare_wheels.sh tests
for i in 1 2; do
  for w in old new; do
    PYTHONPATH=/tmp/site_$w python3 exp/gpu_tier_host_cost.py | tee -a "$OUT/host_cost.jsonl"
  done
done
bash exp/compare_wheels.sh paging-old paging-new trainB-old trainB-new trainA-old trainA-new
