"""Every rank of a torchrun job writes a torch tensor into every other rank's
inbox with an immediate, and checks what it received.

    torchrun --nproc-per-node 2 python/examples/torchrun_write.py [--provider tcp|shm] [--mib 4]

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the job's
gloo process group carries the engine addresses and region descriptors
(``strait.distributed``), and strait carries the bytes. Each rank's inbox
has one slot per rank; rank r writes its tensor into slot r of every peer's
inbox with immediate 100, and each rank waits for ``world - 1`` of them,
which arrive only after the bytes have landed.
"""

import argparse
import os

import torch
import torch.distributed as dist

import strait
import strait.distributed

IMM = 100


def pattern(rank: int, n: int) -> torch.Tensor:
    return ((torch.arange(n, dtype=torch.int64) * (2 * rank + 1) + rank) % 251).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="tcp", choices=["tcp", "shm"])
    parser.add_argument("--mib", type=float, default=4)
    args = parser.parse_args()

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = int(args.mib * (1 << 20))
    with strait.TransferEngine(args.provider, interface="lo" if args.provider == "tcp" else None) as engine:
        inbox = torch.zeros(world, n, dtype=torch.uint8)
        outbox = pattern(rank, n)
        inbox_region = engine.register(inbox, remote="write")
        outbox_region = engine.register(outbox)
        addresses = strait.distributed.exchange_addresses(engine)
        assert addresses[rank] == engine.address and len(set(addresses)) == world
        inboxes = strait.distributed.exchange_descriptors(inbox_region)
        arrived = engine.expect_imm(IMM, count=world - 1)

        writes = [
            engine.write(outbox_region, inboxes[peer], dst_offset=rank * n, imm=IMM)
            for peer in range(world)
            if peer != rank
        ]
        for w in writes:
            w.wait(timeout=60)
        arrived.wait(timeout=60)
        for peer in range(world):
            if peer != rank:
                assert torch.equal(inbox[peer], pattern(peer, n)), f"rank {rank}: slot {peer} differs"
        # Nobody shuts its engine down while a peer may still write to it.
        dist.barrier()
    print(f"rank {rank} of {world} (local rank {os.environ.get('LOCAL_RANK', '?')}): "
          f"received {world - 1} x {n} bytes over {args.provider}, all byte-exact", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
