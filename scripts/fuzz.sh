#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ for a bounded time (default 60 s each;
# `scripts/fuzz.sh 600` for ten minutes). Needs nightly Rust (installed here
# with rustup if missing) and cargo-fuzz (installed with cargo if missing).
# Separate from scripts/test.sh, which runs the decoders' property tests on
# stable instead.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
# libFuzzer is C++.
dpkg -s g++ >/dev/null 2>&1 || { sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"; $sudo apt-get install -y -qq g++; }
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cd fuzz
for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target for ${seconds}s"
  # fuzz/seeds/TARGET (committed): valid encodings to start from;
  # fuzz/corpus/TARGET (ignored): what the fuzzer finds.
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
