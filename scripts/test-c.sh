#!/usr/bin/env bash
# The C API's checks: libstrait is built and installed into a scratch prefix
# (scripts/install-c.sh), links nothing of libfabric, libibverbs or CUDA,
# and the C test suite (ffi/tests/test_strait.c, plain C11 against the
# installed strait.h, built with pkg-config) runs on tcp and shm: plainly,
# linked statically, and built with -fsanitize=address,undefined. Then the
# C++ example builds with warnings as errors and runs. The header's
# freshness is checked by `cargo test` (ffi/tests/header.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

scripts/install-c.sh "$prefix" >/dev/null
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"

echo "-- libstrait.so: soname and dependencies"
readelf -d "$prefix/lib/libstrait.so" | grep -E "SONAME|NEEDED"
if readelf -d "$prefix/lib/libstrait.so" | grep NEEDED | grep -E -i "fabric|ibverbs|cuda"; then
    echo "libstrait.so links a transport or CUDA library" >&2
    exit 1
fi

cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -g)
cc "${cflags[@]}" ffi/tests/test_strait.c $(pkg-config --cflags --libs strait) -lpthread \
    -Wl,-rpath,"$prefix/lib" -o "$work/test_strait"
cc "${cflags[@]}" ffi/tests/test_strait.c $(pkg-config --cflags strait) "$prefix/lib/libstrait.a" \
    $(pkg-config --static --libs-only-l strait | sed 's/-lstrait//') -o "$work/test_strait_static"
cc "${cflags[@]}" -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
    ffi/tests/test_strait.c $(pkg-config --cflags --libs strait) -lpthread -Wl,-rpath,"$prefix/lib" \
    -o "$work/test_strait_asan"
if ldd "$work/test_strait_static" | grep -q libstrait; then
    echo "the static build still links libstrait.so" >&2
    exit 1
fi

for provider in tcp shm; do
    echo "-- C tests, $provider"
    "$work/test_strait" "$provider"
    echo "-- C tests, $provider, static"
    "$work/test_strait_static" "$provider"
    echo "-- C tests, $provider, AddressSanitizer and UndefinedBehaviorSanitizer"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$work/test_strait_asan" "$provider"
done

echo "-- the README's C example"
awk '/^## C and C\+\+/{on=1} on && /^```c$/{code=1; next} code && /^```$/{exit} code' README.md > "$work/readme.c"
[ -s "$work/readme.c" ] || { echo "no C example found in README.md" >&2; exit 1; }
cc -std=c11 -Wall -Wextra -Werror "$work/readme.c" $(pkg-config --cflags --libs strait) -Wl,-rpath,"$prefix/lib" \
    -o "$work/readme"
"$work/readme" && echo "README example: ok"

echo "-- C++ example"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic ffi/examples/write_imm.cpp $(pkg-config --cflags --libs strait) \
    -Wl,-rpath,"$prefix/lib" -o "$work/write_imm"
"$work/write_imm"
