# Sourced (from the repo root, on the GPU machine) before benches/peer_deepspeed.py: DeepSpeed and
# its missing dependencies installed from the carried wheels, libaio put on the compiler's and
# the loader's paths, and DeepSpeed's ops (cpu_adam, async_io with pin_memory) built just in
# time with the machine's nvcc, printing the seconds each took.
#   . exp/peer_setup.sh
# The carry folder is .carry/ds (made by exp/peer_carry.sh): wheels/*.whl (deepspeed built with DS_BUILD_OPS=0,
# pydantic, hjson, ...), libaio/{include,lib} (Debian's libaio1 + libaio-dev, unpacked), and,
# where an earlier call brought it back, torch_ext/ (the built ops: a later call skips the build).
# The ops are built in /tmp/torch_ext; a copy without debug info goes to $OUT/torch_ext.
# DeepSpeed is not a dependency of gmtier: nothing here touches the gmtier install.
CARRY=${PEER_CARRY:-$PWD/.carry/ds}
OUT=${OUT:-/tmp/gmtier-out}; mkdir -p "$OUT"
if [ ! -d "$CARRY/wheels" ]; then
  echo "peer_setup: no $CARRY/wheels (carry the folder described in its README as .carry/ds)" >&2
  return 1 2>/dev/null || exit 1
fi
PY=${PY:-python3}
t0=$(date +%s)
# DeepSpeed and whichever of its dependencies this Python lacks, into a folder of their own.
DS_SITE=${DS_SITE:-/tmp/ds_site}
mkdir -p "$DS_SITE"
need=("$CARRY"/wheels/deepspeed-*.whl)
# pydantic 2 comes with its own core and helpers (a pydantic 1 on the box is shadowed by them).
if ! "$PY" -c "import pydantic, sys; sys.exit(int(pydantic.VERSION.split('.')[0]) < 2)" 2>/dev/null; then
  need+=("$CARRY"/wheels/pydantic-*.whl "$CARRY"/wheels/pydantic_core-*.whl "$CARRY"/wheels/annotated_types-*.whl \
         "$CARRY"/wheels/typing_inspection-*.whl)
fi
for pair in hjson:hjson tqdm:tqdm setuptools:setuptools msgpack:msgpack einops:einops \
            cpuinfo:py_cpuinfo psutil:psutil ninja:ninja; do
  mod=${pair%%:*}; whl=${pair##*:}
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    found=$(ls "$CARRY"/wheels/${whl}-*.whl 2>/dev/null | head -1)
    if [ -n "$found" ]; then need+=("$found"); else echo "peer_setup: $mod is missing and no wheel of it is carried" >&2; fi
  fi
done
# typing_extensions: pydantic 2.1x wants a recent one; carried only where the box's is older.
"$PY" -c "import typing_extensions as t; t.TypeIs; t.deprecated" 2>/dev/null || need+=("$CARRY"/wheels/typing_extensions-*.whl)
if "$PY" -m pip install -q --no-deps --no-index --target "$DS_SITE" --upgrade "${need[@]}" > "$OUT/peer_setup_pip.txt" 2>&1; then
  echo "peer_setup: installed $(basename -a "${need[@]}" | tr '\n' ' ')in $(( $(date +%s) - t0 )) s"
else
  echo "peer_setup: pip install FAILED ($OUT/peer_setup_pip.txt):" >&2; grep -v -i warning "$OUT/peer_setup_pip.txt" >&2
  return 1 2>/dev/null || exit 1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DS_SITE"
export PATH="$DS_SITE/bin:$PATH"  # ninja, if it came from the carried wheel

# libaio: headers and libaio.so for the build (CPATH, LIBRARY_PATH; CFLAGS/LDFLAGS for
# DeepSpeed's own io_submit probe), libaio.so.1 for the loader (LD_LIBRARY_PATH).
AIO=$CARRY/libaio
[ -e "$AIO/lib/libaio.so" ] || ln -sf libaio.so.1.0.2 "$AIO/lib/libaio.so"
[ -e "$AIO/lib/libaio.so.1" ] || ln -sf libaio.so.1.0.2 "$AIO/lib/libaio.so.1"
export CPATH="$AIO/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$AIO/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$AIO/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CFLAGS="-I$AIO/include ${CFLAGS:-}" LDFLAGS="-L$AIO/lib ${LDFLAGS:-}"

# CUDA for the JIT build: the nvcc on PATH (or /usr/local/cuda); async_io links -lcuda, which
# only the stubs provide where the driver's libcuda.so has no unversioned link.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
  if [ -n "$nvcc_path" ]; then export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
  else echo "peer_setup: no nvcc on PATH or in /usr/local/cuda: set CUDA_HOME" >&2; fi
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
  [ -d "$CUDA_HOME/lib64/stubs" ] && export LIBRARY_PATH="$LIBRARY_PATH:$CUDA_HOME/lib64/stubs"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} DS_SKIP_CUDA_CHECK=1
# The H200 (sm_90). Set over the box's own TORCH_CUDA_ARCH_LIST: DeepSpeed 0.19.8's JIT builder
# cannot parse an arch such as "9.0a" (ValueError: invalid literal for int() ... '0a').
export TORCH_CUDA_ARCH_LIST=${PEER_CUDA_ARCH:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The ops build in /tmp/torch_ext. ninja decides what is up to date by times: the sources just
# installed are dated back, and a carried build (.carry/ds/torch_ext, copied with its own
# times) is then found up to date where its compile commands match (same paths, same CUDA).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
find "$DS_SITE/deepspeed/ops" -type f -exec touch -h -d "2000-01-01" {} +
reused=0
if [ -d "$CARRY/torch_ext" ] && [ ! -d "$TORCH_EXTENSIONS_DIR" ]; then
  cp -rp "$CARRY/torch_ext" "$TORCH_EXTENSIONS_DIR"; reused=1
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete  # a call killed mid-build: torch 2.11 would wait on it forever
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
echo "peer_setup: CUDA_HOME=${CUDA_HOME:-} nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*'), free disk $(df -BG --output=avail /tmp | tail -1 | tr -d ' ') under /tmp"

# The ops, built (or found built) here rather than inside the first timed mode, in parallel:
# cpu_adam has two large sources (-O3 -g), async_io and pin_memory a dozen small ones.
build_op() {
  "$PY" - "$1" <<'EOF'
import sys, time, traceback
import setuptools  # noqa: F401  (distutils, for DeepSpeed's libaio probe on Python 3.12)
from deepspeed.ops import op_builder
name = sys.argv[1]
t0 = time.perf_counter()
try:
    b = getattr(op_builder, name)()
    if not b.is_compatible(verbose=True):
        print(f"{b.NAME}: not compatible here: {b.error_log}")
    else:
        b.load(verbose=False)
        print(f"{b.NAME}: ready in {time.perf_counter() - t0:.1f} s")
except Exception:
    traceback.print_exc()
    print(f"{name}: FAILED after {time.perf_counter() - t0:.1f} s")
EOF
}
build_ops() {
  build_op CPUAdamBuilder > "$OUT/peer_setup_cpu_adam.txt" 2>&1 &
  build_op AsyncIOBuilder > "$OUT/peer_setup_async_io.txt" 2>&1
  wait
}
build_ops
if [ "$reused" = 1 ] && grep -q FAILED "$OUT/peer_setup_cpu_adam.txt" "$OUT/peer_setup_async_io.txt"; then
  echo "peer_setup: the carried build did not load; building afresh"
  rm -rf "$TORCH_EXTENSIONS_DIR"; build_ops
fi
tail -n 3 "$OUT/peer_setup_cpu_adam.txt" "$OUT/peer_setup_async_io.txt"
# A copy to carry back (.carry/ds/torch_ext, a few MB): the libraries without debug info
# (cpu_adam is built with -g, ~50 MB), the object files emptied (~30 MB; only their times
# matter: ninja compares them with its records and finds the libraries up to date), every
# file's time kept. Should ninja still rebuild a part, the link fails and the build above
# starts afresh.
rm -rf "$OUT/torch_ext"
[ -d "$TORCH_EXTENSIONS_DIR" ] && cp -rp "$TORCH_EXTENSIONS_DIR" "$OUT/torch_ext" && {
find "$OUT/torch_ext" -type f -name "*.so" | while read -r f; do
  strip --strip-debug "$f" -o "$f.tmp" && touch -r "$f" "$f.tmp" && mv "$f.tmp" "$f"
done
find "$OUT/torch_ext" -type f -name "*.o" | while read -r f; do
  touch -r "$f" "$f.time" && : > "$f" && touch -r "$f.time" "$f" && rm "$f.time"
done
find "$OUT/torch_ext" \( -name lock -o -name "*.o.d" \) -delete
}
echo "peer_setup: done in $(( $(date +%s) - t0 )) s; ops to carry back: $OUT/torch_ext ($(du -sh "$OUT/torch_ext" 2>/dev/null | cut -f1))"
