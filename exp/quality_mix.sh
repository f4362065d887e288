#!/usr/bin/env bash
# On the GPU machine: Switch configs and their dense twin trained side by side on one GPU (each
# `small`-sized run leaves most of an H200 idle) on the RusLit + ru-docs mixture of
# configs/small-mix.toml, experts resident, then each Switch run compared with the first run (the
# dense twin) by `gmtier bench-quality --runs`. The runs share the GPU, so their equal-step
# comparison holds and their wall times do not (bench-quality's time columns need a GPU each).
#
# The corpora come in .carry/mix, xz-compressed with only their "text" field (ruslit/{train,val},
# ru-docs/{train-00,train-01,train-02,val}.jsonl.xz, as `python exp/pack_mix.py` packs them): three of
# ru-docs' four shards, 58 MB, fit the 64 MiB a call carries. They are unpacked to /root/mixsrc and prepared once into data/small-mix.
#
# Usage: QUALITY_S=540 bash exp/quality_mix.sh dense:model.switch_every=0 s16: s64:model.n_experts=64
#   each argument NAME:KEY=VALUE,KEY=VALUE (train.steps from $STEPS, default 5000, unless the run sets
#   its own: a Switch run of fewer steps, its schedule ending there, against the dense twin's). A run still
#   going QUALITY_S seconds after the start gets SIGTERM, checkpoints and stops; running the script
#   again on the warm box resumes it. A finished Switch run named in $CHOICE_RUN (default s16) is
#   scored on a 506-item choice file (the 22-item smoke set 23 times) for the time it takes.
#   NO_COMPARE=1: no dense twin among the runs (curves compared with an earlier call's by hand).
# $OUT: quality-runs.txt (progress and evaluations), quality-compare.txt (the reports),
#   quality.json (the comparisons), quality-<run>.png for the first Switch run, gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
source exp/gpu_setup.sh
QUALITY_S=${QUALITY_S:-540}
STEPS=${STEPS:-5000}
SRC=/root/mixsrc
CFG=/root/small-mix.toml
LOGS=/root/qlogs
mkdir -p "$LOGS" runs/q

if [ ! -f data/small-mix/meta.json ]; then
  t0=$(date +%s)
  for f in .carry/mix/*/*.xz; do
    out=$SRC/${f#.carry/mix/}; mkdir -p "$(dirname "$out")"
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 20)' \
      "$f" "${out%.xz}" &
  done
  wait
  sed -e "s#\.\./shared/data/ruslit#$SRC/ruslit#" -e "s#\.\./shared/data/ru-docs#$SRC/ru-docs#" configs/small-mix.toml > "$CFG"
  python3 -m gmtier.cli prepare --config "$CFG" 2>&1 | tail -4 | tee "$LOGS/prepare.log"
  echo "unpacked and prepared in $(( $(date +%s) - t0 )) s" | tee -a "$LOGS/prepare.log"
fi

names=()
for spec in "$@"; do
  name=${spec%%:*}; names+=("$name")
  sets=(--set "train.run_dir=\"runs/q/$name\"" --set 'experts.mode="resident"' --set "train.steps=$STEPS"
        --set train.eval_every=250 --set "train.checkpoint_every=$STEPS" --set train.log_every=100)
  IFS=, read -ra kv <<< "${spec#*:}"
  for o in "${kv[@]}"; do [ -n "$o" ] && sets+=(--set "$o"); done
  resume=(); [ -f "runs/q/$name/config.json" ] && resume=(--resume)
  steps=$STEPS; [[ ",${spec#*:}," =~ ,train\.steps=([0-9]+), ]] && steps=${BASH_REMATCH[1]}
  if grep -q "\"step\": $steps, \"val_loss\"" "runs/q/$name/metrics.jsonl" 2>/dev/null; then
    echo "[$name] finished already"; continue
  fi
  left=$(( START + QUALITY_S - $(date +%s) ))
  echo "[$name] ${resume[*]} ${sets[*]} (stopped in $left s)"
  OMP_NUM_THREADS=4 timeout -s TERM -k 120 "$left" python3 -m gmtier.cli train --config "$CFG" "${resume[@]}" "${sets[@]}" \
    >> "$LOGS/$name.log" 2>&1 &
done
wait

{
  cat "$LOGS/prepare.log" 2>/dev/null
  for n in "${names[@]}"; do echo "=== $n"; grep -E "val|stopped|resumed|done:|rror" "$LOGS/$n.log" | tail -40
    grep -E "tok/s" "$LOGS/$n.log" | tail -2; done
} > "$OUT/quality-runs.txt"
dense=${names[0]}
: > "$OUT/quality-compare.txt"; echo "{" > "$OUT/quality.json"
first=1
[ -n "${NO_COMPARE:-}" ] && names=("$dense")  # variants to read off against an earlier call's curves
for n in "${names[@]:1}"; do
  plot=/tmp/q-$n.png; [ $first = 1 ] && plot=$OUT/quality-$n.png
  echo "=== $n vs $dense" >> "$OUT/quality-compare.txt"
  # One comparison: its JSON kept, its report printed from it.
  if python3 -m gmtier.cli bench-quality --runs "runs/q/$n" "runs/q/$dense" --plot "$plot" --json > /tmp/q.json 2>> "$OUT/quality-compare.txt"; then
    python3 -c 'import json, sys; from gmtier.bench.quality import _report; print(_report(json.load(open(sys.argv[1]))))' \
      /tmp/q.json >> "$OUT/quality-compare.txt"
  else
    echo null > /tmp/q.json
  fi
  [ $first = 1 ] || echo "," >> "$OUT/quality.json"
  echo "\"$n\":" >> "$OUT/quality.json"
  cat /tmp/q.json >> "$OUT/quality.json"
  first=0
done
echo "}" >> "$OUT/quality.json"

CHOICE_RUN=${CHOICE_RUN:-s16}
if grep -q "\"step\": $STEPS, \"val_loss\"" "runs/q/$CHOICE_RUN/metrics.jsonl" 2>/dev/null; then
  BIG=/root/smoke-x23.jsonl
  for _ in $(seq 23); do cat benches/data/parus_format_smoke_ru.jsonl; done > "$BIG"
  { echo "=== eval of $CHOICE_RUN: whole val split, then the 506-item choice file";
    python3 -m gmtier.cli eval --run "runs/q/$CHOICE_RUN"
    t0=$(date +%s.%N); python3 -m gmtier.cli eval --run "runs/q/$CHOICE_RUN" --choice "$BIG"
    echo "506 items: $(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))") s wall (load, score, print)"; } >> "$OUT/quality-compare.txt" 2>&1
fi
cat "$OUT/quality-runs.txt" | tail -30; cat "$OUT/quality-compare.txt" | grep -E "===|reaches|does not|final" 
echo "script: $(( $(date +%s) - START )) s"
