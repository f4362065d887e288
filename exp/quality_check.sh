#!/usr/bin/env bash
# On the GPU machine (about 8 minutes for the defaults): `gmtier bench-quality` of a Switch config
# against its dense twin (model.switch_every = 0, equal FLOPs per token), both fully resident
# (a question of quality, not paging), bf16, same data and seed, validation every steps/10;
# then `gmtier eval` of the Switch run on the whole val split and `gmtier eval --choice` on the
# hand-made smoke set (benches/data, not PARus) and on a 506-item file made of it (the time a
# 500-item file takes). Everything lands in $OUT: quality-*.json / .log / .png, eval-*.json.
# Usage: bash exp/quality_check.sh [steps] [config]      (defaults: 1000, configs/small.toml)
# configs/small-mix.toml needs ../shared/data/ru-docs (or QUALITY_SET='--set ...' pointing at it).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gmtier-out}; mkdir -p "$OUT"
STEPS=${1:-1000}
CONFIG=${2:-configs/small.toml}
NAME=$(basename "$CONFIG" .toml)
WORK=${QUALITY_DIR:-/root/gmtier-quality}
mkdir -p data && { [ -d .carry/data ] && cp -rn .carry/data/* data/ 2>/dev/null || true; }
SET=(--set 'experts.mode="resident"')
[ -d .carry/ruslit ] && [ "$NAME" != small-mix ] && SET+=(--set "data.source=\"$PWD/.carry/ruslit\"")

echo "=== bench-quality $NAME vs $NAME-dense, $STEPS steps"
python3 -m gmtier.cli bench-quality --config "$CONFIG" "${SET[@]}" ${QUALITY_SET:-} --steps "$STEPS" \
  --eval-every $(( STEPS / 10 > 0 ? STEPS / 10 : 1 )) --dir "$WORK" --plot "$OUT/quality-$NAME.png" --keep --json \
  > "$OUT/quality-$NAME.json" 2> >(tee "$OUT/quality-$NAME.log" >&2)
python3 -c 'import json, sys; from gmtier.bench.quality import _report; print(_report(json.load(open(sys.argv[1]))))' \
  "$OUT/quality-$NAME.json"

echo "=== eval of the Switch run: the whole val split, then the choice files"
python3 -m gmtier.cli eval --run "$WORK/$NAME" --json | tee "$OUT/eval-$NAME-val.json"
SMOKE=benches/data/parus_format_smoke_ru.jsonl
python3 -m gmtier.cli eval --run "$WORK/$NAME" --choice "$SMOKE"
python3 -m gmtier.cli eval --run "$WORK/$NAME" --choice "$SMOKE" --json > "$OUT/eval-$NAME-smoke.json"
BIG="$WORK/smoke-x23.jsonl"
for _ in $(seq 23); do cat "$SMOKE"; done > "$BIG"
python3 -m gmtier.cli eval --run "$WORK/$NAME" --choice "$BIG" | tee "$OUT/eval-$NAME-506-items.txt"
