"""strait.weights: resharding pushes between numpy/torch tensors (FSDP
dim-0 shards to tensor-parallel column and row splits), several steps
with changing data, a chain broadcast, a prepare hook, refused
descriptions, and ranks in separate processes over tcp and shm."""

import multiprocessing as mp
import threading

import numpy as np
import pytest

import strait
import strait.weights as w

from conftest import engine

TIMEOUT = 30

MODEL = {
    "embed": (50, 32),
    "qkv": (96, 32),
    "o_proj": (32, 96),
    "norm": (32,),
}
# How the destinations split each tensor (None: whole).
TP = {"embed": 0, "qkv": 0, "o_proj": 1, "norm": None}


def full(step: int):
    rng = np.random.default_rng(step)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in MODEL.items()}


def source_rank(e, r, ranks):
    local, shares = w.shard_dict({n: np.zeros(s, np.float32) for n, s in MODEL.items()}, 0, r, ranks)
    # 1-D tensors are whole on every source.
    return w.Rank(e, "source", r, local, shares, chunk=4096, timeout=5)


def dest_rank(e, r, ranks, mode="direct"):
    tensors, shares = {}, {}
    for n, s in MODEL.items():
        d = TP[n]
        if d is None or mode == "broadcast":
            tensors[n] = np.zeros(s, np.float32)
        else:
            share = w.chunk(s, d, r, ranks)
            tensors[n], shares[n] = np.zeros(share.local_shape(), np.float32), share
    return w.Rank(e, "destination", r, tensors, shares, mode=mode, chunk=4096, timeout=5)


def fill(rank: w.Rank, step: int, r: int, ranks: int):
    f = full(step)
    for n, t in rank.tensors.items():
        t[...] = w.shard(f[n], 0, r, ranks)[0] if t.shape != f[n].shape else f[n]


def expected(n: str, step: int, r: int, ranks: int, mode="direct"):
    f = full(step)[n]
    d = TP[n]
    if d is None or mode == "broadcast":
        return f
    return w.shard(f, d, r, ranks)[0]


def run_steps(groups, sources, steps, mode="direct", ndest=None):
    for step in range(1, steps + 1):
        for r, (rank, _) in enumerate(sources):
            fill(rank, step, r, len(sources))
        errors = []

        def go(g):
            try:
                g.push(step) if g.role == "source" else g.wait(step)
            except Exception as ex:  # noqa: BLE001 - reported below
                errors.append(ex)

        threads = [threading.Thread(target=go, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        for g in groups:
            if g.role == "destination":
                for n, t in g.tensors.items():
                    np.testing.assert_array_equal(t, expected(n, step, g.rank, ndest, mode), err_msg=f"{n} step {step}")


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_fsdp_to_tp_over_several_steps(provider):
    engines = [engine(provider) for _ in range(6)]
    try:
        srcs = [(source_rank(engines[r], r, 3), r) for r in range(3)]
        dsts = [dest_rank(engines[3 + r], r, 3) for r in range(3)]
        descs = [s.descriptor for s, _ in srcs] + [d.descriptor for d in dsts]
        groups = [s.connect(descs) for s, _ in srcs] + [d.connect(descs) for d in dsts]
        run_steps(groups, srcs, 3, ndest=3)
        with pytest.raises(strait.InvalidRequestError, match="not newer"):
            groups[0].push(3)
    finally:
        for e in engines:
            e.shutdown()


def test_broadcast_and_prepare_hook():
    engines = [engine("tcp") for _ in range(4)]
    try:
        tensors = {n: np.zeros(s, np.float32) for n, s in MODEL.items()}
        src = w.Rank(engines[0], "source", 0, tensors, mode="broadcast", chunk=4096, timeout=5)
        dsts = [dest_rank(engines[1 + r], r, 3, mode="broadcast") for r in range(3)]
        descs = [src.descriptor] + [d.descriptor for d in dsts]
        groups = [src.connect(descs)] + [d.connect(descs) for d in dsts]
        prepared = []

        # The hook writes each tensor's bytes just before it is sent.
        def prepare(name):
            prepared.append(name)
            tensors[name][...] = full(1)[name]

        errors = []

        def waiter(g):
            try:
                g.wait(1)
            except Exception as ex:  # noqa: BLE001
                errors.append(ex)

        threads = [threading.Thread(target=waiter, args=(g,)) for g in groups[1:]]
        for t in threads:
            t.start()
        groups[0].push(1, prepare=prepare)
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        assert sorted(prepared) == sorted(MODEL)
        for g in groups[1:]:
            for n, t in g.tensors.items():
                np.testing.assert_array_equal(t, full(1)[n])
    finally:
        for e in engines:
            e.shutdown()


def test_descriptions_that_cannot_be_planned_raise():
    with engine("tcp") as e:
        src = w.Rank(e, "source", 0, {"w": np.zeros((8, 8), np.float32)})
        dst = w.Rank(e, "destination", 0, {"w": np.zeros((8, 4), np.float32)})
        with pytest.raises(strait.WeightsPlanError, match="shape"):
            dst.connect([src.descriptor, dst.descriptor])
        with pytest.raises(strait.InvalidRequestError, match="share"):
            w.Rank(e, "destination", 0, {"w": np.zeros((8, 4), np.float32)}, {"w": w.chunk((8, 8), 1, 0, 4)})
        with pytest.raises(strait.InvalidDescriptorError):
            src.connect([src.descriptor, b"garbage"])


def test_torch_state_dict():
    torch = pytest.importorskip("torch")
    with engine("tcp") as a, engine("tcp") as b:
        sd = {"a.weight": torch.arange(64, dtype=torch.bfloat16).reshape(8, 8), "a.bias": torch.ones(8)}
        src = w.Rank(a, "source", 0, sd)
        params = {"a.weight": torch.zeros(8, 4, dtype=torch.bfloat16), "a.bias": torch.zeros(8)}
        dst = w.Rank(b, "destination", 0, params, {"a.weight": w.chunk((8, 8), 1, 0, 2)})
        # The other half goes nowhere: a second destination takes it.
        rest = {"a.weight": torch.zeros(8, 4, dtype=torch.bfloat16), "a.bias": torch.zeros(8)}
        dst2 = w.Rank(b, "destination", 1, rest, {"a.weight": w.chunk((8, 8), 1, 1, 2)})
        descs = [src.descriptor, dst.descriptor, dst2.descriptor]
        gs, gd, gd2 = src.connect(descs), dst.connect(descs), dst2.connect(descs)
        t = threading.Thread(target=gs.push, args=(1,))
        t.start()
        gd.wait(1)
        gd2.wait(1)
        t.join(TIMEOUT)
        assert torch.equal(params["a.weight"], sd["a.weight"][:, :4])
        assert torch.equal(rest["a.weight"], sd["a.weight"][:, 4:])
        assert torch.equal(params["a.bias"], sd["a.bias"])


def child(conn, provider, role, r):
    e = engine(provider)
    rank = source_rank(e, r, 2) if role == "source" else dest_rank(e, r, 2)
    conn.send(rank.descriptor)
    g = rank.connect(conn.recv())
    for step in (1, 2):
        assert conn.recv() == "go"  # every rank is done with the last step
        if role == "source":
            fill(rank, step, r, 2)
            g.push(step)
            conn.send("ok")
        else:
            g.wait(step)
            ok = all(np.array_equal(t, expected(n, step, r, 2)) for n, t in g.tensors.items())
            conn.send("ok" if ok else "wrong bytes")
    conn.recv()
    e.shutdown()


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_ranks_as_processes(provider):
    ctx = mp.get_context("spawn")
    roles = [("source", 0), ("source", 1), ("destination", 0), ("destination", 1)]
    pipes = [ctx.Pipe() for _ in roles]
    procs = [ctx.Process(target=child, args=(theirs, provider, role, r)) for (_, theirs), (role, r) in zip(pipes, roles)]
    for p in procs:
        p.start()
    try:
        descs = []
        for ours, _ in pipes:
            assert ours.poll(TIMEOUT)
            descs.append(ours.recv())
        for ours, _ in pipes:
            ours.send(descs)
        for _ in (1, 2):
            for ours, _ in pipes:
                ours.send("go")
            for ours, _ in pipes:
                assert ours.poll(TIMEOUT)
                assert ours.recv() == "ok"
        for ours, _ in pipes:
            ours.send("done")
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
