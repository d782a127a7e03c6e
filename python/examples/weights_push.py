"""RL weight transfer with strait.weights: S trainer processes holding
FSDP dim-0 shards of a model push steps into D inference processes
holding tensor-parallel splits, descriptors exchanged through pipes (in a
real job: ``Rank.connect_torch()`` over the job's process group).

    python python/examples/weights_push.py [--provider tcp|shm] [--sources 2] [--dests 2] [--steps 3]

Every step the trainers change the weights; every inference rank checks
its shares against the full tensors.
"""

import argparse
import multiprocessing as mp
import time

import numpy as np

import strait
import strait.weights as w

MODEL = {"embed": (1000, 256), "qkv": (768, 256), "o_proj": (256, 256), "up": (1024, 256), "down": (256, 1024), "norm": (256,)}
# How inference splits each tensor: column-parallel (0), row-parallel (1), whole (None).
TP = {"embed": 0, "qkv": 0, "o_proj": 1, "up": 0, "down": 1, "norm": None}


def weights(step):
    rng = np.random.default_rng(step)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in MODEL.items()}


def rank_main(conn, provider, role, r, n, steps):
    engine = strait.TransferEngine(provider, interface="lo" if provider == "tcp" else None)
    if role == "source":
        tensors, shares = w.shard_dict(weights(0), 0, r, n)
    else:
        tensors, shares = {}, {}
        for name, shape in MODEL.items():
            if TP[name] is None:
                tensors[name] = np.zeros(shape, np.float32)
            else:
                shares[name] = w.chunk(shape, TP[name], r, n)
                tensors[name] = np.zeros(shares[name].local_shape(), np.float32)
    rank = w.Rank(engine, role, r, tensors, shares)
    conn.send(rank.descriptor)
    group = rank.connect(conn.recv())
    for step in range(1, steps + 1):
        conn.recv()  # the parent: everyone is done with the last step
        start = time.perf_counter()
        if role == "source":
            new, _ = w.shard_dict(weights(step), 0, r, n)

            def prepare(name):  # just before a tensor is sent: gather, cast, quantize...
                tensors[name][...] = new[name]

            group.push(step, prepare=prepare)
        else:
            group.wait(step)
            full = weights(step)
            for name, t in tensors.items():
                want = full[name] if TP[name] is None else w.shard(full[name], TP[name], r, n)[0]
                assert np.array_equal(t, want), f"{name} differs at step {step}"
        conn.send((time.perf_counter() - start) * 1e3)
    engine.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="tcp", choices=["tcp", "shm"])
    p.add_argument("--sources", type=int, default=2)
    p.add_argument("--dests", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    roles = [("source", r, a.sources) for r in range(a.sources)] + [("destination", r, a.dests) for r in range(a.dests)]
    pipes = [ctx.Pipe() for _ in roles]
    procs = [
        ctx.Process(target=rank_main, args=(c, a.provider, role, r, n, a.steps)) for (_, c), (role, r, n) in zip(pipes, roles)
    ]
    for p_ in procs:
        p_.start()
    descs = [ours.recv() for ours, _ in pipes]
    for ours, _ in pipes:
        ours.send(descs)
    for step in range(1, a.steps + 1):
        for ours, _ in pipes:
            ours.send("go")
        ms = [ours.recv() for ours, _ in pipes]
        print(f"step {step}: every destination checked, slowest rank {max(ms):.1f} ms")
    for p_ in procs:
        p_.join(60)
        assert p_.exitcode == 0
    print("weights match on every destination")


if __name__ == "__main__":
    main()
