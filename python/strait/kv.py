"""KV-cache transfer for disaggregated prefill/decode.

A decode rank allocates blocks for a request and expects its KV; the
prefill ranks write each layer into those blocks as soon as it is computed
(push), or say it is ready and the decoder reads it (pull). Each request
ends in exactly one outcome on each side; once the decoder's outcome is
reported, whatever it is, no write of the request can land in its blocks.

The caches are described, never guessed: :func:`layout_of` reads the
layout (shape, byte strides, element size) from the tensors themselves,
numpy arrays or PyTorch CPU tensors, and :func:`register` registers them::

    import strait, strait.kv

    # Decode rank: vLLM flash-attention layout, one tensor per layer of
    # shape [2, blocks, block_tokens, kv_heads, head_dim].
    dcache = strait.kv.register(engine, kv_caches, "vllm")
    # ... send bytes(dcache.descriptor) to the prefill ranks once ...
    recv = dcache.expect([prefill_desc], dst_blocks)   # numpy, torch or list
    # ... send recv.request to every prefill rank ...
    recv.wait(timeout=30)        # or: await recv; recv.landed_layers()

    # Prefill rank:
    send = pcache.push(request, decode_desc, src_blocks)
    for layer in range(num_layers):
        ...                      # compute the layer
        send.send_layers(layer)  # one engine request, no work per block
    send.wait()

Heterogeneous tensor parallelism: build each rank's cache with
``rank``/``size`` and the model's ``total_heads``; the decoder lists every
sender rank's descriptor in rank order, and each rank moves only the heads
it shares with the decoder.

Errors: :class:`strait.LayoutMismatchError` (incompatible caches, nothing
posted), :class:`strait.AbortedError` (a sender failed, with its reason),
:class:`strait.PeerUnreachableError` (a peer died), :class:`strait.CancelledError`,
:class:`strait.TimeoutError`.
"""

from typing import Any, Optional, Sequence, Tuple, Union

from ._strait import KvCache, KvCacheDesc, KvLayout, KvRecv, KvSend

__all__ = ["KvCache", "KvCacheDesc", "KvLayout", "KvRecv", "KvSend", "FORMATS", "layout_of", "register"]

#: Axis order of one layer's tensor in each named format (``L`` marks the
#: leading layer axis of a pooled tensor, added in front).
FORMATS = {
    # vLLM flash-attention: [2, blocks, block_tokens, kv_heads, head_dim]
    "vllm": ("kv", "block", "token", "head", "dim"),
    # FlashInfer NHD: [blocks, 2, block_tokens, kv_heads, head_dim]
    "nhd": ("block", "kv", "token", "head", "dim"),
    # FlashInfer HND: [blocks, 2, kv_heads, block_tokens, head_dim]
    "hnd": ("block", "kv", "head", "token", "dim"),
    # MLA: [blocks, block_tokens, latent_dim]
    "mla": ("block", "token", "dim"),
}


def _geometry(t: Any) -> Tuple[Tuple[int, ...], Tuple[int, ...], int, str]:
    """(shape, byte strides, element size, dtype name) of a numpy array or
    a PyTorch tensor, read from the object."""
    shape = tuple(int(d) for d in t.shape)
    stride = getattr(t, "stride", None)
    if callable(stride):  # PyTorch: strides in elements
        item = int(t.element_size())
        strides = tuple(int(s) * item for s in stride())
    elif getattr(t, "strides", None) is not None:  # numpy: strides in bytes
        item = int(t.itemsize)
        strides = tuple(int(s) for s in t.strides)
    else:
        raise TypeError(f"cannot read the strides of a {type(t).__name__}: pass a numpy array or a torch tensor")
    return shape, strides, item, str(t.dtype)


def layout_of(
    tensors: Union[Sequence[Any], Any],
    format: str,
    *,
    total_heads: Optional[int] = None,
) -> KvLayout:
    """The layout of a KV cache, read from its tensors.

    ``tensors`` is either one tensor per layer (a list; every one of the
    same shape, strides and dtype) or one pooled tensor whose first axis is
    the layer. ``format`` names the axis order of a layer (see
    :data:`FORMATS`): ``"vllm"``, ``"nhd"``, ``"hnd"`` or ``"mla"``. Shape,
    strides and element size come from the objects, so views and padded
    strides are described as they are; the head dimension must be
    contiguous. ``total_heads`` is the model's KV head count when this rank
    holds a tensor-parallel share of them (default: the heads it holds).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {format!r}")
    axes = FORMATS[format]
    if isinstance(tensors, (list, tuple)):
        if not tensors:
            raise ValueError("no tensors")
        geometries = [_geometry(t) for t in tensors]
        first = geometries[0]
        for i, g in enumerate(geometries[1:], 1):
            if g != first:
                raise ValueError(f"layer {i}'s tensor differs from layer 0's (shape, strides, dtype): {g} vs {first}")
        shape, strides, item, _ = first
        layers, layer_stride = len(tensors), None
    else:
        shape, strides, item, _ = _geometry(tensors)
        if len(shape) != len(axes) + 1:
            raise ValueError(
                f"a pooled {format} cache has {len(axes) + 1} axes (layer first), this tensor has shape {shape}"
            )
        layers, layer_stride = shape[0], strides[0]
        shape, strides = shape[1:], strides[1:]
    if len(shape) != len(axes):
        raise ValueError(f"a {format} layer has {len(axes)} axes {axes}, this tensor has shape {shape}")
    dims = dict(zip(axes, shape))
    byte_strides = dict(zip(axes, strides))
    if byte_strides["dim"] != item and dims["dim"] > 1:
        raise ValueError(f"the head dimension must be contiguous (stride {byte_strides['dim']} bytes, element {item})")
    if format == "mla":
        layout = KvLayout(
            kind="mla",
            layers=layers,
            blocks=dims["block"],
            block_tokens=dims["token"],
            heads=1,
            head_dim=dims["dim"],
            elem_bytes=item,
            kv_stride=0,
            block_stride=byte_strides["block"],
            token_stride=byte_strides["token"],
            # One latent: any stride; the head's own span, as KvLayout.mla.
            head_stride=dims["dim"] * item,
            layer_stride=layer_stride,
        )
    else:
        if dims["kv"] != 2:
            raise ValueError(f"the K/V axis of a {format} layer has length 2, not {dims['kv']}")
        layout = KvLayout(
            kind="mha",
            layers=layers,
            blocks=dims["block"],
            block_tokens=dims["token"],
            heads=dims["head"],
            total_heads=total_heads,
            head_dim=dims["dim"],
            elem_bytes=item,
            kv_stride=byte_strides["kv"],
            block_stride=byte_strides["block"],
            token_stride=byte_strides["token"],
            head_stride=byte_strides["head"],
            layer_stride=layer_stride,
        )
    return layout


def register(
    engine: Any,
    tensors: Union[Sequence[Any], Any],
    format: Optional[str] = None,
    *,
    layout: Optional[KvLayout] = None,
    rank: int = 0,
    size: int = 1,
    total_heads: Optional[int] = None,
    heartbeat: float = 0.25,
) -> KvCache:
    """Registers a rank's KV cache with ``engine`` and returns its
    :class:`KvCache`.

    ``tensors`` as for :func:`layout_of`: one contiguous tensor per layer,
    or one pooled tensor. The layout is read from them with ``format``, or
    given as ``layout`` (for caches whose strides no named format has).
    Each tensor is registered whole with remote read and write access and
    kept alive by the cache. ``rank`` of ``size`` is the rank's
    tensor-parallel position, ``total_heads`` the model's KV heads (default
    ``heads * size``, the even split; pass it when heads are replicated).
    ``heartbeat`` (seconds): how often a quiet peer is pinged.
    """
    if layout is None:
        if format is None:
            raise ValueError("pass format= (\"vllm\", \"nhd\", \"hnd\", \"mla\") or layout=")
        if total_heads is None and format != "mla":
            heads = layout_of(tensors, format).heads
            total_heads = heads * size
        layout = layout_of(tensors, format, total_heads=total_heads)
    objects = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    regions = [engine.register(t, remote="read_write") for t in objects]
    return KvCache(engine, layout, regions, rank=rank, size=size, heartbeat=heartbeat)
