#!/usr/bin/env bash
# One device-machine session: install the carried abi3 wheel, run the GPU tests and the benches,
# logs under $OUT. Usage (from the repo root on the GPU machine): bash exp/gpu_session.sh [steps...]
# steps: tests paging adam train gpuprefetch seed seed12 seedfull (default: all but the seed ones:
# seed and seed12 take ~2-4 minutes each; seedfull needs the 235 GB disk of the 4-GPU box and
# ~8 minutes). The seed steps write the disk timeline too (benches/disk_timeline.py prints it).
# The wheel and the prepared data travel in .carry/.
set -uo pipefail
. exp/gpu_setup.sh
steps=${*:-tests paging adam train gpuprefetch}
ONE_BATCH="--set train.micro_batches=1 --set train.gpu_memory_limit=\"\" --set train.dense_optimizer=\"torch\""
for s in $steps; do
  echo "=== $s"
  case $s in
    tests)  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15 ;;
    paging) python3 -m gmtier.cli bench-paging --dir "$BENCH/paging" --data-mb 8192 --ram-mb 2048 --gpu-mb 4096 \
              --record-mb 64 2>&1 | tee "$OUT/bench-paging.txt" | tail -30 ;;
    adam)   python3 -m gmtier.cli bench-adam --threads 16 --json 2>&1 | tee "$OUT/bench-adam.json" | tail -30 ;;
    train)  python3 -m gmtier.cli bench-train --config configs/small.toml --dir "$BENCH/train" \
              --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="1GiB"' \
              ${TRAIN_SET:-} 2>"$OUT/bench-train.err" | tee "$OUT/bench-train.txt" | tail -60; tail -5 "$OUT/bench-train.err" ;;
    # small with a GPU budget for 30 of its 64 experts (the RAM budget holds all): the GPU tier
    # pages every step and the router's guesses are copied to it early (prefetch on vs off).
    gpuprefetch) python3 -m gmtier.cli bench-train --config configs/small.toml --dir "$BENCH/gpuprefetch" \
              --set 'experts.ram_budget="4GiB"' --set 'experts.gpu_budget="128MiB"' \
              2>"$OUT/bench-gpuprefetch.err" | tee "$OUT/bench-gpuprefetch.txt" | tail -60 ;;
    # seed-envelope scaled to the 64 GiB disk (15 GB of records; the full config needs ~180 GB).
    # The seed steps time one batch a step without the GPU cap ($ONE_BATCH; exp/compare_wheels.sh
    # lm-seed runs the config's layer-major step under it).
    seed)   python3 -m gmtier.cli bench-train --config configs/seed-envelope.toml --dir "$BENCH/seed" --steps 3 --warmup 1 \
              --set model.n_experts=8 --set 'experts.ram_budget="4GB"' --set 'experts.gpu_budget="2GB"' \
              --set 'train.precision="bf16"' $ONE_BATCH --timeline "$OUT/timeline-seed.jsonl" ${SEED_SET:-} \
              2>"$OUT/bench-seed.err" | tee "$OUT/bench-seed.txt" | tail -60 ;;
    # seed-envelope at 12 experts a layer (22.6 GB of records, 45 GB of store file), the budgets in
    # the full config's proportions: RAM 35 % of the records, GPU ~85 % of the weights.
    seed12) python3 -m gmtier.cli bench-train --config configs/seed-envelope.toml --dir "$BENCH/seed12" --steps 2 \
              --warmup 1 --no-prefetch-off --no-resident --set model.n_experts=12 --set 'experts.ram_budget="8GB"' \
              --set 'experts.gpu_budget="2.9GB"' --set 'train.precision="bf16"' $ONE_BATCH --timeline "$OUT/timeline-seed12.jsonl" \
              ${SEED_SET:-} 2>"$OUT/bench-seed12.err" | tee "$OUT/bench-seed12.txt" | tail -60 ;;
    # The full seed-envelope: ~180 GB of store, ~3 minutes to make, 80-85 s a step on the 4xH200 box.
    seedfull) avail=$(df -BG --output=avail "$(dirname "$BENCH")" | tail -1 | tr -dc 0-9)
              if [ "$avail" -lt 200 ]; then echo "seedfull needs ~200 GB free, $BENCH has ${avail} GB"; continue; fi
              python3 -m gmtier.cli bench-train --config configs/seed-envelope.toml --dir "$BENCH/seedfull" --steps 1 \
              --warmup 1 --no-prefetch-off --no-resident --set 'train.precision="bf16"' $ONE_BATCH \
              --set 'experts.ram_budget="32GB"' --set 'experts.gpu_budget="11GB"' --timeline "$OUT/timeline-seedfull.jsonl" ${SEED_SET:-} 2>"$OUT/bench-seedfull.err" | tee "$OUT/bench-seedfull.txt" | tail -80 ;;
  esac
done
