#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and no network access
# (the project's lent H200 machine; see DEVELOPERS.md and the README's
# "GPU memory").
#
#   scripts/device-check.sh prepare   # here: build what the check runs into .device/
#   scripts/device-check.sh           # there, from the checkout's root: run it
#
# `prepare` builds the GPU test binary (tests/gpu.rs), the measurements
# (examples/device_check.rs), strait-bench and the Python wheel in release
# mode, strips them, and copies them with this machine's libfabric and the
# libraries it loads into .device/ (ignored by git: pass `.device` to the
# device tool's `carry`). The run needs no Rust, no libfabric and no
# network there: CUDA's driver, Python with torch and pytest. It prints
# what ran, what was checked, and the figures with their same-run
# baselines; it takes a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  set -e
  if [ ! -x python/.venv/bin/maturin ]; then
    echo "device-check prepare: python/.venv has no maturin: run scripts/test.sh once first (it makes the venv)" >&2
    exit 1
  fi
  rm -rf .device
  mkdir -p .device/lib
  grep -qxF '/.device/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.device/' >> .git/info/exclude; }
  cargo build --release --locked -p strait-bench
  cargo build --release --locked -p strait --example device_check
  # The GPU test binary: cargo names it in its JSON messages.
  bin=$(cargo test --release --locked --test gpu --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
  cp "$bin" .device/gpu-tests
  cp target/release/strait-bench target/release/examples/device_check .device/
  strip .device/gpu-tests .device/strait-bench .device/device_check
  (cd python && ../python/.venv/bin/maturin build --release --locked --quiet --out ../.device)
  # libfabric and what it loads (its providers are built in on Debian).
  fabric=$(ldconfig -p | awk '/libfabric\.so\.1 /{print $NF; exit}')
  cp -L "$fabric" .device/lib/libfabric.so.1
  ldd "$fabric" | awk '/=> \//{print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
    | while read -r lib; do cp -L "$lib" .device/lib/; done
  du -sh .device
  ls -l .device .device/lib
  exit 0
fi

status=0
step() { echo; echo "== $*"; }
run() { echo "\$ $*"; "$@" || { echo "FAILED (rc $?): $*"; status=1; }; }

step "machine"
ldd --version | head -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
python3 --version
if [ ! -d .device ]; then
  echo "no .device/: run 'scripts/device-check.sh prepare' on the build machine and carry .device" >&2
  exit 2
fi
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export STRAIT_LIBFABRIC="$PWD/.device/lib/libfabric.so.1"

step "strait-bench info (CUDA, libfabric providers, GPU -> NIC map)"
run timeout 60 .device/strait-bench info

step "GPU tests (tests/gpu.rs): GPU-to-GPU write with immediate over tcp, paged write between GPU caches, read, host<->GPU, stream wait on a counter (and in a captured graph), stream-written trigger starting a transfer, two processes"
run timeout 240 .device/gpu-tests --test-threads=1 --nocapture

step "measurements (examples/device_check.rs): staged throughput vs host-to-host and cuMemcpy, counter->stream and trigger->post latency"
run timeout 240 .device/device_check --repeat 5

step "Python: CUDA torch tensors registered, torch stream waits, stream-fired trigger (python/tests/test_gpu.py)"
rm -rf /tmp/strait-site
if python3 -m pip install -q --no-index --no-deps --target /tmp/strait-site .device/strait-*.whl; then
  tests="$PWD/python/tests/test_gpu.py"
  echo "\$ (cd /tmp && PYTHONPATH=/tmp/strait-site python3 -m pytest -q -rs $tests)"
  (cd /tmp && PYTHONPATH=/tmp/strait-site timeout 180 python3 -m pytest -q -p no:cacheprovider -rs "$tests") \
    || { echo "FAILED: the Python GPU tests"; status=1; }
else
  echo "FAILED: installing the wheel"; status=1
fi

step "done: status $status"
exit $status
