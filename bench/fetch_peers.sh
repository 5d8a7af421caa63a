#!/usr/bin/env bash
# Download the pure-Python wheels of the benchmark peers that the GPU image lacks (Liger-Kernel,
# Cut Cross-Entropy; both need only torch and triton, which the image has) into bench/.carry/
# (git-ignored), here, where a package registry is reachable. The device machine has no network:
# name the folder in the device tool's `carry` and bench/gpu_bench.sh installs them from there
# (pip --no-index --target, put on PYTHONPATH). ~1 MB.
#
#   bash bench/fetch_peers.sh            # then: run(carry=["bench/.carry"], command="bash bench/gpu_bench.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/.carry/wheels
rm -rf "$DEST" && mkdir -p "$DEST"
PY=${PYTHON:-python3}
# pure-Python only (py3-none-any), for the image's Python 3.12; their requirements beyond torch
# and triton are extras, which are not needed for the loss functions benchmarked here
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$DEST" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" 2>&1 | grep -v "^WARNING: Location" || true
ls -la "$DEST"
for w in "$DEST"/*.whl; do
  case $w in *-py3-none-any.whl) ;; *) echo "not a pure-Python wheel: $w"; exit 1 ;; esac
done
echo "fetched $(ls "$DEST" | wc -l) wheels into $DEST"
