"""Every operation, byte-exact, over tcp and shm, with numpy arrays."""

import asyncio
import threading

import numpy as np
import pytest

import strait

from conftest import engine

TIMEOUT = 20


def pattern(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_write_with_immediate(pair):
    a, b = pair
    inbox = np.zeros(3 << 20, dtype=np.uint8)
    dst = b.register(inbox, remote="write")
    data = pattern(3 << 20)
    src = a.register(data)
    arrived = b.expect_imm(7)
    a.write(src, dst.descriptor, imm=7).wait(TIMEOUT)
    arrived.wait(TIMEOUT)
    assert arrived.reached and arrived.seen == 1
    assert np.array_equal(inbox, data)


def test_write_offsets_and_typed_arrays(pair):
    a, b = pair
    inbox = np.zeros(1000, dtype=np.float32)
    region = b.register(inbox, remote="write")
    dst = strait.Descriptor(region.descriptor)
    values = np.arange(100, dtype=np.float32) * 1.5
    src = a.register(values)
    a.write(src, dst, src_offset=40, dst_offset=400, nbytes=200).wait(TIMEOUT)
    expected = np.zeros(1000, dtype=np.float32)
    expected[100:150] = values[10:60]
    assert np.array_equal(inbox, expected)


def test_write_paged(pair):
    a, b = pair
    page = 256
    kv_src = pattern(64 * page, seed=2)
    kv_dst = np.zeros(64 * page, dtype=np.uint8)
    src = a.register(kv_src)
    dst = b.register(kv_dst, remote="write")
    src_pages, dst_pages = [3, 4, 5, 9, 0], [10, 11, 12, 40, 63]
    done = b.expect_imm(11)
    a.write_paged(src, dst.descriptor, src_pages, dst_pages, page_size=page, imm=11).wait(TIMEOUT)
    done.wait(TIMEOUT)
    for s, d in zip(src_pages, dst_pages):
        assert np.array_equal(kv_dst[d * page : (d + 1) * page], kv_src[s * page : (s + 1) * page])
    untouched = np.ones(64, dtype=bool)
    untouched[dst_pages] = False
    assert not kv_dst.reshape(64, page)[untouched].any()


def test_scatter_and_barrier(provider):
    a, b, c = engine(provider, 2), engine(provider), engine(provider)
    try:
        bufs = [np.zeros(4096, dtype=np.uint8) for _ in range(2)]
        # The regions must stay referenced: dropping one revokes peers' access.
        regions = [b.register(bufs[0], remote="write"), c.register(bufs[1], remote="write")]
        descs = [r.descriptor for r in regions]
        data = pattern(8192, seed=3)
        src = a.register(data)
        got = [b.expect_imm(21), c.expect_imm(22)]
        targets = [
            strait.ScatterTarget(descs[0], 4096, src_offset=0, imm=21),
            strait.ScatterTarget(descs[1], 4096, src_offset=4096, imm=22),
        ]
        a.scatter(src, targets).wait(TIMEOUT)
        for g in got:
            g.wait(TIMEOUT)
        assert np.array_equal(bufs[0], data[:4096]) and np.array_equal(bufs[1], data[4096:])

        signals = [b.expect_imm(99), c.expect_imm(99)]
        a.barrier(descs, 99).wait(TIMEOUT)
        for s in signals:
            s.wait(TIMEOUT)
    finally:
        for e in (a, b, c):
            e.shutdown()


def test_read(pair):
    a, b = pair
    remote = pattern(1 << 20, seed=4)
    src = b.register(remote, remote="read")
    local = np.zeros(1 << 19, dtype=np.uint8)
    dst = a.register(local)
    a.read(dst, src.descriptor, src_offset=1 << 19).wait(TIMEOUT)
    assert np.array_equal(local, remote[1 << 19 :])


def test_send_and_recv(pair):
    a, b = pair
    msg = a.alloc(1024)
    msg.write(b"x" * 100 + b"hello", 0)
    a.send(b.address, msg, offset=100, nbytes=5).wait(TIMEOUT)
    assert b.recv(timeout=TIMEOUT) == b"hello"
    # The hex form of the address works too.
    a.send(b.address_hex, msg, nbytes=3).wait(TIMEOUT)
    assert b.recv(timeout=TIMEOUT) == b"xxx"
    with pytest.raises(strait.TimeoutError):
        b.recv(timeout=0.05)


def test_on_message_callback_runs_on_the_engine_thread(provider):
    got, threads, arrived = [], [], threading.Event()

    def on_message(data: bytes) -> None:
        got.append(data)
        threads.append(threading.get_ident())
        arrived.set()

    a, b = engine(provider), engine(provider, on_message=on_message)
    try:
        msg = a.alloc(16)
        msg.write(b"ping")
        a.send(b.address, msg, nbytes=4).wait(TIMEOUT)
        assert arrived.wait(TIMEOUT)
        assert got == [b"ping"] and threads[0] != threading.get_ident()
    finally:
        a.shutdown()
        b.shutdown()


def test_transfer_callbacks_and_polling(pair):
    a, b = pair
    dst = b.alloc(1 << 16, remote="write")
    src = a.alloc(1 << 16)
    called = threading.Event()
    seen = []
    t = a.write(src, dst.descriptor)
    t.add_done_callback(lambda h: (seen.append(h.exception()), called.set()))
    assert called.wait(TIMEOUT)
    assert t.done() and seen == [None] and t.exception() is None
    # A callback added after the end runs at once.
    late = []
    t.add_done_callback(late.append)
    assert late == [t]


def test_await(pair):
    a, b = pair
    dst = b.alloc(4096, remote="write")
    src = a.alloc(4096)
    src.write(b"async")

    async def main():
        counter = b.expect_imm(5, count=3)
        await asyncio.gather(*(a.write(src, dst.descriptor, imm=5) for _ in range(3)))
        await asyncio.wait_for(counter, TIMEOUT)
        return counter.seen

    assert asyncio.run(main()) == 3
    assert dst.read(0, 5) == b"async"


def test_immediate_counters(pair):
    a, b = pair
    dst = b.alloc(4096, remote="write")
    counter = b.expect_imm(3, count=4)
    for _ in range(4):
        a.write_imm(dst.descriptor, 3).wait(TIMEOUT)
    counter.wait(TIMEOUT)
    assert counter.seen == 4 and counter.value == 3 and counter.count == 4

    # The next round, with a callback from the engine's thread.
    reached = threading.Event()
    counter.rearm(2)
    assert not counter.reached
    counter.on_reached(lambda value: reached.set())
    a.write_imm(dst.descriptor, 3).wait(TIMEOUT)
    a.write_imm(dst.descriptor, 3).wait(TIMEOUT)
    assert reached.wait(TIMEOUT) and counter.reached

    # Timeouts leave the counter armed; cancel wakes waiters.
    pending = b.expect_imm(4, count=1)
    with pytest.raises(strait.TimeoutError):
        pending.wait(timeout=0.05)
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_raises(pending.wait, TIMEOUT)))
    waiter.start()
    pending.cancel()
    waiter.join(TIMEOUT)
    assert errors and isinstance(errors[0], strait.CancelledError)


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def test_unclaimed_immediates_queue(provider):
    a, b = engine(provider), engine(provider, unclaimed_imm="queue")
    try:
        dst = b.alloc(64, remote="write")
        a.write_imm(dst.descriptor, 1234).wait(TIMEOUT)
        assert b.next_imm(timeout=TIMEOUT) == 1234
    finally:
        a.shutdown()
        b.shutdown()


def test_blocking_waits_release_the_gil(pair):
    """A thread blocked in wait() must not stop another thread from
    submitting the write it waits for."""
    a, b = pair
    dst = b.alloc(4096, remote="write")
    counter = b.expect_imm(77)
    result = []
    waiter = threading.Thread(target=lambda: result.append(_raises(counter.wait, TIMEOUT)))
    waiter.start()
    a.write_imm(dst.descriptor, 77).wait(TIMEOUT)
    waiter.join(TIMEOUT)
    assert result == [None]


def test_registered_objects(pair):
    a, b = pair
    # bytearray and memoryview (buffer protocol), bytes (read-only source).
    target = bytearray(64)
    dst = b.register(target, remote="write")
    assert dst.source == "buffer" and dst.writable
    src = a.register(b"read-only source bytes")
    assert not src.writable and src.source == "buffer"
    a.write(src, dst.descriptor).wait(TIMEOUT)
    assert bytes(target[:22]) == b"read-only source bytes"
    # The bytearray cannot be resized while registered.
    with pytest.raises(BufferError):
        target.extend(b"!")
    dst.close()
    target.extend(b"!")
    # numpy goes through DLPack; the object is kept alive by the region.
    region = a.register(np.ones(10, dtype=np.int64), remote="read")
    assert region.source in ("dlpack_versioned", "dlpack") and region.nbytes == 80  # numpy >= 2.1: DLPack 1.x
    assert region.read(0, 8) == (1).to_bytes(8, "little")
    # A read-only numpy array is registered read-only through the buffer
    # protocol.
    frozen = np.zeros(16, dtype=np.uint8)
    frozen.flags.writeable = False
    assert a.register(frozen).writable is False


def test_descriptor_is_bytes_and_picklable(pair):
    import pickle

    _, b = pair
    region = b.alloc(8192, remote="read_write")
    raw = region.descriptor
    assert isinstance(raw, bytes)
    d = strait.Descriptor(raw)
    assert pickle.loads(pickle.dumps(d)) == d and bytes(d) == raw
    assert d.nbytes == 8192 and d.remote == "read_write" and d.owner == b.address
    assert d.provider == b.provider


def test_context_manager_shuts_down(provider):
    with engine(provider) as e:
        region = e.alloc(4096)
        assert e.nics == 1
    with pytest.raises(strait.ShutdownError):
        e.alloc(10)
    with pytest.raises(strait.ShutdownError):
        e.write_imm(region.descriptor, 1)


def test_request_timeout_fails_requests_to_a_silent_peer(provider):
    """A peer that is gone (its engine shut down) never answers: the request
    ends with a transport error within the request timeout. On shm this is
    also the case the backend keeps a closed NIC open for (libfabric 1.17's
    shm would otherwise crash the process on the next write)."""
    import time

    a = engine(provider, request_timeout=1.0)
    b = engine(provider)
    try:
        dst = b.alloc(1 << 20, remote="write")
        src = a.alloc(1 << 20)
        a.write(src, dst.descriptor).wait(TIMEOUT)
        descriptor = dst.descriptor
        b.shutdown()
        start = time.monotonic()
        with pytest.raises(strait.TransportError):
            a.write(src, descriptor, imm=1).wait(TIMEOUT)
        assert time.monotonic() - start < 1.0 + 3.0
    finally:
        a.shutdown()


def test_a_revoked_region_fails_with_remote_access_and_the_peer_stays_usable(provider):
    """Closing a region revokes it: a write with its old descriptor fails
    with RemoteAccessError (on tcp and shm the engine asks the owner, since
    libfabric reports only a dropped connection, or nothing), the owner's
    bytes are untouched, and the next write to a live region of the same
    peer works."""
    import time

    a = engine(provider, request_timeout=1.0)
    b = engine(provider)
    try:
        live = b.alloc(1 << 16, remote="write")
        doomed = b.alloc(1 << 16, remote="write")
        stale = doomed.descriptor
        src = a.alloc(1 << 16)
        src.write(b"\x5a" * (1 << 16))
        doomed.close()
        with pytest.raises(strait.RemoteAccessError):
            a.write(src, stale, imm=9).wait(TIMEOUT)
        deadline = time.monotonic() + 2.0
        while True:  # tcp reconnects after the owner dropped the connection
            try:
                a.write(src, live.descriptor).wait(TIMEOUT)
                break
            except strait.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        assert live.read(0, 1 << 16) == b"\x5a" * (1 << 16)
    finally:
        a.shutdown()
        b.shutdown()


def test_write_batch_from_numpy_arrays_and_lists(pair):
    a, b = pair
    n, size = 64, 512
    data = pattern(n * size, seed=9)
    inbox = np.zeros(2 * n * size, dtype=np.uint8)
    src = a.register(data)
    dst = b.register(inbox, remote="write")
    # Reversed order into every other slot: offsets as numpy uint64 arrays.
    src_offsets = np.arange(n, dtype=np.uint64) * size
    dst_offsets = (np.arange(n, dtype=np.uint64)[::-1] * 2 * size).copy()
    lengths = np.full(n, size, dtype=np.uint64)
    arrived = b.expect_imm(31, n)
    t = a.write_batch(src, dst.descriptor, src_offsets, dst_offsets, lengths, imm=31)
    assert isinstance(t, strait.Transfer)
    t.wait(TIMEOUT)
    arrived.wait(TIMEOUT)
    for i in range(n):
        at = int(dst_offsets[i])
        assert np.array_equal(inbox[at : at + size], data[i * size : (i + 1) * size])
        assert not inbox[at + size : at + 2 * size].any()
    # Lists and int64 arrays, one handle per write.
    ts = a.write_batch(src, dst.descriptor, [0, size], np.array([0, 4 * size], dtype=np.int64), [size, size], joined=False)
    assert isinstance(ts, list) and len(ts) == 2
    for t in ts:
        t.wait(TIMEOUT)
    assert np.array_equal(inbox[4 * size : 5 * size], data[size : 2 * size])


def test_write_batch_refuses_bad_arrays_before_posting(pair):
    a, b = pair
    inbox = np.zeros(4096, dtype=np.uint8)
    src = a.register(np.ones(4096, dtype=np.uint8))
    dst = b.register(inbox, remote="write")
    with pytest.raises(strait.InvalidRequestError):
        a.write_batch(src, dst.descriptor, [0, 1], [0], [1, 1])
    with pytest.raises(strait.InvalidRequestError):
        a.write_batch(src, dst.descriptor, np.array([0], dtype=np.int64), np.array([-1], dtype=np.int64), [1])
    with pytest.raises(strait.InvalidRequestError):
        a.write_batch(src, dst.descriptor, np.zeros(2, dtype=np.float64), [0, 0], [1, 1])
    # The second write is out of range: neither is posted.
    with pytest.raises(strait.InvalidRequestError):
        a.write_batch(src, dst.descriptor, [0, 0], [0, 4000], [16, 200])
    assert not inbox.any()
