"""RL weight transfer: trainer ranks (sources) push new weights straight
into inference ranks' (destinations') tensors after each training step,
by a static plan computed once and replayed (see the Rust
``strait::weights`` docs for the protocol and its guarantees).

Each rank describes the tensors it holds or needs: a dict of name to a
contiguous CPU array or tensor (numpy, torch: this rank's share), and for
each split tensor its :class:`Share` (full shape and the range this rank
holds along one dimension); a tensor without a share is whole::

    import strait, strait.weights as w

    engine = strait.TransferEngine("tcp", interface="lo")
    # A trainer rank with FSDP dim-0 shards of a state dict:
    local, shares = w.shard_dict(state_dict, dim=0, rank=r, ranks=world)
    rank = w.Rank(engine, "source", r, local, shares)
    # An inference rank with tensor-parallel splits:
    #   rank = w.Rank(engine, "destination", r, params, {"o_proj": w.chunk((4096, 4096), 1, r, tp), ...})
    group = rank.connect_torch()          # all-gathers descriptors over torch.distributed
    group.push(step)                      # sources; group.wait(step) on destinations

A destination's tensors must stay registered (and unread) while a step is
in flight. ``push`` and ``wait`` release the GIL. A dead source fails its
destinations' ``wait`` within ``timeout`` seconds with
``strait.PeerUnreachableError`` naming its rank and the tensors it
writes; descriptions that cannot be planned raise
``strait.WeightsPlanError`` at ``connect``, naming the tensor and ranks.
"""

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from ._strait import WeightsGroup as _Group
from ._strait import WeightsRank as _Rank

__all__ = ["Share", "replicated", "split", "chunk", "shard", "shard_dict", "Rank", "Group"]


class Share(NamedTuple):
    """A rank's part of a tensor: the full ``shape``, and indices
    ``start:end`` of dimension ``dim`` (``dim`` -1: the whole tensor)."""

    shape: Tuple[int, ...]
    dim: int = -1
    start: int = 0
    end: int = 0

    def local_shape(self) -> Tuple[int, ...]:
        """The shape of this rank's share."""
        if self.dim < 0:
            return tuple(self.shape)
        s = list(self.shape)
        s[self.dim] = self.end - self.start
        return tuple(s)


def replicated(shape: Sequence[int]) -> Share:
    """The whole tensor."""
    return Share(tuple(int(x) for x in shape))


def split(shape: Sequence[int], dim: int, start: int, end: int) -> Share:
    """Indices ``start:end`` of dimension ``dim``."""
    return Share(tuple(int(x) for x in shape), int(dim), int(start), int(end))


def chunk(shape: Sequence[int], dim: int, rank: int, ranks: int) -> Share:
    """Part ``rank`` of ``ranks`` along ``dim``, cut as ``torch.chunk``
    cuts: parts of ``ceil(n / ranks)``, the last ones shorter or empty."""
    n = int(shape[dim])
    per = -(-n // max(1, ranks))
    start = min(per * rank, n)
    return split(shape, dim, start, min(start + per, n))


def shard(tensor: Any, dim: int, rank: int, ranks: int) -> Tuple[Any, Share]:
    """This rank's ``chunk`` of a full ``tensor`` (numpy or torch), as a
    contiguous copy, and its :class:`Share`."""
    s = chunk(tuple(tensor.shape), dim, rank, ranks)
    index = [slice(None)] * len(s.shape)
    index[dim] = slice(s.start, s.end)
    part = tensor[tuple(index)]
    if hasattr(part, "contiguous"):
        return part.contiguous().clone(), s
    import numpy as np

    return np.ascontiguousarray(part).copy(), s


def shard_dict(tensors: Mapping[str, Any], dim: int, rank: int, ranks: int) -> Tuple[Dict[str, Any], Dict[str, Share]]:
    """:func:`shard` of every tensor with more than ``dim`` dimensions;
    the others (scalars, 1-D norms when ``dim`` is 1) stay whole."""
    local, shares = {}, {}
    for name, t in tensors.items():
        if len(t.shape) > dim:
            local[name], shares[name] = shard(t, dim, rank, ranks)
        else:
            local[name] = t
    return local, shares


def _elem_bytes(obj: Any) -> int:
    if hasattr(obj, "element_size"):  # torch
        return int(obj.element_size())
    if hasattr(obj, "itemsize"):  # numpy
        return int(obj.itemsize)
    return memoryview(obj).itemsize


class Group:
    """A connected group, from :meth:`Rank.connect`."""

    def __init__(self, native: _Group, tensors: Dict[str, Any]):
        self._g = native
        self.tensors = tensors

    @property
    def role(self) -> str:
        """``"source"`` or ``"destination"``."""
        return self._g.role

    @property
    def rank(self) -> int:
        """This rank among its side's."""
        return self._g.rank

    @property
    def bytes_per_step(self) -> int:
        """Bytes this rank writes per step."""
        return self._g.bytes_per_step

    def push(self, step: int, prepare: Optional[Callable[[str], Any]] = None) -> None:
        """Pushes step ``step`` (larger than any pushed before) from this
        source: returns when every write has completed and every
        destination it writes to has its completion record.
        ``prepare(name)``, when given, runs just before a tensor's writes
        are posted and must leave its bytes in place (gather, cast,
        quantize); it runs at most the rank's ``watermark`` bytes ahead of
        the writes that have completed, so it overlaps the transfer."""
        self._g.push(step, prepare)

    def wait(self, step: int) -> None:
        """Waits until step ``step`` is complete in this destination's
        tensors (broadcast: and forwarded to the next destination)."""
        self._g.wait(step)


class Rank:
    """One rank of a weights group before it is connected.

    ``tensors`` maps each name to this rank's share (contiguous CPU memory:
    a numpy array, a torch tensor); ``shares`` gives the :class:`Share` of
    each split tensor (missing: the tensor is whole). A destination's
    tensors are registered for remote writes. Every rank of the group must
    use the same ``mode`` (``"direct"`` or ``"broadcast"``) and ``chunk``.
    """

    def __init__(
        self,
        engine: Any,
        role: str,
        rank: int,
        tensors: Mapping[str, Any],
        shares: Optional[Mapping[str, Share]] = None,
        *,
        mode: str = "direct",
        chunk: int = 4 << 20,
        timeout: float = 30.0,
        watermark: int = 256 << 20,
    ):
        shares = dict(shares or {})
        unknown = set(shares) - set(tensors)
        if unknown:
            from .errors import InvalidRequestError

            raise InvalidRequestError(f"shares for tensors not given: {sorted(unknown)}")
        remote = "write" if role == "destination" else None
        regions, specs = [], []
        for i, (name, t) in enumerate(tensors.items()):
            share = shares.get(name) or replicated(tuple(t.shape))
            if tuple(t.shape) != share.local_shape():
                from .errors import InvalidRequestError

                raise InvalidRequestError(
                    f"tensor {name!r}: the local tensor's shape {tuple(t.shape)} is not the share's {share.local_shape()}"
                )
            regions.append(engine.register(t, remote=remote))
            specs.append((name, _elem_bytes(t), list(share.shape), share.dim, share.start, share.end, i, 0))
        self.tensors = dict(tensors)
        self._r = _Rank(engine, role, rank, regions, specs, mode=mode, chunk=chunk, timeout=timeout, watermark=watermark)

    @property
    def descriptor(self) -> bytes:
        """The bytes every other rank needs."""
        return self._r.descriptor

    def connect(self, descriptors: Sequence[bytes]) -> Group:
        """Joins the group: ``descriptors`` holds every rank's (sources and
        destinations, this rank's own included), in any order."""
        return Group(self._r.connect(list(descriptors)), self.tensors)

    def connect_torch(self, group: Optional[Any] = None) -> Group:
        """:meth:`connect` with the descriptors all-gathered over
        ``torch.distributed`` (``group``: default the world; sources and
        destinations must all be members)."""
        from .distributed import all_gather_bytes

        return self.connect(all_gather_bytes(self.descriptor, group))
