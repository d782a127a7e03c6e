"""The exceptions strait raises.

Every error from the engine is an instance of :class:`Error`. The subclasses
also derive from the closest built-in exception, so ``except TimeoutError``
and ``except ValueError`` work as a Python user expects. The mapping from the
Rust engine's error kinds to these classes lives in one place, the native
module's ``errors.rs``.
"""

import builtins

__all__ = [
    "Error",
    "BackendUnavailableError",
    "TransportError",
    "PeerUnreachableError",
    "RemoteAccessError",
    "TimeoutError",
    "InvalidRequestError",
    "OutOfBoundsError",
    "InvalidDescriptorError",
    "UnsupportedObjectError",
    "RegisterMemoryError",
    "ShutdownError",
    "CancelledError",
    "WouldDeadlockError",
    "LayoutMismatchError",
    "AbortedError",
    "WeightsPlanError",
    "CudaError",
]


class Error(Exception):
    """Base class of every strait error."""


class BackendUnavailableError(Error, RuntimeError):
    """The transport library (libfabric) or the provider asked for is not
    present on this machine; the message says what was searched and how to
    install it."""


class TransportError(Error):
    """The transport reported an error for a request (a failed completion or
    a failed libfabric call)."""


class PeerUnreachableError(TransportError, ConnectionError):
    """The peer cannot be reached: connection refused or reset, dead
    process."""


class RemoteAccessError(TransportError, PermissionError):
    """The peer's region does not allow the access: no remote-write or
    remote-read permission, or a key that is wrong or revoked."""


class TimeoutError(Error, builtins.TimeoutError):
    """A wait ran past its deadline. The request or counter carries on: wait
    again, or drop it."""


class InvalidRequestError(Error, ValueError):
    """A request's arguments are inconsistent; nothing was posted."""


class OutOfBoundsError(InvalidRequestError, IndexError):
    """An offset or length falls outside a region (or overflows); nothing was
    posted."""


class InvalidDescriptorError(InvalidRequestError):
    """Descriptor or address bytes that do not decode: truncated, corrupt,
    wrong version or for another provider."""


class UnsupportedObjectError(InvalidRequestError, TypeError):
    """An object that cannot be registered: it exposes neither
    ``__dlpack__``, the buffer protocol, nor ``data_ptr()``/``nbytes``, or its
    memory is not contiguous."""


class RegisterMemoryError(Error):
    """Registering memory failed: null, empty or unmapped memory, device
    memory this build cannot register, or a provider refusal."""


class ShutdownError(Error):
    """The engine shut down before the request ended, or was already shut
    down."""


class CancelledError(Error):
    """The awaited immediate counter was cancelled."""


class WouldDeadlockError(Error, RuntimeError):
    """The call would block the engine's worker thread on itself (for
    example registering memory from a completion callback)."""


class LayoutMismatchError(InvalidRequestError):
    """The two sides of a KV transfer have incompatible caches (element
    size, head dim, layer count, tensor-parallel split): the message names
    the field and both values. Nothing was posted."""


class AbortedError(Error):
    """A request was given up with a reason: the peer (a KV sender that
    failed, naming itself and why) or this side."""


class WeightsPlanError(InvalidRequestError):
    """The sources' and destinations' weight descriptions cannot be
    planned: a tensor on one side only, a shape or element-size mismatch,
    overlapping shares, or bytes no source holds. The message names the
    tensor and the ranks; nothing was transferred."""


class CudaError(Error, RuntimeError):
    """CUDA is unavailable here (no driver: the message says why; device
    memory cannot be registered), or a CUDA call failed (the message names
    it)."""
