# Sourced (from the repo root, on the GPU machine) before benches/peer_deepspeed.py: DeepSpeed and
# its missing dependencies installed from the carried wheels, libaio put on the compiler's and
# the loader's paths, and DeepSpeed's ops (cpu_adam, async_io with pin_memory) built just in
# time with the machine's nvcc, printing the seconds each took.
#   . exp/peer_setup.sh
# The carry folder is .carry/ds (README there): wheels/*.whl (deepspeed built with DS_BUILD_OPS=0,
# pydantic, hjson, ...), libaio/{include,lib} (Debian's libaio1 + libaio-dev, unpacked), and,
# where an earlier call brought it back, torch_ext/ (the built ops: a later call skips the build).
# The ops are built into $OUT/torch_ext, so they come back with the call's output.
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
for pair in hjson:hjson pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types \
            typing_inspection:typing_inspection tqdm:tqdm setuptools:setuptools msgpack:msgpack einops:einops \
            cpuinfo:py_cpuinfo psutil:psutil ninja:ninja; do
  mod=${pair%%:*}; whl=${pair##*:}
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    found=$(ls "$CARRY"/wheels/${whl}-*.whl 2>/dev/null | head -1)
    if [ -n "$found" ]; then need+=("$found"); else echo "peer_setup: $mod is missing and no wheel of it is carried" >&2; fi
  fi
done
# typing_extensions: pydantic 2.1x wants a recent one; carried only where the box's is older.
"$PY" -c "import typing_extensions as t; t.TypeIs; t.deprecated" 2>/dev/null || need+=("$CARRY"/wheels/typing_extensions-*.whl)
"$PY" -m pip install -q --no-deps --no-index --target "$DS_SITE" --upgrade "${need[@]}" 2>&1 | grep -v -i warning
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DS_SITE"
export PATH="$DS_SITE/bin:$PATH"  # ninja, if it came from the carried wheel
echo "peer_setup: installed $(basename -a "${need[@]}" | tr '\n' ' ')in $(( $(date +%s) - t0 )) s"

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
  nvcc_path=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
fi
export PATH="$CUDA_HOME/bin:$PATH"
[ -d "$CUDA_HOME/lib64/stubs" ] && export LIBRARY_PATH="$LIBRARY_PATH:$CUDA_HOME/lib64/stubs"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} DS_SKIP_CUDA_CHECK=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # the H200 (sm_90)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_EXTENSIONS_DIR="$OUT/torch_ext"
if [ -d "$CARRY/torch_ext" ] && [ ! -d "$TORCH_EXTENSIONS_DIR" ]; then
  cp -r "$CARRY/torch_ext" "$TORCH_EXTENSIONS_DIR"   # built by an earlier call: ninja finds it up to date
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
echo "peer_setup: CUDA_HOME=$CUDA_HOME nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*'), free disk $(df -BG --output=avail /tmp | tail -1 | tr -d ' ') under /tmp"

# The ops, each built (or found built) once here rather than inside the first timed mode.
"$PY" - <<'EOF' 2>&1 | tee "$OUT/peer_setup_ops.txt"
import time, traceback
import setuptools  # distutils for DeepSpeed's libaio probe on Python 3.12
import deepspeed
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
print(f"deepspeed {deepspeed.__version__}")
for builder in (CPUAdamBuilder, AsyncIOBuilder):
    t0 = time.perf_counter()
    try:
        b = builder()
        if not b.is_compatible(verbose=True):
            print(f"{b.NAME}: not compatible here: {b.error_log}")
            continue
        b.load(verbose=False)
        print(f"{b.NAME}: ready in {time.perf_counter() - t0:.1f} s")
    except Exception:
        traceback.print_exc()
        print(f"{builder.NAME}: FAILED after {time.perf_counter() - t0:.1f} s")
EOF
echo "peer_setup: done in $(( $(date +%s) - t0 )) s"
