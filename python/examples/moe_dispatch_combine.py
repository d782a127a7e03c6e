"""Expert-parallel dispatch and combine with strait.moe: R rank processes
on this machine, descriptors exchanged through pipes (in a real job:
``strait.distributed.all_gather_bytes`` over the job's process group).

    python python/examples/moe_dispatch_combine.py [--provider tcp|shm] [--ranks 4]

Each rank routes its tokens to random top-k experts, the "experts" double
their rows, and combine (weights summing to 1) gives back 2x: checked.
"""

import argparse
import multiprocessing as mp
import time

import numpy as np

import strait
import strait.moe as moe

SHAPE = dict(experts=32, top_k=4, max_tokens=128, hidden=2048)


def rank_main(conn, provider, rank, ranks):
    engine = strait.TransferEngine(provider, interface="lo" if provider == "tcp" else None)
    r = moe.Rank(engine, rank=rank, ranks=ranks, dtype="f32", **SHAPE)
    conn.send(r.descriptor)
    group = r.connect(conn.recv())
    rng = np.random.default_rng(rank)
    T, E, K, H = SHAPE["max_tokens"], SHAPE["experts"], SHAPE["top_k"], SHAPE["hidden"]
    x = rng.standard_normal((T, H), dtype=np.float32)
    topk_idx = np.array([rng.permutation(E)[:K] for _ in range(T)])
    topk_weights = np.full((T, K), 1.0 / K, dtype=np.float32)
    start = time.perf_counter()
    expert_x, counts, handle = group.dispatch(x, topk_idx, topk_weights)
    mid = time.perf_counter()
    y = group.combine(expert_x * 2, handle)  # expert_x: [local experts, capacity, hidden]
    end = time.perf_counter()
    assert np.allclose(y, 2 * x, rtol=1e-5, atol=1e-5), "combine is not 2x"
    conn.send((counts.tolist(), (mid - start) * 1e3, (end - mid) * 1e3))
    engine.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="tcp", choices=["tcp", "shm"])
    p.add_argument("--ranks", type=int, default=4)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(a.ranks)]
    procs = [ctx.Process(target=rank_main, args=(c, a.provider, r, a.ranks)) for r, (_, c) in enumerate(pipes)]
    for pr in procs:
        pr.start()
    descs = [ours.recv() for ours, _ in pipes]
    for ours, _ in pipes:
        ours.send(descs)
    for r, (ours, _) in enumerate(pipes):
        counts, d_ms, c_ms = ours.recv()
        print(f"rank {r}: rows per local expert {counts}; dispatch {d_ms:.1f} ms, combine {c_ms:.1f} ms; combine = 2x")
    for pr in procs:
        pr.join(60)
        if pr.exitcode != 0:
            raise SystemExit(f"a rank exited with {pr.exitcode}")


if __name__ == "__main__":
    main()
