"""Caller time of small operations from Python: the cost a PyTorch job pays
per call on its own thread, apart from the transfer itself.

Two engines in this process over libfabric (tcp on lo by default):

* ``write``: the median over ``--calls`` calls of one 64-byte ``write()``
  (submission only: the handle is kept, and waited for in groups of 256
  outside the timed region).
* ``write_batch``: one call with ``--batch`` writes given as numpy arrays of
  offsets and lengths; the time per write.
* ``baseline``: a no-op method call on the same object (``engine.nics``),
  so that the interpreter's own call cost is in the same run.

Run: ``python/.venv/bin/python python/benchmarks/call_overhead.py``
(``--provider shm``; ``--json FILE`` writes the figures).
"""

import argparse
import json
import statistics
import time

import numpy as np

import strait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()

    kw = {"interface": "lo"} if args.provider == "tcp" else {}
    a = strait.TransferEngine(provider=args.provider, **kw)
    b = strait.TransferEngine(provider=args.provider, **kw)
    src = a.alloc(1 << 20)
    inbox = b.alloc(1 << 20, remote="write")
    dst = strait.Descriptor(inbox.descriptor)
    a.write(src, dst, nbytes=64).wait(10)  # connect first

    def no_op() -> list:
        samples = []
        for _ in range(args.calls):
            t0 = time.perf_counter_ns()
            a.nics
            samples.append(time.perf_counter_ns() - t0)
        return samples

    def single() -> list:
        samples, pending = [], []
        for i in range(args.calls):
            t0 = time.perf_counter_ns()
            t = a.write(src, dst, nbytes=64, dst_offset=(i % 1024) * 64)
            samples.append(time.perf_counter_ns() - t0)
            pending.append(t)
            if len(pending) == 256:
                for p in pending:
                    p.wait(10)
                pending.clear()
        for p in pending:
            p.wait(10)
        return samples

    def batched() -> list:
        n = args.batch
        src_offsets = np.zeros(n, dtype=np.uint64)
        dst_offsets = (np.arange(n, dtype=np.uint64) % 1024) * 64
        lengths = np.full(n, 64, dtype=np.uint64)
        per_write = []
        for _ in range(args.rounds):
            t0 = time.perf_counter_ns()
            t = a.write_batch(src, dst, src_offsets, dst_offsets, lengths)
            per_write.append((time.perf_counter_ns() - t0) / n)
            t.wait(30)
        return per_write

    baseline = statistics.median(no_op())
    write = statistics.median(single())
    batch = statistics.median(batched())
    rows = {
        "provider": args.provider,
        "baseline_call_us": baseline / 1e3,
        "write_us": write / 1e3,
        "write_batch_per_write_us": batch / 1e3,
        "batch": args.batch,
        "calls": args.calls,
    }
    print(f"provider {args.provider}: median caller time over {args.calls} calls")
    print(f"  no-op method call (baseline)   {baseline / 1e3:8.3f} us")
    print(f"  write() of 64 B                {write / 1e3:8.3f} us")
    print(f"  write_batch(), per write ({args.batch}) {batch / 1e3:8.3f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
