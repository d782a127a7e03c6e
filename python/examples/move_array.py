"""Moves a numpy array from one process to another with strait, and checks it.

    python examples/move_array.py [--provider tcp|shm] [--mib 64]

The receiver (a child process) registers an empty array with remote write
access and sends its engine's descriptor to the sender through a pipe (in a
real job: torch.distributed, a key-value store, an RPC). The sender writes
its array into it with an immediate; the receiver waits for the immediate,
which arrives only after every byte has landed, and compares checksums.
"""

import argparse
import hashlib
import multiprocessing as mp
import time

import numpy as np

import strait

IMM = 42


def make_engine(provider: str) -> strait.TransferEngine:
    # Loopback only: tcp stays on "lo".
    return strait.TransferEngine(provider, interface="lo" if provider == "tcp" else None)


def receiver(conn, provider: str, nbytes: int) -> None:
    with make_engine(provider) as engine:
        inbox = np.zeros(nbytes, dtype=np.uint8)
        region = engine.register(inbox, remote="write")
        arrived = engine.expect_imm(IMM)
        conn.send(region.descriptor)
        arrived.wait(timeout=60)
        conn.send(hashlib.sha256(inbox).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="tcp", choices=["tcp", "shm", "efa", "verbs", "auto"])
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    nbytes = args.mib << 20

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=receiver, args=(theirs, args.provider, nbytes))
    child.start()

    with make_engine(args.provider) as engine:
        array = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        src = engine.register(array)
        descriptor = ours.recv()
        start = time.perf_counter()
        engine.write(src, descriptor, imm=IMM).wait(timeout=60)
        elapsed = time.perf_counter() - start
        remote_digest = ours.recv()
    child.join(60)

    local_digest = hashlib.sha256(array).hexdigest()
    if remote_digest != local_digest or child.exitcode != 0:
        raise SystemExit(f"MISMATCH: sent {local_digest}, received {remote_digest} (child exit {child.exitcode})")
    print(
        f"moved {args.mib} MiB over {args.provider} in {elapsed * 1e3:.1f} ms "
        f"({nbytes / elapsed / 1e9:.2f} GB/s); sha256 {local_digest[:16]}... matches"
    )


if __name__ == "__main__":
    main()
