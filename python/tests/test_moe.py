"""strait.moe: dispatch and combine between ranks (threads in one process,
and processes), over tcp and shm, against a numpy reference: counts equal
the global bincount, every (token, expert) pair arrives once with its
bytes and source, combine of 2x with weights summing to 1 gives 2x, reruns
are bit-identical."""

import multiprocessing as mp
import threading

import numpy as np
import pytest

import strait
import strait.moe as moe

from conftest import engine

TIMEOUT = 30
SHAPE = dict(ranks=4, experts=16, top_k=4, max_tokens=32, hidden=64)


def inputs(rank, tokens, dtype, seed=0):
    rng = np.random.default_rng(seed * 100 + rank)
    E, K, H = SHAPE["experts"], SHAPE["top_k"], SHAPE["hidden"]
    idx = np.array([rng.permutation(E)[:K] for _ in range(tokens)], dtype=np.int64).reshape(tokens, K)
    idx[rng.random((tokens, K)) < 0.1] = -1  # some pairs go nowhere
    valid = (idx >= 0).sum(axis=1, keepdims=True)
    w = np.where(idx >= 0, 1.0 / np.maximum(valid, 1), 0.0).astype(np.float32)
    vals = rng.integers(-32, 32, (tokens, H)).astype(np.float32)
    x = vals if dtype == "f32" else (vals.view(np.uint32) >> 16).astype(np.uint16)  # exact in bf16
    return x, idx, w


def as_f32(a, dtype):
    return a.astype(np.float32) if dtype == "f32" else (a.astype(np.uint32) << 16).view(np.float32)


def double(a, dtype):
    if dtype == "f32":
        return a * 2
    return ((as_f32(a, dtype) * 2).view(np.uint32) >> 16).astype(np.uint16)


def check(rank, dtype, tokens_of, seed, expert_x, counts, handle, y):
    E, K, R = SHAPE["experts"], SHAPE["top_k"], SHAPE["ranks"]
    le = E // R
    ins = [inputs(r, tokens_of[r], dtype, seed) for r in range(R)]
    allidx = np.concatenate([i[1].reshape(-1) for i in ins])
    want = np.bincount(allidx[allidx >= 0], minlength=E)[rank * le:(rank + 1) * le]
    assert list(counts) == list(want)
    for e in range(le):
        last = None
        for j in range(counts[e]):
            s, t, k = handle.source(e, j)
            assert ins[s][1][t, k] == rank * le + e
            assert np.array_equal(expert_x[e, j], ins[s][0][t])
            assert last is None or (s, t, k) > last
            last = (s, t, k)
        assert handle.source(e, counts[e]) is None
    x, idx, _ = ins[rank]
    routed = (idx >= 0).any(axis=1, keepdims=True)
    np.testing.assert_allclose(as_f32(y, dtype), np.where(routed, 2 * as_f32(x, dtype), 0), rtol=1e-2 if dtype == "bf16" else 1e-5)


def run_rank(group, rank, dtype, tokens_of, seed):
    x, idx, w = inputs(rank, tokens_of[rank], dtype, seed)
    outs = []
    for _ in range(2):
        expert_x, counts, handle = group.dispatch(x, idx, w)
        y = group.combine(double(expert_x, dtype), handle)
        outs.append((expert_x.copy(), y.copy()))
    check(rank, dtype, tokens_of, seed, expert_x, counts, handle, y)
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1]), "rerun differs"


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_threads(provider, dtype):
    tokens_of = [32, 0, 17, 5]
    engines = [engine(provider) for _ in range(4)]
    try:
        ranks = [moe.Rank(e, rank=r, dtype=dtype, timeout=TIMEOUT, **SHAPE) for r, e in enumerate(engines)]
        descs = [r.descriptor for r in ranks]
        groups = [r.connect(descs) for r in ranks]
        errors = []

        def body(r):
            try:
                run_rank(groups[r], r, dtype, tokens_of, seed=1)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
    finally:
        for e in engines:
            e.shutdown()


def test_memory_and_bad_input():
    with engine("tcp") as e:
        r = moe.Rank(e, rank=0, ranks=64, experts=256, top_k=8, max_tokens=128, hidden=7168)
        m = r.memory
        assert m["receive"] == m["counts"] + m["pool"] + m["combine"]
        assert m["receive"] * 4 <= 2 * 256 * 128 * (16 + 2 * 7168)  # vs DeepEP low-latency
        with pytest.raises(strait.InvalidRequestError):
            moe.Rank(e, rank=4, ranks=4, experts=8, top_k=2, max_tokens=4, hidden=8)
        with pytest.raises(strait.InvalidRequestError):
            moe.Rank(e, rank=0, ranks=3, experts=8, top_k=2, max_tokens=4, hidden=8)
        solo = moe.Rank(e, rank=0, ranks=1, experts=2, top_k=1, max_tokens=4, hidden=8, dtype="f32")
        group = solo.connect([solo.descriptor])
        x = np.ones((4, 8), dtype=np.float32)
        with pytest.raises(strait.InvalidRequestError):
            group.dispatch(x, np.array([[2]] * 4), np.ones((4, 1)))  # expert 2 of 2
        ex, counts, h = group.dispatch(x, np.array([[1], [0], [-1], [1]]), np.ones((4, 1)))
        assert list(counts) == [1, 2] and ex.shape == (2, 2, 8)
        y = group.combine(ex * 3, h)
        assert np.array_equal(y, np.array([[3] * 8, [3] * 8, [0] * 8, [3] * 8], dtype=np.float32))


def process_rank(conn, provider, rank, tokens_of):
    with engine(provider) as e:
        r = moe.Rank(e, rank=rank, dtype="bf16", timeout=TIMEOUT, **SHAPE)
        conn.send(r.descriptor)
        group = r.connect(conn.recv())
        run_rank(group, rank, "bf16", tokens_of, seed=2)
        conn.send("ok")
        conn.recv()


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_processes(provider):
    ctx = mp.get_context("spawn")
    tokens_of = [9, 32, 0, 21]
    pipes = [ctx.Pipe() for _ in range(4)]
    children = [ctx.Process(target=process_rank, args=(p[1], provider, r, tokens_of)) for r, p in enumerate(pipes)]
    for c in children:
        c.start()
    try:
        descs = [p[0].recv() for p in pipes]
        for p in pipes:
            p[0].send(descs)
        for p in pipes:
            assert p[0].poll(TIMEOUT)
            assert p[0].recv() == "ok"
        for p in pipes:
            p[0].send("done")
        for c in children:
            c.join(TIMEOUT)
            assert c.exitcode == 0
    finally:
        for c in children:
            if c.is_alive():
                c.kill()
