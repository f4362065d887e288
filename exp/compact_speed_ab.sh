#!/usr/bin/env bash
# The compact AdamW of two builds alternating in one GPU-machine call: the wheel in .carry/old
# against this checkout's Python over the wheel in .carry/ (exp/compact_speed.py, $ROUNDS rounds,
# default 3); JSON lines under $OUT/compact-speed.txt.
set -uo pipefail
. exp/gpu_setup.sh
cp "$(python3 -c 'import gmtier, os; print(os.path.dirname(gmtier.__file__))')"/_core*.so python/gmtier/
rm -rf /tmp/site_old && python3 -m pip install -q --no-deps --no-index --target /tmp/site_old .carry/old/*.whl 2>&1 | grep -v WARN
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/compact-speed.txt"
for r in $(seq "${ROUNDS:-3}"); do
  for build in old new; do
    [ $build = old ] && path=/tmp/site_old || path=$PWD/python
    echo "$build $(PYTHONPATH=$path python3 exp/compact_speed.py --threads 16)" | tee -a "$OUT/compact-speed.txt"
  done
done
