"""Disaggregated prefill/decode with strait.kv: two prefill ranks (tensor
parallel 2) push a request's KV, layer by layer, into a decode rank's
blocks (TP 1) in another process; the decoder checks every byte.

    python python/examples/kv_prefill_decode.py [--provider tcp|shm] [--layers 32] [--tokens 1024]

Each side's cache is a list of per-layer numpy arrays in the vLLM
flash-attention layout, [2, blocks, block_tokens, kv_heads, head_dim]
(torch CPU tensors work the same); the layout is read from the arrays.
Descriptors and requests are bytes, passed here through a pipe (in a real
deployment: the serving engine's scheduler, a store or torch.distributed).
"""

import argparse
import multiprocessing as mp
import time

import numpy as np

import strait
import strait.kv as kv

KV_HEADS, HEAD_DIM, BLOCK_TOKENS, BLOCKS = 8, 128, 16, 256


def make_engine(provider):
    return strait.TransferEngine(provider, interface="lo" if provider == "tcp" else None)


def pattern(rank, heads):
    """A value per element saying (K/V, block, token, head)."""
    kv_, block, token, head, _ = np.indices((2, BLOCKS, BLOCK_TOKENS, heads, HEAD_DIM), dtype=np.uint32)
    return ((kv_ * 3 + block * 5 + token * 11 + (head + rank * heads) * 13) % 65000).astype(np.uint16)


def layer_values(base, layer):
    """What a prefill rank computes for `layer` (a stand-in for attention)."""
    return base + np.uint16(layer)


def prefill(conn, provider, layers, tp_size):
    """Both prefill ranks of one TP group, in one process for brevity; in a
    real job each rank is its own process with its own engine."""
    heads = KV_HEADS // tp_size
    engines = [make_engine(provider) for _ in range(tp_size)]
    caches, tensors = [], []
    for rank, engine in enumerate(engines):
        per_layer = [np.zeros((2, BLOCKS, BLOCK_TOKENS, heads, HEAD_DIM), dtype=np.uint16) for _ in range(layers)]
        tensors.append(per_layer)
        caches.append(kv.register(engine, per_layer, "vllm", rank=rank, size=tp_size, total_heads=KV_HEADS))
    conn.send([c.descriptor for c in caches])
    decoder, request, src_blocks = conn.recv()
    sends = [c.push(request, decoder, src_blocks) for c in caches]
    bases = [pattern(rank, heads) for rank in range(tp_size)]
    start = time.perf_counter()
    for layer in range(layers):
        for rank in range(tp_size):
            np.add(bases[rank], np.uint16(layer), out=tensors[rank][layer])  # "compute" the layer
            sends[rank].send_layers(layer)  # and push it at once
    for s in sends:
        s.wait(timeout=60)
    conn.send(time.perf_counter() - start)
    for e in engines:
        e.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="tcp", choices=["tcp", "shm"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prefill-tp", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=prefill, args=(theirs, args.provider, args.layers, args.prefill_tp))
    child.start()
    with make_engine(args.provider) as engine:
        layers = [np.zeros((2, BLOCKS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM), dtype=np.uint16) for _ in range(args.layers)]
        cache = kv.register(engine, layers, "vllm")
        senders = ours.recv()
        n = -(-args.tokens // BLOCK_TOKENS)
        rng = np.random.default_rng(0)
        dst_blocks = rng.permutation(BLOCKS)[:n].astype(np.int32)  # the decoder's block table
        src_blocks = np.arange(n, dtype=np.int32)  # the prefill side's
        recv = cache.expect(senders, dst_blocks, tokens=args.tokens, timeout=60)
        ours.send((cache.descriptor, recv.request, src_blocks))
        recv.wait(timeout=60)  # or: await recv; recv.landed_layers() meanwhile
        took = ours.recv()
        # Check every byte against what the prefill ranks computed.
        heads = KV_HEADS // args.prefill_tp
        p = np.arange(args.tokens)
        src_at, dst_at = (src_blocks[p // BLOCK_TOKENS], p % BLOCK_TOKENS), (dst_blocks[p // BLOCK_TOKENS], p % BLOCK_TOKENS)
        for rank in range(args.prefill_tp):
            base = pattern(rank, heads)[:, src_at[0], src_at[1]]
            for layer in range(args.layers):
                got = layers[layer][:, dst_at[0], dst_at[1], rank * heads : (rank + 1) * heads]
                if not np.array_equal(got, layer_values(base, layer)):
                    raise SystemExit(f"layer {layer}, prefill rank {rank}: wrong bytes")
        nbytes = args.layers * 2 * args.tokens * KV_HEADS * HEAD_DIM * 2
        print(
            f"{args.provider}: {args.layers} layers x {args.tokens} tokens ({nbytes / 1e6:.1f} MB) from "
            f"{args.prefill_tp} prefill ranks in {took * 1e3:.1f} ms (compute and transfer), every byte checked"
        )
    child.join(60)
    if child.exitcode != 0:
        raise SystemExit(f"the prefill process exited with {child.exitcode}")


if __name__ == "__main__":
    main()
