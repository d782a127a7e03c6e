"""strait.kv: layouts read from numpy arrays, push and pull between engines
(in one process and in two), heterogeneous tensor parallelism, MLA,
per-layer progress, await, cancel, sender failure, mismatches. Every
transfer is checked byte for byte against a reference computed here with
numpy indexing of the layouts."""

import array
import asyncio
import multiprocessing as mp
import time

import numpy as np
import pytest

import strait
import strait.kv as kv

from conftest import engine

TIMEOUT = 30
LAYERS, BLOCKS, HEAD_DIM = 4, 12, 16


def shape_of(fmt, blocks, block_tokens, heads):
    return {
        "vllm": (2, blocks, block_tokens, heads, HEAD_DIM),
        "nhd": (blocks, 2, block_tokens, heads, HEAD_DIM),
        "hnd": (blocks, 2, heads, block_tokens, HEAD_DIM),
        "mla": (blocks, block_tokens, HEAD_DIM),
    }[fmt]


def canon(t, fmt):
    """A view of one layer with axes (kv, block, token, head, dim)."""
    if fmt == "vllm":
        return t
    if fmt == "nhd":
        return t.transpose(1, 0, 2, 3, 4)
    if fmt == "hnd":
        return t.transpose(1, 0, 3, 2, 4)
    return t[None, :, :, None, :]


def tensors(fmt, heads, block_tokens=4, seed=None, pooled=False, dtype=np.uint16):
    shape = shape_of(fmt, BLOCKS, block_tokens, heads)
    if seed is None:
        make = lambda s: np.zeros(s, dtype=dtype)  # noqa: E731
    else:
        rng = np.random.default_rng(seed)
        make = lambda s: rng.integers(0, 1 << 16, s, dtype=np.uint64).astype(dtype)  # noqa: E731
    if pooled:
        pool = make((LAYERS,) + shape)
        return pool, [pool[layer] for layer in range(LAYERS)]
    layers = [make(shape) for _ in range(LAYERS)]
    return layers, layers


def heads_of(rank, size, total):
    if total >= size:
        n = total // size
        return rank * n, n
    return rank * total // size, 1


def expected(dst_layers, fmt_d, d_tp, d_bt, dst_blocks, senders, total, tokens):
    """The decoder's layers after the transfer: a copy of `dst_layers` with
    each token position's shared heads taken from the sender that holds
    them. `senders`: list of (layers, fmt, (rank, size), block_tokens,
    src_blocks)."""
    out = [layer.copy() for layer in dst_layers]
    d_first, d_n = heads_of(d_tp[0], d_tp[1], total)
    for layer in range(LAYERS):
        dst = canon(out[layer], fmt_d)
        for src_layers, fmt_s, s_tp, s_bt, src_blocks in senders:
            s_first, s_n = heads_of(s_tp[0], s_tp[1], total)
            lo, hi = max(d_first, s_first), min(d_first + d_n, s_first + s_n)
            if lo >= hi:
                continue
            src = canon(src_layers[layer], fmt_s)
            for p in range(tokens):
                db, dt = dst_blocks[p // d_bt], p % d_bt
                sb, st = src_blocks[p // s_bt], p % s_bt
                dst[:, db, dt, lo - d_first : hi - d_first, :] = src[:, sb, st, lo - s_first : hi - s_first, :]
    return out


def test_layout_of_reads_shape_and_strides():
    for fmt, make in [
        ("vllm", kv.KvLayout.vllm_flash),
        ("nhd", kv.KvLayout.flashinfer_nhd),
        ("hnd", kv.KvLayout.flashinfer_hnd),
    ]:
        layers, _ = tensors(fmt, 2)
        got = kv.layout_of(layers, fmt)
        want = make(layers=LAYERS, blocks=BLOCKS, block_tokens=4, heads=2, head_dim=HEAD_DIM, elem_bytes=2)
        assert got == want, (fmt, got, want)
        pool, _ = tensors(fmt, 2, pooled=True)
        assert kv.layout_of(pool, fmt) == want.pooled()
    mla, _ = tensors("mla", 1)
    assert kv.layout_of(mla, "mla") == kv.KvLayout.mla(
        layers=LAYERS, blocks=BLOCKS, block_tokens=4, latent_dim=HEAD_DIM, elem_bytes=2
    )
    # A view with padded strides is described as it is.
    padded = np.zeros((2, BLOCKS, 4, 2, HEAD_DIM + 8), dtype=np.uint16)[..., :HEAD_DIM]
    layout = kv.layout_of([padded] * LAYERS, "vllm")
    assert layout.head_stride == (HEAD_DIM + 8) * 2
    assert layout.offset(0, 1, 0, 0, 0) == padded.strides[0]


def test_layout_of_refuses_what_it_cannot_describe():
    layers, _ = tensors("vllm", 2)
    with pytest.raises(ValueError, match="format"):
        kv.layout_of(layers, "paged")
    with pytest.raises(ValueError, match="differs"):
        kv.layout_of([layers[0], layers[1][:, :6]], "vllm")
    with pytest.raises(ValueError, match="contiguous"):
        kv.layout_of([np.zeros((2, 3, 4, 2, 16), dtype=np.uint16)[..., ::2]] * 2, "vllm")
    with pytest.raises(ValueError, match="axes"):
        kv.layout_of([np.zeros((3, 4, 16), dtype=np.uint16)] * 2, "vllm")
    with pytest.raises(strait.InvalidRequestError, match="heads"):
        kv.KvLayout.vllm_flash(
            layers=2, blocks=2, block_tokens=4, heads=3, head_dim=16, elem_bytes=2, total_heads=8
        ).validate(0, 2)


@pytest.mark.parametrize(
    "fmt,pooled,mode",
    [("vllm", False, "push"), ("nhd", False, "push"), ("hnd", True, "push"), ("vllm", True, "pull"), ("nhd", False, "pull")],
)
def test_one_to_one_is_byte_exact(provider, fmt, pooled, mode):
    with engine(provider, 2) as pe, engine(provider) as de:
        src_obj, src = tensors(fmt, 2, seed=1, pooled=pooled)
        dst_obj, dst = tensors(fmt, 2, pooled=pooled)
        pcache = kv.register(pe, src_obj, fmt)
        dcache = kv.register(de, dst_obj, fmt)
        src_blocks = np.array([3, 4, 5, 9, 1], dtype=np.int64)
        dst_blocks = [7, 8, 0, 2, 11]
        before = [d.copy() for d in dst]
        tokens = 5 * 4 - 1
        if mode == "push":
            recv = dcache.expect([pcache.descriptor], dst_blocks, tokens=tokens)
            send = pcache.push(recv.request, dcache.descriptor, src_blocks)
        else:
            recv = dcache.expect([pcache.descriptor], dst_blocks, src_blocks=src_blocks, tokens=tokens)
            send = pcache.serve_pull(recv.request, dcache.descriptor)
        order = [2, 0, 3, 1]
        for layer in order:
            send.send_layers(layer)
        recv.wait(TIMEOUT)
        send.wait(TIMEOUT)
        assert recv.landed_layers() == list(range(LAYERS))
        want = expected(before, fmt, (0, 1), 4, dst_blocks, [(src, fmt, (0, 1), 4, list(src_blocks))], 2, tokens)
        for layer in range(LAYERS):
            assert np.array_equal(dst[layer], want[layer]), (fmt, layer)


@pytest.mark.parametrize("p,d,fmt", [(2, 1, "nhd"), (1, 2, "hnd"), (2, 1, "vllm"), (2, 2, "mla")])
def test_heterogeneous_tp_is_byte_exact(p, d, fmt):
    total = 1 if fmt == "mla" else 4
    with engine("tcp") as pe, engine("tcp") as de:
        prefill, sources = [], []
        for r in range(p):
            heads = heads_of(r, p, total)[1] if fmt != "mla" else 1
            # Block sizes differ: 8 tokens per block on the prefill side.
            src_obj, src = tensors(fmt, heads, block_tokens=8, seed=10 + r)
            if fmt == "mla":
                src_obj, src = tensors(fmt, 1, block_tokens=8, seed=10)  # replicated latent
            prefill.append(kv.register(pe, src_obj, fmt, rank=r, size=p, total_heads=total))
            sources.append(src)
        descs = [c.descriptor for c in prefill]
        src_blocks = [2, 5, 1]
        for dr in range(d):
            heads = heads_of(dr, d, total)[1] if fmt != "mla" else 1
            dst_obj, dst = tensors(fmt, heads, block_tokens=4)
            dcache = kv.register(de, dst_obj, fmt, rank=dr, size=d, total_heads=total)
            dst_blocks = [9, 0, 3, 4, 10, 6]
            before = [x.copy() for x in dst]
            recv = dcache.expect(descs, np.array(dst_blocks, dtype=np.uint32))
            sends = [c.push(recv.request, dcache.descriptor, src_blocks) for c in prefill]
            for layer in reversed(range(LAYERS)):
                for s in sends:
                    s.send_layers(layer)
            recv.wait(TIMEOUT)
            for s in sends:
                s.wait(TIMEOUT)
            if fmt == "mla":
                # Each layer is sent by exactly one prefill rank.
                assert sorted(sum((s.layers_to_send() for s in sends), [])) == list(range(LAYERS))
            senders = [(sources[r], fmt, (r, p), 8, src_blocks) for r in range(p)]
            want = expected(before, fmt, (dr, d), 4, dst_blocks, senders, total, 24)
            for layer in range(LAYERS):
                assert np.array_equal(dst[layer], want[layer]), (p, d, dr, layer)


def test_block_ids_from_any_integer_array():
    with engine("tcp") as pe, engine("tcp") as de:
        src_obj, _ = tensors("vllm", 2, seed=3)
        dst_obj, _ = tensors("vllm", 2)
        pcache, dcache = kv.register(pe, src_obj, "vllm"), kv.register(de, dst_obj, "vllm")
        for ids in ([1, 2], (1, 2), np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.uint8),
                    array.array("H", [1, 2]), memoryview(array.array("q", [1, 2]))):
            recv = dcache.expect([pcache.descriptor], ids)
            send = pcache.push(recv.request, dcache.descriptor, ids)
            send.send_all()
            recv.wait(TIMEOUT)
        for bad, why in ((np.array([-1, 2]), "negative"), (np.array([1.0, 2.0]), "integers"),
                         (np.array([[1, 2]]), "1-d"), ([1 << 33], "2\\^32")):
            with pytest.raises(strait.InvalidRequestError, match=why):
                dcache.expect([pcache.descriptor], bad)


def test_await_progress_and_callbacks():
    with engine("tcp") as pe, engine("tcp") as de:
        src_obj, src = tensors("nhd", 2, seed=4)
        dst_obj, dst = tensors("nhd", 2)
        pcache, dcache = kv.register(pe, src_obj, "nhd"), kv.register(de, dst_obj, "nhd")
        desc = kv.KvCacheDesc(pcache.descriptor)
        assert desc.layout == pcache.layout and desc.tp == (0, 1)
        recv = dcache.expect([desc], [0, 1, 2])
        seen = []
        recv.add_done_callback(lambda r: seen.append(r.exception()))
        send = pcache.push(recv.request, kv.KvCacheDesc(dcache.descriptor), [5, 6, 7])

        async def main():
            send.send_layers(0, 2)
            while not recv.layer_landed(1):
                await asyncio.sleep(0.001)
            assert not recv.done()
            send.send_layers(2, LAYERS)
            await recv
            await send

        asyncio.run(main())
        assert seen == [None]
        assert recv.landed_layers() == list(range(LAYERS))
        late = []
        recv.add_done_callback(late.append)
        assert late == [recv]


def test_cancel_fail_and_mismatch():
    with engine("tcp") as pe, engine("tcp") as de:
        src_obj, _ = tensors("vllm", 2, seed=5)
        dst_obj, dst = tensors("vllm", 2)
        pcache, dcache = kv.register(pe, src_obj, "vllm"), kv.register(de, dst_obj, "vllm")

        # Decoder cancels after two layers: the outcome comes once the
        # sender has confirmed; nothing lands afterwards.
        recv = dcache.expect([pcache.descriptor], [0, 1])
        send = pcache.push(recv.request, dcache.descriptor, [0, 1])
        send.send_layers(0, 2)
        deadline = time.monotonic() + TIMEOUT
        while recv.landed_layers() != [0, 1] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert recv.landed_layers() == [0, 1]
        recv.cancel()
        with pytest.raises(strait.CancelledError):
            recv.wait(TIMEOUT)
        with pytest.raises(strait.Error):
            send.wait(TIMEOUT)
        snapshot = [d.copy() for d in dst]
        with pytest.raises(strait.Error):
            send.send_layers(2, LAYERS)
        assert all(np.array_equal(a, b) for a, b in zip(dst, snapshot))

        # Sender fails: the decoder gets the reason at once, not a timeout.
        recv = dcache.expect([pcache.descriptor], [2])
        send = pcache.push(recv.request, dcache.descriptor, [3])
        send.send_layers(0)
        send.fail("prefill OOM")
        with pytest.raises(strait.AbortedError, match="prefill OOM"):
            recv.wait(TIMEOUT)
        assert isinstance(recv.exception(), strait.AbortedError)

        # Sender cancels.
        recv = dcache.expect([pcache.descriptor], [4])
        send = pcache.push(recv.request, dcache.descriptor, [4])
        send.cancel()
        with pytest.raises(strait.CancelledError):
            recv.wait(TIMEOUT)

        # The request's own timeout.
        recv = dcache.expect([pcache.descriptor], [5], timeout=0.2)
        with pytest.raises(strait.TimeoutError):
            recv.wait(TIMEOUT)

        # Mismatched caches (element size) are refused before anything is
        # posted, naming the field.
        wide, _ = tensors("vllm", 2, dtype=np.uint32)
        other = kv.register(de, wide, "vllm")
        with pytest.raises(strait.LayoutMismatchError, match="element size: sender 2, decoder 4"):
            other.expect([pcache.descriptor], [0])
        wide_sender = kv.register(pe, tensors("vllm", 2, dtype=np.uint32)[0], "vllm")
        recv = dcache.expect([pcache.descriptor], [0])
        with pytest.raises(strait.LayoutMismatchError, match="element size"):
            wide_sender.push(recv.request, dcache.descriptor, [0])
        # A request for another cache than the one named.
        with pytest.raises(strait.InvalidRequestError):
            pcache.push(recv.request, other.descriptor, [0])
        recv.cancel()
        with pytest.raises(strait.InvalidDescriptorError):
            kv.KvCacheDesc(pcache.descriptor[:-3])
        with pytest.raises(strait.InvalidDescriptorError):
            pcache.push(b"nonsense", dcache.descriptor, [0])


def prefill_process(conn, provider):
    """The other process: a prefill rank that pushes what it is asked."""
    with engine(provider) as e:
        src_obj, _ = tensors("nhd", 2, seed=21, pooled=True)
        cache = kv.register(e, src_obj, "nhd")
        conn.send(cache.descriptor)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            request, decoder, blocks = msg
            send = cache.push(request, decoder, blocks)
            for layer in range(LAYERS):
                send.send_layers(layer)
            send.wait(TIMEOUT)
            conn.send("sent")


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_two_processes_byte_exact(provider):
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=prefill_process, args=(theirs, provider))
    child.start()
    try:
        with engine(provider) as e:
            prefill_desc = ours.recv()
            dst_obj, dst = tensors("nhd", 2)
            dcache = kv.register(e, dst_obj, "nhd")
            # The same bytes as the child's, made here from the same seed.
            _, src = tensors("nhd", 2, seed=21, pooled=True)
            for dst_blocks, src_blocks in (([0, 1, 2], [5, 6, 7]), ([11, 3], [0, 10])):
                before = [d.copy() for d in dst]
                recv = dcache.expect([prefill_desc], dst_blocks)
                ours.send((recv.request, dcache.descriptor, src_blocks))
                recv.wait(TIMEOUT)
                assert ours.recv() == "sent"
                want = expected(before, "nhd", (0, 1), 4, dst_blocks, [(src, "nhd", (0, 1), 4, src_blocks)], 2,
                                4 * len(dst_blocks))
                for layer in range(LAYERS):
                    assert np.array_equal(dst[layer], want[layer])
            ours.send(None)
        child.join(TIMEOUT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
