#!/usr/bin/env bash
# gmtier side by side with DeepSpeed on the GPU machine, one call (issue 20): the same Switch
# models under ZeRO-Offload, ZeRO-Infinity and gmtier, each pair in the same call. From the repo
# root: bash exp/peer_check.sh [small] [seed]   (default: both). Carried: the gmtier wheel in
# .carry/*.whl, the prepared corpus in .carry/data/ruslit, DeepSpeed's folder in .carry/ds
# (exp/peer_setup.sh). Results: $OUT/peer.jsonl (one JSON line a mode and M), the tables in
# $OUT/peer-*.txt, each mode's stderr in $OUT/peer-logs/, the built ops in $OUT/torch_ext
# (carry them back as .carry/ds/torch_ext and the next call skips the build).
#
# Expected time on the H200 box (16 cores, ~2 GB/s disk):
#   setup: wheels ~10 s; the JIT build of cpu_adam and async_io (in parallel) ~1-1.5 min the first
#     time, ~5 s with .carry/ds/torch_ext ($OUT/torch_ext of an earlier call, a few MB)
#   small (16k tokens a micro-batch; M = 1 and 64): zero2-offload ~60 s (one process, both M),
#     gmtier M=1 ~25 s, gmtier M=64 ~40 s                                       ~2 min
#   seed (scaled seed-envelope: 8 experts a layer, 11 GB GPU cap, M = 1 and 16): zero3-nvme
#     ~4 min (setup writes ~20 GB of swap files; ~30 s a step at M = 1, ~80 s at M = 16), gmtier
#     M=1 and M=16 ~1.2 min each                                                ~6 min
# gmtier runs first in each pair; a mode past --mode-timeout is killed and reported as a result
# (DeepSpeed's figures for the M it finished are kept). Over one call's 10 minutes with a first
# build: run `small` and `seed` in two calls then.
set -uo pipefail
. exp/gpu_setup.sh                      # the gmtier wheel, data/, $OUT, $BENCH
. exp/peer_setup.sh || exit 1           # DeepSpeed, libaio, the ops
P=${BENCH:-/root/gmtier-bench}/peer
mkdir -p "$P"
peer() {  # name, then the bench's arguments
  local name=$1; shift
  echo "=== $name $(date +%T), free disk $(df -BG --output=avail "$P" | tail -1 | tr -d ' ')"
  python3 benches/peer_deepspeed.py --data .carry/data/ruslit --work-dir "$P/work" --nvme-dir "$P/nvme" \
    --json-out "$OUT/peer.jsonl" --log-dir "$OUT/peer-logs" "$@" 2>>"$OUT/peer-$name.err" | tee "$OUT/peer-$name.txt"
  tail -3 "$OUT/peer-$name.err"
}
for s in ${*:-small seed}; do
  case $s in
    # small as shipped (RAM 1 GiB, GPU 128 MiB for experts: gmtier pages every step) against
    # ZeRO-Offload; M = 64 is the layer-major step of docs/performance.md (48 GB of activations
    # on the GPU for gmtier).
    small) peer small --config configs/small.toml --modes gmtier,zero2-offload --micro-batches 1,64 \
             --steps 3 --warmup 1 --large-m-steps 2 --mode-timeout 150 --set 'train.activations_gpu_budget="48GB"' ;;
    # The scaled seed-envelope of exp/compare_wheels.sh lm-seed (8 experts a layer, 15 GB of
    # records > RAM budget 4 GB; 11 GB GPU cap for every mode: the experts' fp32 state, 17 GB,
    # does not fit it) against ZeRO-Infinity.
    seed)  peer seed --config configs/seed-envelope.toml --modes gmtier,zero3-nvme --micro-batches 1,16 \
             --steps 2 --warmup 1 --large-m-steps 1 --mode-timeout 270 --set model.n_experts=8 --set 'experts.ram_budget="4GB"' \
             --set 'experts.gpu_budget="2GB"' --set 'train.precision="bf16"' --set 'train.gpu_memory_limit="11GB"' \
             --set 'train.dense_optimizer="cpu"' --set 'train.activations_gpu_budget="0"' \
             --set 'train.activations_ram_budget="40GB"' ;;
    *) echo "unknown part $s (small, seed)" ;;
  esac
done
echo "=== end $(date +%T)"
