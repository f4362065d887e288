#!/usr/bin/env bash
# bench-adam on the GPU machine (16 cores), for the lead. Everything it writes goes to $OUT.
#
# Prepare here (dev box, network), into the git-ignored wheels/ directory:
#   cd /work/main && rm -rf wheels && maturin build --release -o wheels/            # gmtier (abi3)
#   pip wheel --no-deps -w wheels/ deepspeed py-cpuinfo hjson psutil ninja msgpack einops   # optional
#     (deepspeed is an sdist on PyPI: `pip wheel` builds its py3-none-any wheel; torch, numpy,
#      pydantic, tqdm, packaging are already in the image)
# Run there:
#   run(command="bash exp/gpu_adam.sh", carry=["wheels"])      (or the wheels in .carry/: WHEELS=.carry)
# Knobs: PARAMS (default 256M: ~4-5 GB per workload), THREADS (16), REPEATS (7), SWEEP=0 to skip the
# sweep of gmtier's own options (threads x the kernel's store policy, stores=).
#
# DeepSpeed's CPUAdam JIT-builds with g++ (ninja) at first use; no network needed. DS_ACCELERATOR=cpu
# builds the CPU-only variant (the same SIMD kernel; the CUDA variant would need the CUDA toolkit
# headers/nvcc). A failed build is reported in the JSON (deepspeed_error), not fatal.
set -u
OUT=${OUT:-/tmp/gpu_adam_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_adam.log") 2>&1
PARAMS=${PARAMS:-256000000}
THREADS=${THREADS:-16}
REPEATS=${REPEATS:-7}
set -x
nproc; lscpu > "$OUT/lscpu.txt"; grep -m1 "model name" /proc/cpuinfo; free -g; uptime
python -c "import torch; print(torch.__version__, torch.get_num_threads())"

# the wheels: $WHEELS, else wheels/, else .carry/ (where exp/gpu_session.sh keeps its wheel)
WHEELS=${WHEELS:-$(ls -d wheels .carry 2>/dev/null | while read d; do ls "$d"/gmtier-*.whl >/dev/null 2>&1 && echo "$d" && break; done)}
pip install --no-index --no-deps --force-reinstall "$WHEELS"/gmtier-*.whl || { echo "no gmtier wheel in ${WHEELS:-wheels/ or .carry/}"; exit 1; }
if ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
  pip install --no-index --find-links "$WHEELS" deepspeed || echo "deepspeed install failed"
fi
python -c "import gmtier.adam as A; print('simd', A.simd_available())"

# correctness on this CPU (every SIMD path it has)
python -m pytest tests/test_adam.py -q -p no:cacheprovider 2>&1 | tail -5

export DS_ACCELERATOR=cpu
gmtier bench-adam --threads "$THREADS" --params "$PARAMS" --repeats "$REPEATS" --json > "$OUT/bench_adam_t${THREADS}.json"
cat "$OUT/bench_adam_t${THREADS}.json"
# the table too (second run: also shows the run-to-run spread), DeepSpeed already built
gmtier bench-adam --threads "$THREADS" --params "$PARAMS" --repeats "$REPEATS" | tee "$OUT/bench_adam_t${THREADS}.txt"

if [ "${SWEEP:-1}" = 1 ]; then
  # gmtier alone: threads x store policy
  T=$THREADS
  python exp/adam_sweep.py --params $((PARAMS / 2)) --repeats 5 --settings \
    $T:auto $T:none $T:half $T:all 8:none 8:half 4:none 4:half 1:none 1:half \
    | tee "$OUT/adam_sweep.jsonl"
fi
uptime
