#!/usr/bin/env bash
# The main job on one machine: `strait-bench loopback`, a server and a
# client process on this machine over libfabric tcp on the loopback
# interface, every workload with the raw-libfabric and kernel-TCP baselines
# in the same run. Installs what it needs. Arguments go to strait-bench,
# e.g. `scripts/loopback.sh --provider shm` or `--nics 2 --plot bw.svg`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p strait-bench
exec target/release/strait-bench loopback "$@"
