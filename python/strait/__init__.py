"""strait: point-to-point RDMA transfers for LLM systems, from Python.

One-sided write-with-immediate, reads and two-sided sends between
``TransferEngine``\\ s over libfabric (AWS EFA in production; ``tcp`` and
``shm`` on any Linux machine). Register numpy arrays, PyTorch CPU tensors or
any buffer, hand the region's ``descriptor`` (bytes) to the peer by any
means, and write into it; the peer learns that the bytes have landed from
the immediate::

    import numpy as np, strait

    with strait.TransferEngine("tcp", interface="lo") as a, \\
         strait.TransferEngine("tcp", interface="lo") as b:
        inbox = np.zeros(1 << 20, dtype=np.uint8)
        dst = b.register(inbox, remote="write")
        arrived = b.expect_imm(7)

        data = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)[: 1 << 20]
        src = a.register(data)
        a.write(src, dst.descriptor, imm=7).wait()
        arrived.wait(timeout=5)

Every request returns a ``Transfer`` (``wait``, ``done``, callbacks,
``await``). Errors are the classes of ``strait.errors``, all derived from
``strait.Error``. Helpers for ``torch.distributed`` are in
``strait.distributed`` (torch is imported only when they are used); KV-cache
transfer for disaggregated prefill/decode is ``strait.kv``, expert-parallel
dispatch and combine ``strait.moe``, RL weight transfer ``strait.weights``.
"""

import atexit as _atexit

from . import _strait, errors
from ._strait import (
    PAGE_SIZE,
    Descriptor,
    ImmCounter,
    Region,
    ScatterTarget,
    Transfer,
    TransferEngine,
    __version__,
    probe,
    gpu_nic_map,
    cuda_info,
    StreamTrigger,
)
from .errors import (
    AbortedError,
    BackendUnavailableError,
    CancelledError,
    CudaError,
    Error,
    InvalidDescriptorError,
    InvalidRequestError,
    LayoutMismatchError,
    OutOfBoundsError,
    PeerUnreachableError,
    RegisterMemoryError,
    RemoteAccessError,
    ShutdownError,
    TimeoutError,
    TransportError,
    UnsupportedObjectError,
    WeightsPlanError,
    WouldDeadlockError,
)

__all__ = [
    "PAGE_SIZE",
    "Descriptor",
    "ImmCounter",
    "Region",
    "ScatterTarget",
    "Transfer",
    "TransferEngine",
    "probe",
    "gpu_nic_map",
    "cuda_info",
    "StreamTrigger",
    "errors",
    *errors.__all__,
]

# Engines still open at interpreter exit are shut down before Python
# finalises, so that their threads never call back into a dying interpreter.
_atexit.register(_strait._shutdown_all)


def __getattr__(name):
    if name in ("distributed", "kv", "moe"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'strait' has no attribute {name!r}")
