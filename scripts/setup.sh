#!/usr/bin/env bash
# Installs what strait needs on a Debian/Ubuntu machine: libfabric (runtime
# library and fi_info), libibverbs with the device providers (the verbs
# backend; libfabric1 depends on them too), C and C++ compilers (the
# linker for Rust, and the C API's tests), Python 3 with venv (for the
# Python package and its tests), and, when no `cargo` is found, the Rust
# toolchain through rustup (with rustfmt and clippy).
# Safe to run repeatedly: it installs only what is missing.
set -euo pipefail

# g++, pkg-config and binutils (readelf) build and check the C API's tests
# and C++ example; gcc brings the address and undefined-behaviour
# sanitizers' runtimes. iproute2 (ip, tc) and iptables build the emulated cluster
# (scripts/cluster/netns.sh; its tests run as root).
packages=(libfabric1 libfabric-bin libibverbs1 ibverbs-providers gcc g++ libc6-dev pkg-config binutils iproute2 iptables)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Any Python 3.9+ with venv and ensurepip will do (pyenv, conda, the
# system's); install Debian's only when there is none.
if ! python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 9)' >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  echo "setup: no cargo found; installing Rust (stable, minimal profile) with rustup"
  if ! command -v curl >/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq curl ca-certificates
  fi
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --component rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null && rustup component add "$component"
  fi
done
