#!/usr/bin/env bash
# Builds and installs strait's C library: libstrait.so (soname
# libstrait.so.0) and libstrait.a into PREFIX/lib, strait.h into
# PREFIX/include and strait.pc into PREFIX/lib/pkgconfig, so that
#   cc app.c $(pkg-config --cflags --libs strait)
# works. A plain script over `cargo build` (not cargo-c).
#
# Usage: scripts/install-c.sh [PREFIX]      (default /usr/local)
# For a PREFIX outside the linker's search path, add PREFIX/lib/pkgconfig to
# PKG_CONFIG_PATH, and PREFIX/lib to LD_LIBRARY_PATH (or link with
# -Wl,-rpath,PREFIX/lib). Under /usr/local, run ldconfig after.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked -p strait-ffi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' ffi/Cargo.toml | head -1)"
major="${version%%.*}"
# What a static link needs besides libstrait.a (rustc's native-static-libs
# for this target, on Linux with glibc).
private="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0644 ffi/include/strait.h "$prefix/include/strait.h"
install -m 0755 target/release/libstrait.so "$prefix/lib/libstrait.so.$version"
ln -sf "libstrait.so.$version" "$prefix/lib/libstrait.so.$major"
ln -sf "libstrait.so.$major" "$prefix/lib/libstrait.so"
install -m 0644 target/release/libstrait.a "$prefix/lib/libstrait.a"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@PRIVATE@|$private|" ffi/strait.pc.in \
    > "$prefix/lib/pkgconfig/strait.pc"
echo "installed libstrait $version into $prefix"
