#!/usr/bin/env bash
# Makes .carry/ds, what exp/peer_setup.sh installs on the GPU machine (which has no network), on a
# dev box with network (Debian/Ubuntu, apt-get, pip). About 7 MB:
#   wheels/  DeepSpeed 0.19.8 as a pure-Python wheel (DS_BUILD_OPS=0: its ops are built just in time
#            on the GPU box with its nvcc) and its dependencies for CPython 3.12 manylinux x86_64
#   libaio/  include/libaio.h and lib/libaio.so* (Debian's libaio1 + libaio-dev unpacked), for
#            DeepSpeed's async_io op (ZeRO-Infinity's NVMe swapper)
#   debs/    the two .deb files as downloaded
# Usage: bash exp/peer_carry.sh [dest]   (default .carry/ds)
set -euo pipefail
DEST=$(realpath -m "${1:-.carry/ds}")
DS_VERSION=${DS_VERSION:-0.19.8}
mkdir -p "$DEST/wheels" "$DEST/debs" "$DEST/libaio/include" "$DEST/libaio/lib"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
pip download -q "deepspeed==$DS_VERSION" --no-deps --no-binary :all: -d .
tar xzf deepspeed-"$DS_VERSION".tar.gz
DS_BUILD_OPS=0 pip wheel -q ./deepspeed-"$DS_VERSION" --no-deps --no-build-isolation -w "$DEST/wheels"
pip download -q --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --only-binary=:all: -d "$DEST/wheels" pydantic hjson tqdm msgpack einops py-cpuinfo psutil ninja
pip download -q --python-version 3.12 --only-binary=:all: --no-deps -d "$DEST/wheels" setuptools
(cd "$DEST/debs" && apt-get download libaio1 libaio-dev)
for deb in "$DEST"/debs/*.deb; do dpkg -x "$deb" root; done
cp root/usr/include/libaio.h "$DEST/libaio/include/"
# plain copies, not links: links may not travel
for f in $(find root -name 'libaio.so*'); do cp -L "$f" "$DEST/libaio/lib/$(basename "$f")"; done
du -sh "$DEST"
