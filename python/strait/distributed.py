"""Exchanging engine addresses and descriptors through an existing
``torch.distributed`` process group.

torch is imported only when one of these functions is called, so strait
itself never needs it. Every rank must call the same function in the same
order (they are collectives), as with any ``torch.distributed`` call.

Example::

    import strait, strait.distributed
    engine = strait.TransferEngine()
    kv = engine.register(kv_cache, remote="write")
    addresses = strait.distributed.exchange_addresses(engine)
    descriptors = strait.distributed.exchange_descriptors(kv)
    # descriptors[r] is rank r's region: engine.write(src, descriptors[r], ...)
"""

from typing import Any, List, Optional, Union


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
