# Sourced by the exp/ scripts that run on the GPU machine with one carried wheel: the output
# folder, the corpus for the tests (../shared, or GMTIER_RUSLIT carried as .carry/ruslit), the
# wheel installed, the prepared data copied to data/, and the machine named in $OUT/gpu.txt.
export PYTHONUNBUFFERED=1
[ -d .carry/ruslit ] && export GMTIER_RUSLIT=${GMTIER_RUSLIT:-$PWD/.carry/ruslit}
OUT=${OUT:-/tmp/gmtier-out}; mkdir -p "$OUT"
python3 -m pip install --no-deps --force-reinstall -q .carry/*.whl 2>&1 | grep -v WARNING
mkdir -p data && cp -rn .carry/data/* data/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BENCH=${BENCH_DIR:-/root/gmtier-bench}
