"""The torch tier: registering torch CPU tensors (every dtype, views,
non-contiguous ones refused, DLPack 1.x and 0.x capsules and the data_ptr()
path, tensors kept alive), strait.distributed over real gloo process groups
launched as torchrun launches them (world sizes 2 and 4, and torchrun
itself), the store helpers between processes that share no group, and the
KV and MoE APIs with torch tensors.

scripts/test.sh installs torch into python/.venv; without torch this module
fails (it is never skipped silently) unless STRAIT_TORCH_OPTIONAL=1 is set.
"""

import gc
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    if os.environ.get("STRAIT_TORCH_OPTIONAL") == "1":
        pytest.skip("torch is not installed (STRAIT_TORCH_OPTIONAL=1)", allow_module_level=True)
    raise ImportError(
        "the torch tier needs PyTorch: scripts/test.sh installs it into python/.venv from "
        "python/requirements-test.txt (set STRAIT_TORCH_OPTIONAL=1 to skip these tests)"
    ) from e

import numpy as np

import strait
import strait.distributed as sd
import strait.kv as kv
import strait.moe as moe

from conftest import engine

TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "python" / "examples" / "torchrun_write.py"

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)]


def raw(t: "torch.Tensor") -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def random_tensor(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return bits[:n] % 2 == 1
    return bits.view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_register_every_dtype(pair, dtype):
    a, b = pair
    src = random_tensor(dtype, 4099, seed=1)
    dst = torch.zeros_like(src)
    s, d = a.register(src), b.register(dst, remote="write")
    assert s.nbytes == src.numel() * src.element_size()
    a.write(s, d.descriptor, imm=None).wait(TIMEOUT)
    assert raw(dst) == raw(src), dtype
    print(dtype, "registered via", s.source)


def test_dlpack_versions_and_the_data_ptr_path(pair):
    a, _ = pair
    t = torch.arange(1000, dtype=torch.int32)
    try:
        t.__dlpack__(max_version=(1, 0))
        versioned = True
    except TypeError:
        versioned = False
    assert a.register(t).source == ("dlpack_versioned" if versioned else "dlpack")
    # A tensor that needs grad refuses DLPack; its data_ptr() is used.
    g = torch.ones(256, requires_grad=True)
    region = a.register(g)
    assert region.source == "data_ptr" and region.nbytes == 1024
    # A look-alike with data_ptr()/nbytes only.

    class Lookalike:
        def __init__(self, t):
            self.t = t
            self.nbytes = t.numel() * t.element_size()
            self.device = t.device

        def data_ptr(self):
            return self.t.data_ptr()

        def is_contiguous(self):
            return True

    look = Lookalike(torch.zeros(64, dtype=torch.float64))
    assert a.register(look).source == "data_ptr"


def test_views_with_storage_offsets_and_refusals(pair):
    a, b = pair
    base = torch.zeros(4096, dtype=torch.uint8)
    view = base[1000:3000]
    assert view.storage_offset() == 1000
    dst = b.register(view, remote="write")
    src_t = random_tensor(torch.uint8, 2000, seed=3)
    a.write(a.register(src_t), dst.descriptor).wait(TIMEOUT)
    assert torch.equal(base[1000:3000], src_t)
    assert base[:1000].eq(0).all() and base[3000:].eq(0).all()
    # A 2-D slice of rows is contiguous; a transposed tensor is not.
    rows = torch.zeros(16, 64)[4:8]
    assert a.register(rows).nbytes == 4 * 64 * 4
    with pytest.raises(strait.UnsupportedObjectError, match="contiguous"):
        a.register(torch.zeros(16, 64).t())
    with pytest.raises(strait.UnsupportedObjectError):
        a.register(torch.zeros(16, 64)[:, ::2])


def test_registered_tensors_are_kept_alive(pair):
    a, b = pair
    t = torch.full((1 << 16,), 7, dtype=torch.uint8)
    alive = weakref.ref(t)
    dst = b.register(t, remote="write")
    descriptor = dst.descriptor
    del t
    gc.collect()
    assert alive() is not None, "the region must keep its tensor alive"
    src = a.register(torch.full((1 << 16,), 9, dtype=torch.uint8))
    a.write(src, descriptor).wait(TIMEOUT)
    assert bool((alive() == 9).all())
    dst.close()
    del dst
    gc.collect()
    for _ in range(100):
        if alive() is None:
            break
        time.sleep(0.01)
        gc.collect()
    assert alive() is None, "a closed region must let its tensor go"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, provider: str, script=EXAMPLE, extra=()):
    """Runs `script` as `world` ranks with the variables torchrun sets."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            GROUP_RANK="0",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "--provider", provider, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out))
    return outs


@pytest.mark.parametrize("world,provider", [(2, "tcp"), (4, "tcp"), (2, "shm")])
def test_process_groups_exchange_and_write(world, provider):
    outs = launch(world, provider, extra=("--mib", "1"))
    for rank, (rc, out) in enumerate(outs):
        assert rc == 0, f"rank {rank}:\n{out}"
        assert f"rank {rank} of {world}" in out and "all byte-exact" in out, out


def test_torchrun_runs_the_example():
    port = free_port()
    r = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(EXAMPLE), "--mib", "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        assert f"rank {rank} of 2" in r.stdout + r.stderr


STORE_PEER = r"""
import sys, torch, strait, strait.distributed as sd
from datetime import timedelta
role, port = sys.argv[1], int(sys.argv[2])
store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
with strait.TransferEngine("tcp", interface="lo") as engine:
    if role == "inference":
        weights = torch.zeros(1 << 20, dtype=torch.bfloat16)
        region = engine.register(weights, remote="write")
        arrived = engine.expect_imm(5)
        sd.publish_address(store, "inference/0", engine)
        sd.publish_descriptor(store, "inference/0/weights", region)
        arrived.wait(60)
        ok = bool((weights == 1.5).all())
        store.set("strait-test/checked", "ok" if ok else "bad")
        print("inference: weights", "ok" if ok else "differ", flush=True)
    else:
        dst = sd.fetch_descriptor(store, "inference/0/weights", timeout=60)
        assert sd.fetch_address(store, "inference/0", timeout=60)
        src = engine.register(torch.full((1 << 20,), 1.5, dtype=torch.bfloat16))
        engine.write(src, dst, imm=5).wait(60)
        store.wait(["strait-test/checked"], timedelta(seconds=60))
        print("trainer: wrote", flush=True)
"""


def test_store_helpers_between_jobs_without_a_group(tmp_path):
    from datetime import timedelta

    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=60))
    script = tmp_path / "peer.py"
    script.write_text(STORE_PEER)
    procs = [
        subprocess.Popen([sys.executable, str(script), role, str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for role in ("inference", "trainer")
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert store.get("strait-test/checked") == b"ok"
    assert "weights ok" in outs[0]
    # A name nobody publishes times out, as strait.TimeoutError.
    started = time.monotonic()
    with pytest.raises(strait.TimeoutError, match="never/published"):
        sd.fetch(store, "never/published", timeout=0.5)
    assert time.monotonic() - started < 10
    sd.publish(store, "raw/key", b"\x00\x01bytes")
    assert sd.fetch(store, "raw/key", timeout=5) == b"\x00\x01bytes"


def test_kv_with_torch_tensors(provider):
    layers, blocks, bt, heads, dim = 3, 8, 4, 2, 16
    with engine(provider) as pe, engine(provider) as de:
        g = torch.Generator().manual_seed(5)
        src = [torch.randn(2, blocks, bt, heads, dim, generator=g).to(torch.bfloat16) for _ in range(layers)]
        dst = [torch.zeros(2, blocks, bt, heads, dim, dtype=torch.bfloat16) for _ in range(layers)]
        layout = kv.layout_of(src, "vllm")
        assert layout.elem_bytes == 2 and layout.head_stride == dim * 2
        pcache, dcache = kv.register(pe, src, "vllm"), kv.register(de, dst, "vllm")
        src_blocks = torch.tensor([5, 1, 6], dtype=torch.int64)
        dst_blocks = torch.tensor([0, 7, 3], dtype=torch.int32)
        recv = dcache.expect([pcache.descriptor], dst_blocks)
        send = pcache.push(recv.request, dcache.descriptor, src_blocks)
        send.send_layers(0, layers)
        recv.wait(TIMEOUT)
        send.wait(TIMEOUT)
        for layer in range(layers):
            for i in range(3):
                assert torch.equal(dst[layer][:, dst_blocks[i]], src[layer][:, src_blocks[i]])
            untouched = [b for b in range(blocks) if b not in dst_blocks.tolist()]
            assert dst[layer][:, untouched].eq(0).all()


def test_moe_with_torch_tensors(provider):
    shape = dict(ranks=2, experts=4, top_k=2, max_tokens=16, hidden=32)
    engines = [engine(provider) for _ in range(2)]
    try:
        ranks = [moe.Rank(e, rank=r, dtype="bf16", timeout=TIMEOUT, **shape) for r, e in enumerate(engines)]
        groups = [r.connect([x.descriptor for x in ranks]) for r in ranks]
        results, errors = [None, None], []

        def body(r):
            try:
                g = torch.Generator().manual_seed(r)
                x = torch.randint(-16, 16, (16, 32), generator=g).to(torch.bfloat16)
                idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(16)]).to(torch.int64)
                w = torch.full((16, 2), 0.5)
                expert_x, counts, handle = groups[r].dispatch(x, idx, w)
                assert isinstance(expert_x, torch.Tensor) and expert_x.dtype == torch.bfloat16
                assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int32
                for e in range(2):
                    for j in range(int(counts[e])):
                        s, t, k = handle.source(e, j)
                        if s == r:  # this rank's own tokens: their routing is known here
                            assert int(idx[t, k]) == r * 2 + e
                expert_x *= 2  # the experts, in place
                y = groups[r].combine(expert_x, handle)
                assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (16, 32)
                results[r] = torch.equal(y, x * 2)  # weights 0.5 + 0.5, values exact in bf16
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        assert results == [True, True]
    finally:
        for e in engines:
            e.shutdown()
