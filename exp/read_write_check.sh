#!/usr/bin/env bash
# experts.read_write on one GPU call (issue 15): the scaled seed-envelope at M = 32 under the 11 GB
# cap, logs under $OUT. Steps (default: ab bench):
#   ab     exp/store_ab.py --knob read_write: $AB_VALUES (default together,turns) taking turns in one
#          process, $AB_BLOCK steps each (default 3), $AB_CYCLES rounds (default 2), on one store and disk
#   bench  gmtier bench-train of the same config with experts.read_write = "auto" (the store's
#          probe decides; the table's `experts.read_write` row says what ran), $SEED_STEPS timed steps
# Runs this checkout's Python over the carried wheel's _core (.carry/*.whl, prepared data in .carry/data).
set -uo pipefail
. exp/gpu_setup.sh
cp "$(python3 -c 'import gmtier, os; print(os.path.dirname(gmtier.__file__))')"/_core*.so python/gmtier/
export PYTHONPATH=$PWD/python
B=${BENCH_DIR:-/root/gmtier-bench}
for s in ${*:-ab bench}; do
  echo "=== $s $(date +%T)"
  case $s in
    ab) python3 exp/store_ab.py --knob read_write --values "${AB_VALUES:-together,turns}" --block "${AB_BLOCK:-3}" \
          --cycles "${AB_CYCLES:-2}" --dir "$B/ab" --json "$OUT/ab.json" 2>&1 | tee "$OUT/ab.txt" ;;
    bench) python3 -m gmtier.cli bench-train --config configs/seed-envelope.toml --dir "$B/seed" --no-prefetch-off \
          --no-resident --no-dense-twin --steps "${SEED_STEPS:-3}" --warmup 1 --micro-batches 32 \
          --set model.n_experts=8 --set 'experts.ram_budget="4GB"' --set 'experts.gpu_budget="2GB"' \
          --set 'train.precision="bf16"' --set 'train.gpu_memory_limit="11GB"' --set 'train.dense_optimizer="cpu"' \
          --set 'train.activations_gpu_budget="0"' --set 'train.activations_ram_budget="40GB"' \
          --timeline "$OUT/timeline-seed.jsonl" 2>"$OUT/bench-seed.err" | tee "$OUT/bench-seed.txt" ;;
  esac
done
echo "=== end $(date +%T)"
