"""GPU memory from Python: CUDA tensors as regions, streams waiting on
counters, stream triggers.

Without CUDA (this project's CI machine) the CUDA tests skip with the
reason `strait.cuda_info()` gives, and what can run without a GPU does:
the refusal of CUDA memory with `CudaError`, and the CPU side of triggers.
`scripts/device-check.sh` runs this file on a machine with a GPU and torch.
"""

import threading
import time

import pytest

import strait

INFO = strait.cuda_info()


def _torch_cuda():
    if not INFO["available"]:
        return None, INFO["reason"]
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    return torch, None


torch, WHY = _torch_cuda()
needs_gpu = pytest.mark.skipif(torch is None, reason=WHY or "")


def engine():
    return strait.TransferEngine("tcp", interface="lo")


def test_cuda_info_says_what_there_is():
    if INFO["available"]:
        assert INFO["gpus"] and INFO["driver"]
    else:
        assert INFO["reason"]
        print("CUDA unavailable:", INFO["reason"])


class FakeCudaTensor:
    """What registration sees of a CUDA tensor without __dlpack__."""

    class device:
        type = "cuda"
        index = 0

    nbytes = 4096

    def data_ptr(self):
        return 0x7F0000000000

    def is_contiguous(self):
        return True


@pytest.mark.skipif(INFO["available"], reason="CUDA is present: the GPU tests cover registration")
def test_cuda_memory_without_cuda_is_a_cuda_error():
    e = engine()
    try:
        with pytest.raises(strait.CudaError, match="no CUDA"):
            e.register(FakeCudaTensor(), remote="write")
    finally:
        e.shutdown()


def test_a_host_trigger_calls_back_for_every_value():
    seen, cond = [], threading.Condition()

    def on_fire(v):
        with cond:
            seen.append(v)
            cond.notify_all()

    t = strait.StreamTrigger(on_fire, host=True)
    t.fire(2)
    with cond:
        assert cond.wait_for(lambda: len(seen) >= 2, timeout=10)
    assert seen == [1, 2]
    assert t.value == 2
    with pytest.raises(strait.CudaError):
        t.fire_on_stream(0, 3)
    t.close()


@needs_gpu
def test_cuda_tensors_register_and_move_between_engines():
    a, b = engine(), engine()
    try:
        n = 16 << 20
        src = torch.arange(n, dtype=torch.uint8, device="cuda").mul_(7)
        dst = torch.zeros(n, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        rs, rd = a.register(src), b.register(dst, remote="read_write")
        assert rd.via in ("dlpack", "dlpack_versioned", "data_ptr")
        counter = b.expect_imm(3)
        a.write(rs, rd.descriptor, imm=3).wait(timeout=30)
        counter.wait(timeout=30)
        assert torch.equal(src, dst)
        # And back by a read, into another CUDA tensor.
        back = torch.zeros_like(src)
        rb = a.register(back)
        a.read(rb, rd.descriptor).wait(timeout=30)
        assert torch.equal(back, src)
    finally:
        a.shutdown()
        b.shutdown()


@needs_gpu
def test_a_torch_stream_waits_on_a_counter():
    a, b = engine(), engine()
    try:
        dst = b.alloc(4096, remote="write")
        counter = b.expect_imm(4)
        stream = torch.cuda.Stream()
        counter.wait_on_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        time.sleep(0.2)
        assert not done.query(), "the stream went on before the immediate"
        a.write_imm(dst.descriptor, 4).wait(timeout=30)
        deadline = time.monotonic() + 30
        while not done.query():
            assert time.monotonic() < deadline, "the stream was not released"
            time.sleep(0.0001)
    finally:
        a.shutdown()
        b.shutdown()


@needs_gpu
def test_a_torch_stream_fires_a_trigger():
    fired = threading.Event()
    t = strait.StreamTrigger(lambda v: fired.set())
    stream = torch.cuda.Stream()
    t.fire_on_stream(stream, 1)
    assert fired.wait(timeout=30)
    t.close()
