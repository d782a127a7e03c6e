#!/usr/bin/env bash
# The main job on one machine: two engines over libfabric tcp on loopback
# write 16 MiB with an immediate and verify it. Pass `shm` for the shm
# provider. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo run --release --locked --example loopback_write -- "${1:-tcp}"
