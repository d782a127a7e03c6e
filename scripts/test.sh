#!/usr/bin/env bash
# Every check strait has: formatting, clippy with warnings denied, the docs
# with warnings denied, and all tests (unit, property, transport over
# libfabric tcp and shm on loopback, two-process, strait-bench end to end),
# the C API's suite (scripts/test-c.sh: the C tests plainly, statically
# linked and under ASan/UBSan, and the C++ example), and one pass of each
# criterion bench; then builds the Python wheel with maturin, installs it
# into python/.venv (made from python/requirements-test.txt, torch
# included, and kept while that file is unchanged) and runs the pytest
# suite, its torch tier and a fresh-venv install of the wheel included.
# Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked
echo "== cargo test"
cargo test --workspace --release --all-features --locked
echo "== examples/prometheus_endpoint: one scrape of a live engine's metrics"
cargo run --release --all-features --locked --example prometheus_endpoint -- --once | grep -c "^strait_" | sed 's/$/ metric lines served/'
echo "== C API: libstrait built, installed to a scratch prefix, C tests plain/static/sanitized, C++ example"
scripts/test-c.sh
echo "== criterion benches, once each (cargo bench --features test-backend measures them)"
cargo test --release --all-features --locked --benches -p strait
echo "== Python package: the wheel (maturin build), installed into python/.venv with the test requirements (torch too), then pytest"
venv=python/.venv
requirements=python/requirements-test.txt
stamp="$venv/.requirements"
want="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 --version 2>&1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "   (re)creating $venv from $requirements: the first time downloads torch, ~3 GB"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if ! "$venv/bin/python" -m pip install -q -r "$requirements"; then
    echo "test: installing $requirements failed; the torch tier cannot run (torch 2.9 needs Python >= 3.10, ~7 GB of disk, and PyPI)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
rm -rf target/wheels
(cd python && "../$venv/bin/maturin" build --release --locked --quiet --out ../target/wheels)
wheel="$(ls target/wheels/strait-*.whl)"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
# From the repository root, so that python/strait (the sources, without the
# built extension) does not shadow the installed package.
STRAIT_WHEEL="$PWD/$wheel" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs python/tests
