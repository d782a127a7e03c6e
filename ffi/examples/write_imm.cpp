// strait from C++: two engines on loopback, one write with an immediate,
// the bytes checked. Shows that strait.h is C++-clean and how its handles
// sit in std::unique_ptr.
//
//   scripts/install-c.sh /tmp/strait
//   export PKG_CONFIG_PATH=/tmp/strait/lib/pkgconfig
//   c++ -std=c++17 ffi/examples/write_imm.cpp $(pkg-config --cflags --libs strait)
//       -Wl,-rpath,/tmp/strait/lib -o write_imm && ./write_imm

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "strait.h"

namespace {

void check(strait_status s, const char* what) {
    if (s != STRAIT_STATUS_OK) {
        throw std::runtime_error(std::string(what) + ": " + strait_status_name(s) + ": " + strait_last_error_message());
    }
}

template <typename T, strait_status (*Destroy)(T*)>
struct Deleter {
    void operator()(T* p) const { Destroy(p); }
};
using Engine = std::unique_ptr<strait_engine, Deleter<strait_engine, strait_engine_destroy>>;
using Region = std::unique_ptr<strait_mr, Deleter<strait_mr, strait_mr_destroy>>;
using Desc = std::unique_ptr<strait_desc, Deleter<strait_desc, strait_desc_destroy>>;
using TransferPtr = std::unique_ptr<strait_transfer, Deleter<strait_transfer, strait_transfer_destroy>>;
using Counter = std::unique_ptr<strait_imm_counter, Deleter<strait_imm_counter, strait_imm_counter_destroy>>;

Engine open_engine() {
    strait_builder* b = nullptr;
    check(strait_builder_create(&b), "builder");
    check(strait_builder_set_provider(b, STRAIT_PROVIDER_TCP), "provider");
    check(strait_builder_set_interface(b, "lo"), "interface");
    strait_engine* e = nullptr;
    strait_status s = strait_engine_create(b, &e);
    strait_builder_destroy(b);
    check(s, "engine");
    return Engine(e);
}

std::vector<uint8_t> descriptor_bytes(strait_mr* mr) {
    size_t len = 0;
    strait_mr_descriptor(mr, nullptr, 0, &len);  // asks for the size
    std::vector<uint8_t> bytes(len);
    check(strait_mr_descriptor(mr, bytes.data(), bytes.size(), &len), "descriptor");
    return bytes;
}

}  // namespace

int main() {
    try {
        Engine prefill = open_engine(), decode = open_engine();
        const uint64_t n = 1 << 20;

        strait_mr* raw = nullptr;
        check(strait_engine_alloc(decode.get(), n, STRAIT_ACCESS_REMOTE_WRITE, &raw), "alloc");
        Region dst(raw);
        check(strait_engine_alloc(prefill.get(), n, 0, &raw), "alloc");
        Region src(raw);
        void* p = nullptr;
        uint64_t len = 0;
        check(strait_mr_get(src.get(), &p, &len), "mr");
        auto* bytes = static_cast<uint8_t*>(p);
        for (uint64_t i = 0; i < n; i++) bytes[i] = static_cast<uint8_t>(i * 31 + 7);

        // The decoder's descriptor travels as bytes (here, in memory).
        std::vector<uint8_t> wire = descriptor_bytes(dst.get());
        strait_desc* d = nullptr;
        check(strait_desc_from_bytes(wire.data(), wire.size(), &d), "decode descriptor");
        Desc remote(d);

        strait_imm_counter* c = nullptr;
        check(strait_expect_imm(decode.get(), 42, 1, &c), "expect_imm");
        Counter arrived(c);
        const uint32_t imm = 42;
        strait_transfer* t = nullptr;
        check(strait_write(prefill.get(), src.get(), 0, remote.get(), 0, n, &imm, &t), "write");
        TransferPtr transfer(t);
        check(strait_transfer_wait(transfer.get(), 10000), "write completion");
        check(strait_imm_counter_wait(arrived.get(), 10000), "immediate");

        check(strait_mr_get(dst.get(), &p, &len), "mr");
        if (std::memcmp(p, bytes, n) != 0) throw std::runtime_error("the bytes differ");
        std::printf("C++: wrote %llu bytes with immediate %u; the decoder saw it and the bytes match\n",
                    static_cast<unsigned long long>(n), imm);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
