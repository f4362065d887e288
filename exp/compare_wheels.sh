#!/usr/bin/env bash
# Two wheels of gmtier on one GPU box, side by side: .carry/old/*.whl and .carry/new/*.whl, the
# prepared corpus in .carry/data/ruslit and the raw one in .carry/ruslit. Run from the repo root on
# the GPU machine: bash exp/compare_wheels.sh tests trainA-old trainA-new trainB-old trainB-new paging-old paging-new
# (tests runs pytest -m gpu with the new wheel; lm-small-{old,new} and lm-seed sweep the layer-major
# step's micro-batches: small at $SMALL_M (default 1 and 64); lm-seed, lm-seed-compact (the expert
# state) and their -old / -new forms (the wheel; default new) the scaled seed-envelope at $SEED_M,
# default 1 and 32, $SEED_STEPS timed steps (default 2), in an 11 GB cap, with its disk timeline in $OUT/timeline-<name>.jsonl). Logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
export GMTIER_RUSLIT=$PWD/.carry/ruslit
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# (Re)installed when the carried wheels differ from what a warm box has.
stamp=$(cat .carry/old/*.whl .carry/new/*.whl | sha1sum | cut -c1-16)
if [ "$(cat /tmp/site_stamp 2>/dev/null)" != "$stamp" ]; then
  rm -rf /tmp/site_old /tmp/site_new
  python3 -m pip install -q --no-deps --no-index --target /tmp/site_old .carry/old/*.whl 2>&1 | grep -v WARN
  python3 -m pip install -q --no-deps --no-index --target /tmp/site_new .carry/new/*.whl 2>&1 | grep -v WARN
  echo "$stamp" > /tmp/site_stamp
  mkdir -p data && cp -rn .carry/data/* data/
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; lscpu | grep -E "^CPU\(s\)|Model name" | tee -a "$OUT/gpu.txt"
fi
# OVERLAY=1: this checkout's Python sources over the new wheel's (a Python-only change needs no new wheel).
[ "${OVERLAY:-0}" = 1 ] && cp -r python/gmtier/. /tmp/site_new/gmtier/
B=/root/bench
gm() { local which=$1; shift; PYTHONPATH=/tmp/site_$which python3 -m gmtier.cli "$@"; }
# A bench-train's JSON (/tmp/r.json) appended to $OUT/train.jsonl under the step's name.
record() { python3 -c "import json,sys; print(json.dumps({'run': sys.argv[1], 'r': json.load(open('/tmp/r.json'))}))" "$1" >> "$OUT/train.jsonl"; tail -c 300 /tmp/r.json; echo; }
for s in "$@"; do
  echo "=== $s $(date +%T)"
  case $s in
    tests) PYTHONPATH=/tmp/site_new python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15 ;;
    trainA-*) w=${s#trainA-}; gm $w bench-train --config configs/small.toml --dir $B/A-$w --no-prefetch-off \
         --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="1GiB"' --json 2>>"$OUT/err.txt" > /tmp/r.json; record $s ;;
    trainB-*) w=${s#trainB-}; gm $w bench-train --config configs/small.toml --dir $B/B-$w \
         --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="128MiB"' --json 2>>"$OUT/err.txt" > /tmp/r.json; record $s ;;
    lm-small-*) w=${s#lm-small-}; gm $w bench-train --config configs/small.toml --dir $B/lm-small --no-prefetch-off --steps 2 --warmup 1 \
         --micro-batches ${SMALL_M:-1,64} --set 'train.activations_gpu_budget="48GB"' --json 2>>"$OUT/err.txt" > /tmp/r.json; record $s ;;
    lm-seed*) case $s in *compact*) state=compact ;; *) state=fp32 ;; esac
         case $s in *-old) w=old ;; *) w=new ;; esac
         gm $w bench-train --config configs/seed-envelope.toml --dir $B/$s --no-prefetch-off --no-resident --no-dense-twin \
         --steps ${SEED_STEPS:-2} --warmup 1 \
         --micro-batches ${SEED_M:-1,32} --set "experts.state=\"$state\"" --set model.n_experts=8 --set 'experts.ram_budget="4GB"' --set 'experts.gpu_budget="2GB"' \
         --set 'train.precision="bf16"' --set 'train.gpu_memory_limit="11GB"' --set 'train.dense_optimizer="cpu"' \
         --set 'train.activations_gpu_budget="0"' --set 'train.activations_ram_budget="40GB"' \
         --timeline "$OUT/timeline-$s.jsonl" --json 2>>"$OUT/err.txt" > /tmp/r.json; record $s ;;
    paging-*) w=${s#paging-}; gm $w bench-paging --dir $B/paging --data-mb 8192 --ram-mb 2048 --gpu-mb 4096 \
         --record-mb 64 2>&1 | tee -a "$OUT/paging-$w.txt" | tail -25 ;;
  esac
done
echo "=== end $(date +%T)"
