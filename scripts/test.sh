#!/usr/bin/env bash
# Every check strait has: formatting, clippy with warnings denied, the docs
# with warnings denied, and all tests (unit, property, transport over
# libfabric tcp and shm on loopback, two-process, strait-bench end to end),
# the C API's suite (scripts/test-c.sh: the C tests plainly, statically
# linked and under ASan/UBSan, and the C++ example), and one pass of each
# criterion bench; then builds the Python package with `pip install
# ./python` into python/.venv and runs its pytest suite.
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
echo "== C API: libstrait built, installed to a scratch prefix, C tests plain/static/sanitized, C++ example"
scripts/test-c.sh
echo "== criterion benches, once each (cargo bench --features test-backend measures them)"
cargo test --release --all-features --locked --benches -p strait
echo "== Python package: pip install ./python, then pytest"
[ -x python/.venv/bin/python ] || python3 -m venv python/.venv
python/.venv/bin/python -m pip install -q --upgrade pip 'maturin>=1.9,<2' 'numpy>=1.22' 'pytest>=7'
python/.venv/bin/python -m pip install -q ./python
# From the repository root, so that python/strait (the sources, without the
# built extension) does not shadow the installed package.
python/.venv/bin/python -m pytest -q -p no:cacheprovider python/tests
