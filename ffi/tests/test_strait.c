/*
 * The C API's test suite: two engines over libfabric tcp on loopback, every
 * kind of request byte-checked, callbacks, KV and MoE, stats, and the error
 * paths. Plain C11 against include/strait.h and libstrait; scripts/test-c.sh
 * builds and runs it plainly and under -fsanitize=address,undefined.
 *
 * Usage: test_strait [provider]   (tcp, the default, or shm)
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "strait.h"

static int checks = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        checks++;                                                                       \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);    \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                        \
    do {                                                                                \
        checks++;                                                                       \
        enum strait_status s_ = (call);                                                 \
        if (s_ != STRAIT_STATUS_OK) {                                                   \
            fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,   \
                    strait_status_name(s_), strait_last_error_message());               \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* A call that must fail with `want`, with a message. */
#define FAILS(want, call)                                                               \
    do {                                                                                \
        checks++;                                                                       \
        enum strait_status s_ = (call);                                                 \
        if (s_ != (want)) {                                                             \
            fprintf(stderr, "%s:%d: %s returned %s, not %s (%s)\n", __FILE__, __LINE__, \
                    #call, strait_status_name(s_), strait_status_name(want),            \
                    strait_last_error_message());                                       \
            exit(1);                                                                    \
        }                                                                               \
        CHECK(strlen(strait_last_error_message()) > 0);                                 \
    } while (0)

static const uint64_t TIMEOUT_MS = 10000;
static uint32_t provider = STRAIT_PROVIDER_TCP;

static void fill(uint8_t *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u | 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)x;
    }
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static strait_engine *engine(void) {
    strait_builder *b = NULL;
    strait_engine *e = NULL;
    OK(strait_builder_create(&b));
    OK(strait_builder_set_provider(b, provider));
    OK(strait_builder_set_interface(b, "lo"));
    OK(strait_builder_set_request_timeout_ms(b, 5000));
    OK(strait_engine_create(b, &e));
    OK(strait_builder_destroy(b));
    CHECK(e != NULL);
    return e;
}

static uint8_t *mr_bytes(strait_mr *mr, uint64_t *len) {
    void *p = NULL;
    uint64_t n = 0;
    OK(strait_mr_get(mr, &p, &n));
    if (len) *len = n;
    return p;
}

/* The descriptor of `mr` as the peer gets it: through its bytes. */
static strait_desc *remote(strait_mr *mr) {
    uint8_t buf[1024];
    size_t len = 0;
    strait_desc *d = NULL;
    FAILS(STRAIT_STATUS_BUFFER_TOO_SMALL, strait_mr_descriptor(mr, NULL, 0, &len));
    CHECK(len > 0 && len <= sizeof buf);
    OK(strait_mr_descriptor(mr, buf, sizeof buf, &len));
    OK(strait_desc_from_bytes(buf, len, &d));
    return d;
}

static strait_address *address_of(strait_engine *e) {
    uint8_t buf[1024];
    size_t len = 0;
    strait_address *a = NULL;
    OK(strait_engine_address(e, buf, sizeof buf, &len));
    OK(strait_address_from_bytes(buf, len, &a));
    return a;
}

static void wait_ok(strait_transfer *t) {
    OK(strait_transfer_wait(t, TIMEOUT_MS));
    OK(strait_transfer_poll(t));
    OK(strait_transfer_destroy(t));
}

/* ---- Callbacks ---------------------------------------------------------- */

struct done {
    atomic_int calls;
    atomic_int status;
};

static void on_done(enum strait_status status, const char *message, void *user) {
    struct done *d = user;
    CHECK((status == STRAIT_STATUS_OK) == (message == NULL));
    atomic_store(&d->status, (int)status);
    atomic_fetch_add(&d->calls, 1);
}

static void on_imm(uint32_t imm, void *user) {
    atomic_store((atomic_int *)user, (int)imm);
}

static void wait_calls(atomic_int *calls, int want) {
    for (int i = 0; i < 1000 && atomic_load(calls) < want; i++) sleep_ms(10);
    CHECK(atomic_load(calls) == want);
}

/* ---- Tests -------------------------------------------------------------- */

static void test_write_imm(strait_engine *a, strait_engine *b) {
    const uint64_t n = 1 << 20;
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_alloc(a, n, 0, &src));
    OK(strait_engine_alloc(b, n, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    uint8_t *s = mr_bytes(src, NULL), *d = mr_bytes(dst, NULL);
    fill(s, n, 1);
    strait_desc *rd = remote(dst);
    uint64_t rlen = 0;
    OK(strait_desc_len(rd, &rlen));
    CHECK(rlen == n);

    strait_imm_counter *c = NULL;
    OK(strait_expect_imm(b, 7, 1, &c));
    CHECK(strait_imm_counter_poll(c) == STRAIT_STATUS_PENDING);
    FAILS(STRAIT_STATUS_TIMEOUT, strait_imm_counter_wait(c, 1));

    strait_transfer *t = NULL;
    uint32_t imm = 7;
    OK(strait_write(a, src, 0, rd, 0, n, &imm, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(c, TIMEOUT_MS));
    OK(strait_imm_counter_poll(c));
    CHECK(memcmp(s, d, n) == 0);

    /* A write at offsets, no immediate. */
    fill(s, n, 2);
    OK(strait_write(a, src, 4096, rd, 8192, 65536, NULL, &t));
    wait_ok(t);
    CHECK(memcmp(s + 4096, d + 8192, 65536) == 0);

    /* Immediate-only writes, and a re-armed counter. */
    OK(strait_imm_counter_rearm(c, 2));
    uint64_t seen = 99;
    OK(strait_imm_counter_seen(c, &seen));
    CHECK(seen == 0);
    OK(strait_write_imm(a, rd, 7, &t));
    wait_ok(t);
    OK(strait_write_imm(a, rd, 7, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(c, TIMEOUT_MS));
    OK(strait_imm_counter_seen(c, &seen));
    CHECK(seen == 2);

    /* Cancel wakes waiters with CANCELLED. */
    strait_imm_counter *never = NULL;
    OK(strait_expect_imm(b, 8, 1, &never));
    OK(strait_imm_counter_cancel(never));
    FAILS(STRAIT_STATUS_CANCELLED, strait_imm_counter_wait(never, TIMEOUT_MS));
    FAILS(STRAIT_STATUS_CANCELLED, strait_imm_counter_poll(never));
    OK(strait_imm_counter_destroy(never));

    /* Reserved immediates are refused; a user slot gives one. */
    strait_imm_counter *bad = (strait_imm_counter *)1;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_expect_imm(b, STRAIT_RESERVED_IMM_BASE, 1, &bad));
    CHECK(bad == NULL);
    strait_imm_slot *slot = NULL;
    strait_imm_counter *sc = NULL;
    uint32_t value = 0;
    OK(strait_imm_slot_create(b, 1, &slot));
    OK(strait_imm_slot_value(slot, 3, &value));
    CHECK(value >= STRAIT_RESERVED_IMM_BASE);
    OK(strait_imm_slot_expect(slot, 3, 1, &sc));
    OK(strait_write_imm(a, rd, value, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(sc, TIMEOUT_MS));
    OK(strait_imm_counter_destroy(sc));
    OK(strait_imm_slot_destroy(slot));

    OK(strait_imm_counter_destroy(c));
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dst));
}

static void test_register(strait_engine *a, strait_engine *b) {
    /* Memory the caller owns. */
    const size_t n = 3 * 4096 + 100;
    uint8_t *mine = malloc(n), *theirs = calloc(1, n);
    fill(mine, n, 3);
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_register(a, mine, n, 0, &src));
    OK(strait_engine_register(b, theirs, n, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    strait_desc *rd = remote(dst);
    strait_transfer *t = NULL;
    OK(strait_write(a, src, 0, rd, 0, n, NULL, &t));
    wait_ok(t);
    CHECK(memcmp(mine, theirs, n) == 0);
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dst));
    free(mine);
    free(theirs);
}

static atomic_uint fired;

static void on_fire(uint32_t value, void *user) {
    (void)user;
    atomic_store(&fired, value);
}

/* Triggers fired from the CPU need no CUDA; from a stream they do.
 * `cuda`: the engine has a CUDA driver. */
static void test_trigger(strait_engine *b, bool cuda) {
    strait_trigger *t = NULL;
    OK(strait_trigger_create(on_fire, NULL, true, false, &t));
    OK(strait_trigger_fire(t, 3));
    struct timespec nap = {0, 1000000};
    for (int i = 0; i < 10000 && atomic_load(&fired) != 3; i++) nanosleep(&nap, NULL);
    CHECK(atomic_load(&fired) == 3);
    uint64_t address = 0;
    OK(strait_trigger_address(t, &address));
    CHECK(address != 0);
    FAILS(STRAIT_STATUS_CUDA, strait_trigger_fire_on_stream(t, 0, 4));
    OK(strait_trigger_destroy(t));
    if (!cuda) {
        strait_imm_counter *c = NULL;
        OK(strait_expect_imm(b, 4242, 1, &c));
        FAILS(STRAIT_STATUS_CUDA, strait_imm_counter_wait_on_stream(c, 0, false));
        OK(strait_imm_counter_destroy(c));
    }
}

/* Device memory: staged over tcp/shm where CUDA is present; without a
 * driver the call reports CUDA with the reason (a normal condition). */
static void test_device(strait_engine *a, strait_engine *b) {
    strait_mr *dev = NULL;
    strait_status s =
        strait_engine_alloc_device(b, 1 << 20, 0, STRAIT_ACCESS_REMOTE_WRITE | STRAIT_ACCESS_REMOTE_READ, &dev);
    test_trigger(b, s != STRAIT_STATUS_CUDA);
    if (s == STRAIT_STATUS_CUDA) {
        CHECK(dev == NULL);
        printf("device memory tests skipped: %s\n", strait_last_error_message());
        return;
    }
    OK(s);
    const size_t n = 1 << 20;
    uint8_t *mine = malloc(n);
    fill(mine, n, 9);
    strait_mr *src = NULL;
    OK(strait_engine_register(a, mine, n, 0, &src));
    strait_desc *rd = remote(dev);
    strait_transfer *t = NULL;
    OK(strait_write(a, src, 0, rd, 0, n, NULL, &t));
    wait_ok(t);
    /* Back from the GPU into other host memory: the bytes went there. */
    uint8_t *back = calloc(1, n);
    strait_mr *local = NULL;
    OK(strait_engine_register(a, back, n, 0, &local));
    OK(strait_read(a, local, 0, rd, 0, n, &t));
    wait_ok(t);
    CHECK(memcmp(mine, back, n) == 0);
    OK(strait_mr_destroy(local));
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dev));
    free(mine);
    free(back);
}

struct released {
    atomic_int calls;
    void *ptr;
    uint64_t len;
};

static void on_release(void *ptr, uint64_t len, void *user) {
    struct released *r = user;
    CHECK(ptr == r->ptr && len == r->len);
    free(ptr);
    atomic_fetch_add(&r->calls, 1);
}

static void test_register_owned(strait_engine *a, strait_engine *b) {
    /* Memory handed to strait: freed by the release callback once the
     * region and its requests are done, without waiting here. */
    const uint64_t n = 2 << 20;
    struct released r = {0, malloc(n), n};
    fill(r.ptr, n, 12);
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_register_owned(a, r.ptr, n, 0, on_release, &r, &src));
    OK(strait_engine_alloc(b, n, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    strait_desc *rd = remote(dst);
    uint8_t *copy = malloc(n);
    memcpy(copy, r.ptr, n);
    strait_transfer *t = NULL;
    OK(strait_write(a, src, 0, rd, 0, n, NULL, &t));
    OK(strait_mr_destroy(src)); /* the write holds the region */
    OK(strait_transfer_wait(t, TIMEOUT_MS));
    OK(strait_transfer_destroy(t));
    wait_calls(&r.calls, 1);
    CHECK(memcmp(copy, mr_bytes(dst, NULL), n) == 0);
    /* A failed registration releases at once. */
    struct released bad = {0, malloc(64), 64};
    strait_mr *none = NULL;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_engine_register_owned(a, bad.ptr, 64, 0x40, on_release, &bad, &none));
    CHECK(none == NULL && atomic_load(&bad.calls) == 1);
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_engine_register_owned(a, copy, n, 0, NULL, NULL, &none));
    free(copy);
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(dst));
}

static void test_paged_and_strided(strait_engine *a, strait_engine *b) {
    const uint64_t page = 4096, pages = 16;
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_alloc(a, page * pages, 0, &src));
    OK(strait_engine_alloc(b, page * pages * 2, STRAIT_ACCESS_REMOTE_WRITE | STRAIT_ACCESS_REMOTE_READ, &dst));
    uint8_t *s = mr_bytes(src, NULL), *d = mr_bytes(dst, NULL);
    fill(s, page * pages, 4);
    strait_desc *rd = remote(dst);

    /* Pages 0..8 of the source to scattered pages of a destination with a
     * stride of two pages. */
    struct strait_paged_layout layout = {page, page, 2 * page, 0, page};
    uint32_t sp[8] = {0, 1, 2, 3, 7, 6, 5, 4};
    uint32_t dp[8] = {3, 4, 5, 0, 1, 2, 6, 7};
    strait_transfer *t = NULL;
    uint32_t imm = 11;
    strait_imm_counter *c = NULL;
    OK(strait_expect_imm(b, imm, 1, &c));
    OK(strait_write_paged(a, src, rd, &layout, sp, dp, 8, &imm, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(c, TIMEOUT_MS));
    for (int i = 0; i < 8; i++) CHECK(memcmp(s + sp[i] * page, d + page + dp[i] * 2 * page, page) == 0);
    OK(strait_imm_counter_destroy(c));

    /* Strided rows (a KV head slice): 32 rows of 256 bytes, 1 KiB apart in
     * the source, packed in the destination. */
    struct strait_strided copy = {512, 4096, 32, 256, 1024, 256};
    strait_copy_list *list = NULL;
    OK(strait_copy_list_create(&copy, 1, &list));
    OK(strait_write_copies(a, src, 0, rd, 65536, list, NULL, &t));
    wait_ok(t);
    for (int r = 0; r < 32; r++) CHECK(memcmp(s + 512 + r * 1024, d + 65536 + 4096 + r * 256, 256) == 0);

    /* And read back strided: the list's source side is the peer's. */
    strait_mr *back = NULL;
    OK(strait_engine_alloc(a, page * pages, 0, &back));
    uint8_t *k = mr_bytes(back, NULL);
    struct strait_strided rcopy = {4096, 0, 32, 256, 256, 512};
    strait_copy_list *rlist = NULL;
    OK(strait_copy_list_create(&rcopy, 1, &rlist));
    OK(strait_read_copies(a, back, 0, rd, 65536, rlist, &t));
    wait_ok(t);
    for (int r = 0; r < 32; r++) CHECK(memcmp(k + r * 512, s + 512 + r * 1024, 256) == 0);

    /* On tcp both strided requests (32 short rows each) went packed, and
     * the peer copied the write's rows in; shm never packs. */
    strait_stats *st = NULL;
    struct strait_stats_summary sa, sb;
    OK(strait_engine_stats(a, &st));
    OK(strait_stats_get_summary(st, &sa));
    OK(strait_stats_destroy(st));
    OK(strait_engine_stats(b, &st));
    OK(strait_stats_get_summary(st, &sb));
    OK(strait_stats_destroy(st));
    if (provider == STRAIT_PROVIDER_TCP) {
        CHECK(sa.packed_requests == 2 && sa.packed_chunks == 1 && sb.packed_served == 1);
    } else {
        CHECK(sa.packed_requests == 0 && sb.packed_served == 0);
    }

    /* Overlapping destinations are refused when the list is made. */
    struct strait_strided overlap[2] = {{0, 0, 1, 100, 100, 100}, {200, 50, 1, 100, 100, 100}};
    strait_copy_list *none = NULL;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_copy_list_create(overlap, 2, &none));
    CHECK(none == NULL);

    OK(strait_copy_list_destroy(list));
    OK(strait_copy_list_destroy(rlist));
    OK(strait_mr_destroy(back));
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dst));
}

static void test_read(strait_engine *a, strait_engine *b) {
    const uint64_t n = 300000;
    strait_mr *local = NULL, *theirs = NULL;
    OK(strait_engine_alloc(a, n, 0, &local));
    OK(strait_engine_alloc(b, n, STRAIT_ACCESS_REMOTE_READ, &theirs));
    uint8_t *l = mr_bytes(local, NULL), *r = mr_bytes(theirs, NULL);
    fill(r, n, 5);
    strait_desc *rd = remote(theirs);
    strait_transfer *t = NULL;
    OK(strait_read(a, local, 10, rd, 20, n - 20, &t));
    wait_ok(t);
    CHECK(memcmp(l + 10, r + 20, n - 20) == 0);
    /* Writing to a read-only region is refused before anything is posted. */
    FAILS(STRAIT_STATUS_REMOTE_ACCESS, strait_write(a, local, 0, rd, 0, 16, NULL, &t));
    CHECK(t == NULL);
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(local));
    OK(strait_mr_destroy(theirs));
}

static void test_send_recv(strait_engine *a, strait_engine *b) {
    strait_mr *src = NULL;
    OK(strait_engine_alloc(a, 4096, 0, &src));
    uint8_t *s = mr_bytes(src, NULL);
    fill(s, 4096, 6);
    strait_address *to = address_of(b);
    strait_transfer *t = NULL;
    OK(strait_send(a, to, src, 100, 1000, &t));
    wait_ok(t);

    uint8_t small[10], big[2000];
    size_t len = 0;
    FAILS(STRAIT_STATUS_BUFFER_TOO_SMALL, strait_recv(b, TIMEOUT_MS, small, sizeof small, &len));
    CHECK(len == 1000);
    OK(strait_recv(b, TIMEOUT_MS, big, sizeof big, &len)); /* the kept message */
    CHECK(len == 1000 && memcmp(big, s + 100, 1000) == 0);
    FAILS(STRAIT_STATUS_TIMEOUT, strait_recv(b, 20, big, sizeof big, &len));

    /* The descriptor's owner is the peer's address. */
    strait_mr *mr = NULL;
    OK(strait_engine_alloc(b, 64, STRAIT_ACCESS_REMOTE_WRITE, &mr));
    strait_desc *d = remote(mr);
    strait_address *owner = NULL;
    uint8_t x[512], y[512];
    size_t xl = 0, yl = 0;
    OK(strait_desc_owner(d, &owner));
    OK(strait_address_to_bytes(owner, x, sizeof x, &xl));
    OK(strait_address_to_bytes(to, y, sizeof y, &yl));
    CHECK(xl == yl && memcmp(x, y, xl) == 0);

    OK(strait_address_destroy(owner));
    OK(strait_desc_destroy(d));
    OK(strait_mr_destroy(mr));
    OK(strait_address_destroy(to));
    OK(strait_mr_destroy(src));
}

static void test_callbacks(strait_engine *a, strait_engine *b) {
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_alloc(a, 65536, 0, &src));
    OK(strait_engine_alloc(b, 65536, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    fill(mr_bytes(src, NULL), 65536, 7);
    strait_desc *rd = remote(dst);

    atomic_int reached = 0;
    strait_imm_counter *c = NULL;
    OK(strait_expect_imm(b, 21, 1, &c));
    OK(strait_imm_counter_on_reached(c, on_imm, &reached));

    struct done d = {0, -1};
    strait_transfer *t = NULL;
    uint32_t imm = 21;
    OK(strait_write(a, src, 0, rd, 0, 65536, &imm, &t));
    OK(strait_transfer_on_complete(t, on_done, &d));
    wait_calls(&d.calls, 1);
    CHECK(atomic_load(&d.status) == STRAIT_STATUS_OK);
    for (int i = 0; i < 1000 && atomic_load(&reached) != 21; i++) sleep_ms(10);
    CHECK(atomic_load(&reached) == 21);
    CHECK(memcmp(mr_bytes(src, NULL), mr_bytes(dst, NULL), 65536) == 0);
    /* A callback added after the end runs at once. */
    OK(strait_transfer_on_complete(t, on_done, &d));
    CHECK(atomic_load(&d.calls) == 2);
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_transfer_on_complete(t, NULL, NULL));
    OK(strait_transfer_destroy(t));

    OK(strait_imm_counter_destroy(c));
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dst));
}

static void test_scatter_barrier_batch(strait_engine *a, strait_engine *b, strait_engine *c3) {
    strait_mr *src = NULL, *db = NULL, *dc = NULL;
    OK(strait_engine_alloc(a, 8192, 0, &src));
    OK(strait_engine_alloc(b, 8192, STRAIT_ACCESS_REMOTE_WRITE, &db));
    OK(strait_engine_alloc(c3, 8192, STRAIT_ACCESS_REMOTE_WRITE, &dc));
    uint8_t *s = mr_bytes(src, NULL);
    fill(s, 8192, 8);
    strait_desc *rb = remote(db), *rc = remote(dc);

    strait_imm_counter *cb = NULL, *cc = NULL;
    OK(strait_expect_imm(b, 31, 1, &cb));
    OK(strait_expect_imm(c3, 32, 1, &cc));
    struct strait_scatter_target targets[2] = {
        {rb, 0, 100, 4000, 31, 1},
        {rc, 4000, 0, 4192, 32, 1},
    };
    strait_transfer *t = NULL;
    OK(strait_scatter(a, src, targets, 2, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(cb, TIMEOUT_MS));
    OK(strait_imm_counter_wait(cc, TIMEOUT_MS));
    CHECK(memcmp(mr_bytes(db, NULL) + 100, s, 4000) == 0);
    CHECK(memcmp(mr_bytes(dc, NULL), s + 4000, 4192) == 0);

    /* A barrier: one immediate to each peer. */
    OK(strait_imm_counter_rearm(cb, 1));
    strait_imm_counter *cb2 = NULL, *cc2 = NULL;
    OK(strait_expect_imm(b, 40, 1, &cb2));
    OK(strait_expect_imm(c3, 40, 1, &cc2));
    const strait_desc *peers[2] = {rb, rc};
    OK(strait_barrier(a, peers, 2, 40, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(cb2, TIMEOUT_MS));
    OK(strait_imm_counter_wait(cc2, TIMEOUT_MS));

    /* A batch of small writes, submitted at once. */
    strait_batch *batch = NULL;
    OK(strait_batch_create(a, &batch));
    uint32_t imm = 41;
    strait_imm_counter *cb3 = NULL;
    OK(strait_expect_imm(b, 41, 16, &cb3));
    fill(s, 8192, 9);
    for (int i = 0; i < 16; i++) OK(strait_batch_write(batch, src, i * 256, rb, 4096 + i * 256, 256, &imm));
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_batch_write(batch, src, 0, rb, 8000, 256, NULL));
    size_t n = 0;
    OK(strait_batch_len(batch, &n));
    CHECK(n == 16);
    strait_transfer *ts[16];
    FAILS(STRAIT_STATUS_BUFFER_TOO_SMALL, strait_batch_submit(batch, ts, 3));
    OK(strait_batch_submit(batch, ts, 16));
    for (int i = 0; i < 16; i++) wait_ok(ts[i]);
    OK(strait_imm_counter_wait(cb3, TIMEOUT_MS));
    CHECK(memcmp(mr_bytes(db, NULL) + 4096, s, 4096) == 0);
    OK(strait_batch_len(batch, &n));
    CHECK(n == 0);
    /* Many writes in one call: one request (and one immediate) each. */
    uint64_t so[8], dof[8], lens[8];
    for (int i = 0; i < 8; i++) {
        so[i] = 8192 - (i + 1) * 100;
        dof[i] = i * 100;
        lens[i] = 100;
    }
    strait_imm_counter *cb5 = NULL;
    OK(strait_expect_imm(b, 43, 8, &cb5));
    uint32_t imm43 = 43;
    OK(strait_batch_writes(batch, src, rb, so, dof, lens, 8, &imm43));
    lens[7] = 1 << 20;
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_batch_writes(batch, src, rb, so, dof, lens, 8, NULL));
    OK(strait_batch_len(batch, &n));
    CHECK(n == 8);
    OK(strait_batch_submit(batch, ts, 16));
    for (int i = 0; i < 8; i++) wait_ok(ts[i]);
    OK(strait_imm_counter_wait(cb5, TIMEOUT_MS));
    for (int i = 0; i < 8; i++) CHECK(memcmp(mr_bytes(db, NULL) + i * 100, s + so[i], 100) == 0);
    OK(strait_imm_counter_destroy(cb5));
    /* Joined: one outcome for several. */
    OK(strait_batch_write_imm(batch, rb, 42));
    OK(strait_batch_write(batch, src, 0, rc, 0, 8192, NULL));
    strait_imm_counter *cb4 = NULL;
    OK(strait_expect_imm(b, 42, 1, &cb4));
    OK(strait_batch_submit_joined(batch, &t));
    wait_ok(t);
    OK(strait_imm_counter_wait(cb4, TIMEOUT_MS));
    CHECK(memcmp(mr_bytes(dc, NULL), s, 8192) == 0);
    OK(strait_batch_destroy(batch));

    strait_imm_counter *all[] = {cb, cc, cb2, cc2, cb3, cb4};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) OK(strait_imm_counter_destroy(all[i]));
    OK(strait_desc_destroy(rb));
    OK(strait_desc_destroy(rc));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(db));
    OK(strait_mr_destroy(dc));
}

static void test_stats(strait_engine *a, strait_engine *b) {
    strait_address *peer = address_of(b);
    OK(strait_engine_label_peer(a, peer, "decoder-0"));
    strait_stats *st = NULL;
    OK(strait_engine_stats(a, &st));
    struct strait_stats_summary sum;
    OK(strait_stats_get_summary(st, &sum));
    CHECK(sum.nics == 1 && sum.peers >= 2);
    CHECK(sum.write.count > 0 && sum.write.p50_ns > 0 && sum.write.p50_ns <= sum.write.max_ns);
    struct strait_nic_stats nic;
    OK(strait_stats_nic(st, 0, &nic));
    CHECK(nic.posted.writes > 0 && nic.bytes_posted > 0 && nic.posted.reads > 0 && nic.posted.sends > 0);
    CHECK(nic.receives_posted > 0);
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_stats_nic(st, 1, &nic));
    int labelled = 0;
    for (uint32_t i = 0; i < sum.peers; i++) {
        struct strait_peer_stats p;
        char label[64];
        size_t len = 0;
        OK(strait_stats_peer(st, i, &p));
        OK(strait_stats_peer_label(st, i, (uint8_t *)label, sizeof label - 1, &len));
        label[len] = 0;
        if (strcmp(label, "decoder-0") == 0) {
            labelled = 1;
            CHECK(p.requests_ok > 0 && p.in_flight == 0 && p.requests_failed == 0);
        }
    }
    CHECK(labelled);
    CHECK(strcmp(strait_stats_error_kind(1), "peer_unreachable") == 0 && strait_stats_error_kind(6) == NULL);
    size_t len = 0;
    FAILS(STRAIT_STATUS_BUFFER_TOO_SMALL, strait_stats_render(st, STRAIT_STATS_PROMETHEUS, "strait", NULL, 0, &len));
    char *text = malloc(len + 1);
    OK(strait_stats_render(st, STRAIT_STATS_PROMETHEUS, "strait", (uint8_t *)text, len, &len));
    text[len] = 0;
    CHECK(strstr(text, "strait_peer_requests_total") != NULL || strstr(text, "strait_") != NULL);
    CHECK(strstr(text, "decoder-0") != NULL);
    free(text);
    OK(strait_stats_destroy(st));
    /* The target timed its immediate counters. */
    OK(strait_engine_stats(b, &st));
    OK(strait_stats_get_summary(st, &sum));
    CHECK(sum.imm.count > 0 && sum.imm.p50_ns <= sum.imm.max_ns);
    OK(strait_stats_destroy(st));
    OK(strait_address_destroy(peer));
}

static void test_kv(strait_engine *prefill, strait_engine *decode) {
    struct strait_kv_shape shape = {4, 16, 16, 2, 2, 64, 2}; /* layers, blocks, tokens, heads, total, dim, bf16 */
    struct strait_kv_layout layout;
    OK(strait_kv_layout_named(STRAIT_KV_VLLM, &shape, &layout));
    CHECK(layout.kv_stride == 16ull * 16 * 2 * 64 * 2);
    strait_kv_cache *sender = NULL, *decoder = NULL;
    OK(strait_kv_cache_alloc(prefill, &layout, 0, 1, NULL, &sender));
    OK(strait_kv_cache_alloc(decode, &layout, 0, 1, NULL, &decoder));
    uint64_t tensor_bytes = 0;
    OK(strait_kv_layout_tensor_bytes(&layout, &tensor_bytes));
    for (size_t l = 0; l < 4; l++) {
        strait_mr *t = NULL;
        uint64_t len = 0;
        OK(strait_kv_cache_tensor(sender, l, &t));
        fill(mr_bytes(t, &len), len, 100 + (uint32_t)l);
        CHECK(len >= tensor_bytes);
        OK(strait_mr_destroy(t));
    }

    /* Descriptors are exchanged as bytes, once. */
    uint8_t buf[8192];
    size_t len = 0;
    strait_kv_desc *sender_desc = NULL, *decoder_desc = NULL;
    OK(strait_kv_cache_descriptor(sender, buf, sizeof buf, &len));
    OK(strait_kv_desc_from_bytes(buf, len, &sender_desc));
    OK(strait_kv_cache_descriptor(decoder, buf, sizeof buf, &len));
    OK(strait_kv_desc_from_bytes(buf, len, &decoder_desc));
    strait_kv_desc *cut = NULL;
    FAILS(STRAIT_STATUS_INVALID_DESCRIPTOR, strait_kv_desc_from_bytes(buf, len / 2, &cut));
    CHECK(cut == NULL);

    /* The decoder expects 3 blocks (40 tokens) from the sender's 3 others. */
    uint32_t dst_blocks[3] = {9, 2, 5}, src_blocks[3] = {1, 7, 3};
    const strait_kv_desc *senders[1] = {sender_desc};
    strait_kv_recv *recv = NULL;
    OK(strait_kv_expect(decoder, STRAIT_KV_PUSH, senders, 1, NULL, dst_blocks, 3, 40, TIMEOUT_MS, &recv));
    OK(strait_kv_recv_request(recv, buf, sizeof buf, &len));
    strait_kv_request *request = NULL;
    OK(strait_kv_request_from_bytes(buf, len, &request));

    strait_kv_send *send = NULL;
    OK(strait_kv_push(sender, request, decoder_desc, src_blocks, 3, &send));
    struct done d = {0, -1};
    OK(strait_kv_recv_on_done(recv, on_done, &d));
    OK(strait_kv_send_layers(send, 0, 2));
    OK(strait_kv_send_layers(send, 2, 4));
    OK(strait_kv_recv_wait(recv, TIMEOUT_MS));
    OK(strait_kv_send_wait(send, TIMEOUT_MS));
    OK(strait_kv_send_poll(send));
    OK(strait_kv_recv_poll(recv));
    wait_calls(&d.calls, 1);
    bool landed = false;
    OK(strait_kv_recv_layer_landed(recv, 3, &landed));
    CHECK(landed);

    /* Byte-exact: K and V of every layer, tokens 0..40 of the blocks. */
    const uint64_t token = 2 * 64 * 2, block = token * 16;
    for (size_t l = 0; l < 4; l++) {
        strait_mr *ts = NULL, *td = NULL;
        OK(strait_kv_cache_tensor(sender, l, &ts));
        OK(strait_kv_cache_tensor(decoder, l, &td));
        uint8_t *s = mr_bytes(ts, NULL), *dd = mr_bytes(td, NULL);
        for (int kv = 0; kv < 2; kv++) {
            for (int tok = 0; tok < 40; tok++) {
                uint64_t so = kv * layout.kv_stride + src_blocks[tok / 16] * block + (tok % 16) * token;
                uint64_t dof = kv * layout.kv_stride + dst_blocks[tok / 16] * block + (tok % 16) * token;
                CHECK(memcmp(s + so, dd + dof, token) == 0);
            }
            /* Token 40 onwards of the last block was not moved. */
            uint64_t after = kv * layout.kv_stride + dst_blocks[2] * block + 8 * token;
            for (uint64_t i = 0; i < 8 * token; i++) CHECK(dd[after + i] == 0);
        }
        OK(strait_mr_destroy(ts));
        OK(strait_mr_destroy(td));
    }

    /* A cancelled request ends CANCELLED on the decoder. */
    strait_kv_recv *recv2 = NULL;
    OK(strait_kv_expect(decoder, STRAIT_KV_PUSH, senders, 1, NULL, dst_blocks, 3, 0, TIMEOUT_MS, &recv2));
    OK(strait_kv_recv_cancel(recv2));
    FAILS(STRAIT_STATUS_CANCELLED, strait_kv_recv_wait(recv2, TIMEOUT_MS));
    OK(strait_kv_recv_destroy(recv2));

    /* A layout mismatch is a typed error at push. */
    struct strait_kv_shape other = shape;
    other.head_dim = 128;
    struct strait_kv_layout other_layout;
    OK(strait_kv_layout_named(STRAIT_KV_VLLM, &other, &other_layout));
    strait_kv_cache *wrong = NULL;
    OK(strait_kv_cache_alloc(prefill, &other_layout, 0, 1, NULL, &wrong));
    strait_kv_recv *recv3 = NULL;
    OK(strait_kv_expect(decoder, STRAIT_KV_PUSH, senders, 1, NULL, dst_blocks, 3, 0, TIMEOUT_MS, &recv3));
    OK(strait_kv_recv_request(recv3, buf, sizeof buf, &len));
    strait_kv_request *request3 = NULL;
    OK(strait_kv_request_from_bytes(buf, len, &request3));
    strait_kv_send *send3 = NULL;
    FAILS(STRAIT_STATUS_LAYOUT_MISMATCH, strait_kv_push(wrong, request3, decoder_desc, src_blocks, 3, &send3));
    CHECK(send3 == NULL);
    OK(strait_kv_recv_destroy(recv3)); /* cancels it */

    OK(strait_kv_request_destroy(request3));
    OK(strait_kv_cache_destroy(wrong));
    OK(strait_kv_send_destroy(send));
    OK(strait_kv_recv_destroy(recv));
    OK(strait_kv_request_destroy(request));
    OK(strait_kv_desc_destroy(sender_desc));
    OK(strait_kv_desc_destroy(decoder_desc));
    OK(strait_kv_cache_destroy(sender));
    OK(strait_kv_cache_destroy(decoder));
}

/* ---- MoE: two ranks on two threads -------------------------------------- */

enum { MOE_RANKS = 2, MOE_EXPERTS = 4, MOE_TOPK = 2, MOE_TOKENS = 8, MOE_HIDDEN = 16 };

struct moe_rank {
    strait_engine *engine;
    uint32_t rank;
    strait_moe_rank *r;
    uint8_t desc[4096];
    size_t desc_len;
    const uint8_t *descs[MOE_RANKS];
    size_t lens[MOE_RANKS];
    int ok;
};

static void *moe_thread(void *arg) {
    struct moe_rank *m = arg;
    strait_moe_group *g = NULL;
    OK(strait_moe_connect(m->r, m->descs, m->lens, MOE_RANKS, &g));
    float x[MOE_TOKENS][MOE_HIDDEN];
    int32_t idx[MOE_TOKENS][MOE_TOPK];
    float w[MOE_TOKENS][MOE_TOPK];
    for (int t = 0; t < MOE_TOKENS; t++) {
        for (int h = 0; h < MOE_HIDDEN; h++) x[t][h] = (float)(m->rank * 1000 + t * 10 + h);
        idx[t][0] = (t + (int)m->rank) % MOE_EXPERTS;
        idx[t][1] = t % 3 == 0 ? -1 : (t + 1 + (int)m->rank) % MOE_EXPERTS;
        w[t][0] = 0.5f;
        w[t][1] = 0.25f;
    }
    strait_moe_dispatched *d = NULL;
    OK(strait_moe_dispatch(g, (const uint8_t *)x, sizeof x, &idx[0][0], &w[0][0], MOE_TOKENS, &d));
    const uint8_t *ex = NULL;
    const uint32_t *counts = NULL;
    size_t ex_len = 0;
    uint32_t local = 0, cap = 0, total = 0;
    OK(strait_moe_dispatched_get(d, &ex, &ex_len, &counts, &local, &cap));
    CHECK(local == MOE_EXPERTS / MOE_RANKS && ex_len == (size_t)local * cap * MOE_HIDDEN * 4);
    for (uint32_t e = 0; e < local; e++) {
        for (uint32_t i = 0; i < counts[e]; i++) {
            uint32_t rank, token, k;
            OK(strait_moe_dispatched_source(d, e, i, &rank, &token, &k));
            const float *row = (const float *)(ex + ((size_t)e * cap + i) * MOE_HIDDEN * 4);
            CHECK(row[3] == (float)(rank * 1000 + token * 10 + 3));
            total++;
        }
    }
    CHECK(total > 0);
    uint32_t rank, token, k;
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_moe_dispatched_source(d, 0, counts[0], &rank, &token, &k));
    /* Identity experts: y[t] = (sum of t's weights) * x[t]. */
    float y[MOE_TOKENS][MOE_HIDDEN];
    size_t y_len = 0;
    OK(strait_moe_combine(g, ex, ex_len, d, (uint8_t *)y, sizeof y, &y_len));
    CHECK(y_len == sizeof y);
    for (int t = 0; t < MOE_TOKENS; t++) {
        float sum = t % 3 == 0 ? 0.5f : 0.75f;
        for (int h = 0; h < MOE_HIDDEN; h++) CHECK(y[t][h] == sum * x[t][h]);
    }
    OK(strait_moe_dispatched_destroy(d));
    OK(strait_moe_group_destroy(g));
    m->ok = 1;
    return NULL;
}

static void test_moe(strait_engine *a, strait_engine *b) {
    struct strait_moe_config config;
    OK(strait_moe_config_init(MOE_RANKS, MOE_EXPERTS, MOE_TOPK, MOE_TOKENS, MOE_HIDDEN, STRAIT_MOE_F32, &config));
    struct moe_rank ranks[MOE_RANKS] = {{.engine = a, .rank = 0}, {.engine = b, .rank = 1}};
    for (int r = 0; r < MOE_RANKS; r++) {
        OK(strait_moe_rank_create(ranks[r].engine, &config, ranks[r].rank, &ranks[r].r));
        OK(strait_moe_rank_descriptor(ranks[r].r, ranks[r].desc, sizeof ranks[r].desc, &ranks[r].desc_len));
    }
    for (int r = 0; r < MOE_RANKS; r++)
        for (int s = 0; s < MOE_RANKS; s++) {
            ranks[r].descs[s] = ranks[s].desc;
            ranks[r].lens[s] = ranks[s].desc_len;
        }
    pthread_t threads[MOE_RANKS];
    for (int r = 0; r < MOE_RANKS; r++) CHECK(pthread_create(&threads[r], NULL, moe_thread, &ranks[r]) == 0);
    for (int r = 0; r < MOE_RANKS; r++) CHECK(pthread_join(threads[r], NULL) == 0);
    for (int r = 0; r < MOE_RANKS; r++) CHECK(ranks[r].ok);
    /* A bad configuration is a typed error. */
    config.experts = 3;
    strait_moe_rank *bad = NULL;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_moe_rank_create(a, &config, 0, &bad));
}

static void test_errors(strait_engine *a, strait_engine *b) {
    strait_mr *mr = NULL;
    strait_transfer *t = (strait_transfer *)1;
    OK(strait_engine_alloc(a, 4096, 0, &mr));
    strait_mr *dst = NULL;
    OK(strait_engine_alloc(b, 4096, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    strait_desc *rd = remote(dst);

    /* Null handles and out-pointers. */
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_write(NULL, mr, 0, rd, 0, 16, NULL, &t));
    CHECK(t == NULL);
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_write(a, NULL, 0, rd, 0, 16, NULL, &t));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_write(a, mr, 0, NULL, 0, 16, NULL, &t));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_write(a, mr, 0, rd, 0, 16, NULL, NULL));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_transfer_wait(NULL, 0));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_engine_create(NULL, NULL));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_desc_from_bytes(NULL, 10, NULL));
    OK(strait_mr_destroy(NULL));
    OK(strait_engine_destroy(NULL));

    /* EFA's fabric: the two names, nothing else (set, not opened here). */
    strait_builder *fb = NULL;
    OK(strait_builder_create(&fb));
    OK(strait_builder_set_efa_fabric(fb, "efa-direct"));
    OK(strait_builder_set_efa_fabric(fb, "efa"));
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_builder_set_efa_fabric(fb, "efa-indirect"));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_builder_set_efa_fabric(fb, NULL));
    /* A GPU no machine has: refused when the engine is created. */
    strait_engine *none_engine = NULL;
    OK(strait_builder_set_gpu(fb, 4096));
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_engine_create(fb, &none_engine));
    CHECK(none_engine == NULL);
    OK(strait_builder_destroy(fb));

    /* A handle of another type. */
    FAILS(STRAIT_STATUS_WRONG_HANDLE, strait_write(a, (strait_mr *)rd, 0, rd, 0, 16, NULL, &t));
    FAILS(STRAIT_STATUS_WRONG_HANDLE, strait_write((strait_engine *)mr, mr, 0, rd, 0, 16, NULL, &t));
    FAILS(STRAIT_STATUS_WRONG_HANDLE, strait_transfer_poll((strait_transfer *)mr));
    FAILS(STRAIT_STATUS_WRONG_HANDLE, strait_desc_destroy((strait_desc *)mr));

    /* Bad descriptor and address bytes. */
    uint8_t junk[64];
    fill(junk, sizeof junk, 10);
    strait_desc *d = (strait_desc *)1;
    FAILS(STRAIT_STATUS_INVALID_DESCRIPTOR, strait_desc_from_bytes(junk, sizeof junk, &d));
    CHECK(d == NULL);
    uint8_t good[1024];
    size_t len = 0;
    OK(strait_mr_descriptor(dst, good, sizeof good, &len));
    FAILS(STRAIT_STATUS_INVALID_DESCRIPTOR, strait_desc_from_bytes(good, len - 1, &d));
    good[5] ^= 0xff;
    strait_desc *flipped = NULL;
    enum strait_status s = strait_desc_from_bytes(good, len, &flipped);
    CHECK(s == STRAIT_STATUS_INVALID_DESCRIPTOR || s == STRAIT_STATUS_OK);
    OK(strait_desc_destroy(flipped));
    strait_address *addr = NULL;
    FAILS(STRAIT_STATUS_INVALID_DESCRIPTOR, strait_address_from_bytes(junk, 3, &addr));

    /* Out-of-range offsets and lengths: nothing posted. */
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_write(a, mr, 4000, rd, 0, 200, NULL, &t));
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_write(a, mr, 0, rd, 4000, 200, NULL, &t));
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_write(a, mr, UINT64_MAX, rd, 0, 2, NULL, &t));
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_write(a, mr, 0, rd, 0, 0, NULL, &t));
    strait_mr *none = NULL;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_engine_alloc(a, 4096, 0x80, &none));
    FAILS(STRAIT_STATUS_REGISTER_MEMORY, strait_engine_register(a, NULL, 4096, 0, &none));
    FAILS(STRAIT_STATUS_REGISTER_MEMORY, strait_engine_register(a, (void *)4096, 4096, 0, &none));
    CHECK(none == NULL);
    struct strait_paged_layout layout = {4096, 4096, 4096, 0, 0};
    uint32_t p = 5;
    FAILS(STRAIT_STATUS_OUT_OF_BOUNDS, strait_write_paged(a, mr, rd, &layout, &p, &p, 1, NULL, &t));
    FAILS(STRAIT_STATUS_NULL_ARGUMENT, strait_write_paged(a, mr, rd, &layout, NULL, &p, 1, NULL, &t));

    /* Builder options out of range. */
    strait_builder *bld = NULL;
    OK(strait_builder_create(&bld));
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_builder_set_provider(bld, 99));
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_builder_set_shard(bld, 4096, 1024, 3));
    OK(strait_builder_set_provider(bld, provider));
    OK(strait_builder_set_nics(bld, 0));
    strait_engine *e = NULL;
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_engine_create(bld, &e));
    CHECK(e == NULL);
    OK(strait_builder_destroy(bld));

    /* Status names. */
    CHECK(strcmp(strait_status_name(STRAIT_STATUS_TIMEOUT), "STRAIT_STATUS_TIMEOUT") == 0);
    CHECK(strcmp(strait_status_name(12345), "STRAIT_STATUS_UNKNOWN") == 0);

    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(mr));
    OK(strait_mr_destroy(dst));
}

/* An engine destroyed with requests in flight ends every one of them. */
static void test_destroy_in_flight(void) {
    strait_engine *a = engine(), *b = engine();
    const uint64_t n = 4 << 20;
    strait_mr *src = NULL, *dst = NULL;
    OK(strait_engine_alloc(a, n, 0, &src));
    OK(strait_engine_alloc(b, n, STRAIT_ACCESS_REMOTE_WRITE, &dst));
    strait_desc *rd = remote(dst);
    enum { N = 32 };
    strait_transfer *ts[N];
    struct done d = {0, -1};
    for (int i = 0; i < N; i++) {
        OK(strait_write(a, src, 0, rd, 0, n, NULL, &ts[i]));
        OK(strait_transfer_on_complete(ts[i], on_done, &d));
    }
    OK(strait_engine_destroy(a));
    int shut = 0;
    for (int i = 0; i < N; i++) {
        enum strait_status s = strait_transfer_wait(ts[i], TIMEOUT_MS);
        CHECK(s == STRAIT_STATUS_OK || s == STRAIT_STATUS_SHUTDOWN);
        shut += s == STRAIT_STATUS_SHUTDOWN;
        OK(strait_transfer_destroy(ts[i]));
    }
    wait_calls(&d.calls, N);
    /* New requests on the shut-down engine's regions fail. */
    strait_transfer *t = NULL;
    strait_engine *c = engine();
    FAILS(STRAIT_STATUS_INVALID_REQUEST, strait_write(c, src, 0, rd, 0, 16, NULL, &t));
    printf("destroy with %d writes of 4 MiB in flight: %d ended SHUTDOWN, the rest OK\n", N, shut);
    OK(strait_desc_destroy(rd));
    OK(strait_mr_destroy(src));
    OK(strait_mr_destroy(dst));
    OK(strait_engine_destroy(b));
    OK(strait_engine_destroy(c));
}

int main(int argc, char **argv) {
    if (argc > 1) {
        if (strcmp(argv[1], "shm") == 0) provider = STRAIT_PROVIDER_SHM;
        else if (strcmp(argv[1], "tcp") != 0) {
            fprintf(stderr, "usage: %s [tcp|shm]\n", argv[0]);
            return 2;
        }
    }
    strait_engine *a = engine(), *b = engine(), *c = engine();
    struct strait_engine_info info;
    OK(strait_engine_get_info(a, &info));
    CHECK(info.provider == provider && info.nics == 1);

    test_write_imm(a, b);
    test_register(a, b);
    test_device(a, b);
    test_register_owned(a, b);
    test_paged_and_strided(a, b);
    test_read(a, b);
    test_send_recv(a, b);
    test_callbacks(a, b);
    test_scatter_barrier_batch(a, b, c);
    test_stats(a, b);
    test_kv(a, b);
    test_moe(a, b);
    test_errors(a, b);

    OK(strait_engine_destroy(a));
    OK(strait_engine_destroy(b));
    OK(strait_engine_destroy(c));
    test_destroy_in_flight();
    printf("C API tests on %s: %d checks passed\n", provider == STRAIT_PROVIDER_SHM ? "shm" : "tcp", checks);
    return 0;
}
