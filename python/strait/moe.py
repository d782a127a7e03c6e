"""Expert-parallel MoE dispatch and combine (DeepEP low-latency's shape).

Every rank of a group holds ``experts / ranks`` experts. ``dispatch`` sends
each token's hidden state to the ranks of its top-k experts (a token goes
to a rank once, however many of its experts the rank holds) and returns
this rank's experts' rows, packed; ``combine`` sends the expert outputs
back and sums them per token, weighted, in float32::

    import numpy as np, strait, strait.moe

    engine = strait.TransferEngine("tcp", interface="lo")
    rank = strait.moe.Rank(engine, rank=r, ranks=4, experts=32, top_k=4,
                           max_tokens=128, hidden=7168, dtype="bf16")
    descs = strait.distributed.all_gather_bytes(rank.descriptor)   # or any channel
    group = rank.connect(descs)
    expert_x, counts, handle = group.dispatch(x, topk_idx, topk_weights)
    # expert_x: [local_experts, capacity, hidden]; rows 0..counts[e] of expert e
    y = group.combine(expert_y, handle)                             # [tokens, hidden]

``x`` is ``[tokens, hidden]`` of float32, or bfloat16 held as uint16 (or
``ml_dtypes.bfloat16``, or a torch bf16 CPU tensor); ``topk_idx`` is
``[tokens, top_k]`` of integers (-1: no expert), ``topk_weights`` the same
shape of floats. Every rank calls every method in the same order. A rank
that died or went quiet fails the others' call within ``timeout`` seconds
with ``strait.PeerUnreachableError`` naming it; the group then refuses
further calls (build a new one). The GIL is released during each call.
"""

from typing import Any, Sequence, Tuple

from ._strait import MoeGroup as _Group
from ._strait import MoeHandle as Handle
from ._strait import MoeRank as _Rank

__all__ = ["Rank", "Group", "Handle"]


def _np():
    import numpy as np

    return np


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _torch_of(a: Any) -> Any:
    """A torch tensor sharing numpy array ``a``'s memory (uint16 as bf16)."""
    import torch

    np = _np()
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _array(obj: Any) -> Any:
    """A numpy view of a numpy array or a CPU torch tensor."""
    np = _np()
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # torch
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(obj)


class Group:
    """A connected group, from :meth:`Rank.connect`."""

    def __init__(self, native: _Group, dtype: str):
        self._g = native
        self._dtype = dtype
        ranks, experts, top_k, max_tokens, hidden, token_bytes = native.shape
        self.ranks, self.experts, self.top_k = ranks, experts, top_k
        self.max_tokens, self.hidden, self.token_bytes = max_tokens, hidden, token_bytes
        self.local_experts = experts // ranks

    @property
    def rank(self) -> int:
        return self._g.rank

    def _elem(self):
        np = _np()
        return np.float32 if self._dtype == "f32" else np.uint16

    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any) -> Tuple[Any, Any, Handle]:
        """Returns ``(expert_x, counts, handle)``: ``expert_x`` is
        ``[local_experts, capacity, token_bytes / element]`` of ``x``'s
        dtype (rows past ``counts[e]`` are zero), ``counts`` int32
        ``[local_experts]``. Both are numpy arrays, or CPU torch tensors
        when ``x`` is a torch tensor (bf16 for bf16); they own their memory
        and may be written (e.g. the experts' outputs in place)."""
        np = _np()
        xa = np.ascontiguousarray(_array(x))
        idx = np.ascontiguousarray(_array(topk_idx), dtype=np.int32)
        w = np.ascontiguousarray(_array(topk_weights), dtype=np.float32)
        raw, counts, capacity, handle = self._g.dispatch(xa, idx, w)
        item = xa.dtype.itemsize if xa.size else np.dtype(self._elem()).itemsize
        out = np.frombuffer(raw, dtype=xa.dtype if xa.size else self._elem())
        out = out.reshape(self.local_experts, capacity, self.token_bytes // item)
        counts = np.asarray(counts, dtype=np.int32)
        if _is_torch(x):
            return _torch_of(out), _torch_of(counts), handle
        return out, counts, handle

    def combine(self, expert_y: Any, handle: Handle) -> Any:
        """``y[t] = sum_k topk_weights[t, k] * expert_y[row of (t, k)]``,
        ``[tokens, hidden]`` in the group's dtype: a numpy array (bf16 as
        uint16), or a CPU torch tensor (bf16 as bf16) when ``expert_y`` is
        a torch tensor."""
        np = _np()
        ya = np.ascontiguousarray(_array(expert_y))
        raw = self._g.combine(ya, handle)
        y = np.frombuffer(raw, dtype=self._elem()).reshape(handle.tokens, self.hidden)
        return _torch_of(y) if _is_torch(expert_y) else y


class Rank:
    """One rank before the group is connected.

    ``Rank(engine, rank=, ranks=, experts=, top_k=, max_tokens=, hidden=,
    dtype="bf16" | "f32", token_bytes=None, capacity=None, timeout=10.0)``:
    ``token_bytes`` defaults to ``hidden`` elements of ``dtype`` (pass more
    for fp8 payloads with scales); ``capacity`` is the receive pool in
    tokens (default ``2 * max_tokens * top_k``; more arriving is taken in
    rounds). ``memory`` gives the bytes of the regions.
    """

    def __init__(self, engine: Any, **kwargs: Any):
        self._dtype = "f32" if kwargs.get("dtype", "bf16") in ("f32", "float32") else "bf16"
        self._r = _Rank(engine, **kwargs)

    @property
    def descriptor(self) -> bytes:
        return self._r.descriptor

    @property
    def memory(self) -> dict:
        return self._r.memory

    def connect(self, descriptors: Sequence[bytes]) -> Group:
        """``descriptors[r]``: rank ``r``'s :attr:`descriptor`, this rank's
        own included."""
        return Group(self._r.connect([bytes(d) for d in descriptors]), self._dtype)

