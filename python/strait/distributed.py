"""Exchanging engine addresses and descriptors through an existing
``torch.distributed`` process group, or through a ``torch.distributed``
store (``TCPStore``, ``FileStore``, ...) between jobs that share no group.

torch is imported only when one of these functions is called, so strait
itself never needs it. The group functions are collectives: every rank
calls the same one in the same order, as with any ``torch.distributed``
call. The store functions are not: one side publishes under a name, the
other fetches it (waiting for it, up to a timeout).

Example::

    import strait, strait.distributed
    engine = strait.TransferEngine()
    kv = engine.register(kv_cache, remote="write")
    addresses = strait.distributed.exchange_addresses(engine)
    descriptors = strait.distributed.exchange_descriptors(kv)
    # descriptors[r] is rank r's region: engine.write(src, descriptors[r], ...)
"""

from datetime import timedelta
from typing import Any, List, Optional, Union

#: Prefix of the keys the store helpers use.
KEY_PREFIX = "strait/"


def _dist():
    try:
        import torch.distributed as dist
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("strait.distributed needs PyTorch (torch.distributed)") from e
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("strait.distributed needs an initialised torch.distributed process group")
    return dist


def all_gather_bytes(value: bytes, group: Optional[Any] = None) -> List[bytes]:
    """Gathers ``value`` from every rank of ``group`` (default: the world);
    element ``r`` of the result is rank ``r``'s."""
    dist = _dist()
    gathered: List[Optional[bytes]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, bytes(value), group=group)
    return [bytes(v) for v in gathered]  # type: ignore[arg-type]


def exchange_addresses(engine: Any, group: Optional[Any] = None) -> List[bytes]:
    """Every rank's ``engine.address``, indexed by rank."""
    return all_gather_bytes(engine.address, group)


def exchange_descriptors(region: Union[Any, bytes], group: Optional[Any] = None) -> List[bytes]:
    """Every rank's descriptor of ``region`` (a ``strait.Region``, or
    descriptor bytes), indexed by rank."""
    descriptor = region if isinstance(region, (bytes, bytearray)) else region.descriptor
    return all_gather_bytes(descriptor, group)


def publish(store: Any, key: str, value: bytes) -> None:
    """Stores ``value`` under ``key`` (prefixed with :data:`KEY_PREFIX`)
    in ``store``, a ``torch.distributed.Store``."""
    store.set(KEY_PREFIX + key, bytes(value))


def fetch(store: Any, key: str, timeout: float = 300.0) -> bytes:
    """The bytes published under ``key``, waiting up to ``timeout`` seconds
    for them; ``strait.TimeoutError`` if they do not appear."""
    from .errors import TimeoutError as StraitTimeout

    full = KEY_PREFIX + key
    try:
        store.wait([full], timedelta(seconds=timeout))
    except Exception as e:  # torch raises RuntimeError / DistStoreError subclasses
        if "timeout" in str(e).lower() or "timed out" in str(e).lower():
            raise StraitTimeout(f"{full!r} was not published within {timeout} s") from e
        raise
    return bytes(store.get(full))


def publish_address(store: Any, name: str, engine: Any) -> None:
    """Publishes ``engine.address`` as ``name`` (e.g. ``"inference/3"``)."""
    publish(store, "address/" + name, engine.address)


def fetch_address(store: Any, name: str, timeout: float = 300.0) -> bytes:
    """The address published as ``name``, waiting up to ``timeout`` s."""
    return fetch(store, "address/" + name, timeout)


def publish_descriptor(store: Any, name: str, region: Union[Any, bytes]) -> None:
    """Publishes the descriptor of ``region`` (a ``strait.Region`` or
    descriptor bytes) as ``name``."""
    descriptor = region if isinstance(region, (bytes, bytearray)) else region.descriptor
    publish(store, "descriptor/" + name, descriptor)


def fetch_descriptor(store: Any, name: str, timeout: float = 300.0) -> bytes:
    """The descriptor published as ``name``, waiting up to ``timeout`` s."""
    return fetch(store, "descriptor/" + name, timeout)
