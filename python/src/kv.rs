//! `strait.kv`'s native classes: `KvLayout`, `KvCacheDesc`, `KvCache`,
//! `KvRecv` and `KvSend`, thin over `strait::kv`.
//!
//! Building a layout from tensors (shape and strides read from the
//! objects) is Python, in `strait/kv.py`; everything that touches the
//! engine is here. Every call into the KV machinery releases the GIL first:
//! its threads (the engine's worker, the cache's monitor) call back into
//! Python for `add_done_callback`, and must never wait for a lock held by a
//! thread that holds the GIL.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::{Region, TransferEngine};
use crate::errors::{raise, to_py, IntoPy};
use crate::export::u32s;
use crate::handles::{blocking_until, parse_timeout};

fn kind_name(kind: strait::kv::KvKind) -> &'static str {
    match kind {
        strait::kv::KvKind::Mha => "mha",
        strait::kv::KvKind::Mla => "mla",
    }
}

/// One rank's KV cache layout: dimensions and byte strides.
///
/// The bytes of (layer, K or V, block, token, head) are `head_dim *
/// elem_bytes` contiguous bytes at `layer base + kv * kv_stride + block *
/// block_stride + token * token_stride + head * head_stride` (strides in
/// bytes). The layer base is 0 in the layer's own tensor, or `layer *
/// layer_stride` in one pooled tensor (`layer_stride` given). The named
/// constructors give the common engines' layouts; `strait.kv.layout_of`
/// reads one from the tensors themselves.
#[pyclass(module = "strait._strait", frozen, eq, skip_from_py_object)]
#[derive(Clone, PartialEq)]
pub struct KvLayout {
    pub(crate) inner: strait::kv::KvLayout,
}

fn shape(
    layers: u32,
    blocks: u32,
    block_tokens: u32,
    heads: u32,
    head_dim: u32,
    elem_bytes: u32,
    total_heads: Option<u32>,
) -> strait::kv::KvShape {
    strait::kv::KvShape {
        layers,
        blocks,
        block_tokens,
        heads,
        total_heads: total_heads.unwrap_or(heads),
        head_dim,
        elem_bytes,
    }
}

#[pymethods]
impl KvLayout {
    /// A layout from explicit byte strides. `kind` is `"mha"` (K and V) or
    /// `"mla"` (one latent; `heads = total_heads = 1`, `kv_stride` 0).
    #[new]
    #[pyo3(signature = (
        *, kind="mha", layers, blocks, block_tokens, heads, head_dim, elem_bytes, kv_stride,
        block_stride, token_stride, head_stride, total_heads=None, layer_stride=None
    ))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn new(
        py: Python<'_>,
        kind: &str,
        layers: u32,
        blocks: u32,
        block_tokens: u32,
        heads: u32,
        head_dim: u32,
        elem_bytes: u32,
        kv_stride: u64,
        block_stride: u64,
        token_stride: u64,
        head_stride: u64,
        total_heads: Option<u32>,
        layer_stride: Option<u64>,
    ) -> PyResult<Self> {
        let kind = match kind {
            "mha" => strait::kv::KvKind::Mha,
            "mla" => strait::kv::KvKind::Mla,
            other => {
                return Err(raise(py, "InvalidRequestError", format!("kind must be \"mha\" or \"mla\", not {other:?}")))
            }
        };
        let inner = strait::kv::KvLayout {
            kind,
            layers,
            blocks,
            block_tokens,
            heads,
            total_heads: total_heads.unwrap_or(heads),
            head_dim,
            elem_bytes,
            tensors: match layer_stride {
                None => strait::kv::KvTensors::PerLayer,
                Some(layer_stride) => strait::kv::KvTensors::Pool { layer_stride },
            },
            kv_stride,
            block_stride,
            token_stride,
            head_stride,
        };
        Ok(KvLayout { inner })
    }

    /// vLLM flash-attention: per layer `[2, blocks, block_tokens, heads,
    /// head_dim]`, contiguous.
    #[staticmethod]
    #[pyo3(signature = (*, layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads=None))]
    fn vllm_flash(
        layers: u32,
        blocks: u32,
        block_tokens: u32,
        heads: u32,
        head_dim: u32,
        elem_bytes: u32,
        total_heads: Option<u32>,
    ) -> Self {
        let s = shape(layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads);
        KvLayout { inner: strait::kv::KvLayout::vllm_flash(s) }
    }

    /// FlashInfer NHD: per layer `[blocks, 2, block_tokens, heads,
    /// head_dim]`, contiguous.
    #[staticmethod]
    #[pyo3(signature = (*, layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads=None))]
    fn flashinfer_nhd(
        layers: u32,
        blocks: u32,
        block_tokens: u32,
        heads: u32,
        head_dim: u32,
        elem_bytes: u32,
        total_heads: Option<u32>,
    ) -> Self {
        let s = shape(layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads);
        KvLayout { inner: strait::kv::KvLayout::flashinfer_nhd(s) }
    }

    /// FlashInfer HND: per layer `[blocks, 2, heads, block_tokens,
    /// head_dim]`, contiguous.
    #[staticmethod]
    #[pyo3(signature = (*, layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads=None))]
    fn flashinfer_hnd(
        layers: u32,
        blocks: u32,
        block_tokens: u32,
        heads: u32,
        head_dim: u32,
        elem_bytes: u32,
        total_heads: Option<u32>,
    ) -> Self {
        let s = shape(layers, blocks, block_tokens, heads, head_dim, elem_bytes, total_heads);
        KvLayout { inner: strait::kv::KvLayout::flashinfer_hnd(s) }
    }

    /// MLA: per layer `[blocks, block_tokens, latent_dim]`, contiguous, the
    /// same on every tensor-parallel rank.
    #[staticmethod]
    #[pyo3(signature = (*, layers, blocks, block_tokens, latent_dim, elem_bytes))]
    fn mla(layers: u32, blocks: u32, block_tokens: u32, latent_dim: u32, elem_bytes: u32) -> Self {
        KvLayout { inner: strait::kv::KvLayout::mla(layers, blocks, block_tokens, latent_dim, elem_bytes) }
    }

    /// The same layout with every layer in one tensor, one layer after the
    /// other.
    fn pooled(&self) -> Self {
        KvLayout { inner: self.inner.pooled() }
    }

    /// Checks the layout for tensor-parallel rank `rank` of `size`
    /// (`InvalidRequestError` saying what is wrong).
    #[pyo3(signature = (rank=0, size=1))]
    fn validate(&self, py: Python<'_>, rank: u32, size: u32) -> PyResult<()> {
        let tp = strait::kv::Tp::new(rank, size).py(py)?;
        self.inner.validate(tp).py(py)
    }

    /// Byte offset of (layer, kv, block, token, head) in its tensor.
    fn offset(&self, layer: u32, kv: u32, block: u32, token: u32, head: u32) -> u64 {
        self.inner.offset(layer, kv, block, token, head)
    }

    /// Which tensor holds `layer`, and the byte offset of its base there.
    fn layer_base(&self, layer: u32) -> (usize, u64) {
        self.inner.layer_base(layer)
    }

    #[getter]
    fn kind(&self) -> &'static str {
        kind_name(self.inner.kind)
    }
    #[getter]
    fn layers(&self) -> u32 {
        self.inner.layers
    }
    #[getter]
    fn blocks(&self) -> u32 {
        self.inner.blocks
    }
    #[getter]
    fn block_tokens(&self) -> u32 {
        self.inner.block_tokens
    }
    #[getter]
    fn heads(&self) -> u32 {
        self.inner.heads
    }
    #[getter]
    fn total_heads(&self) -> u32 {
        self.inner.total_heads
    }
    #[getter]
    fn head_dim(&self) -> u32 {
        self.inner.head_dim
    }
    #[getter]
    fn elem_bytes(&self) -> u32 {
        self.inner.elem_bytes
    }
    #[getter]
    fn kv_stride(&self) -> u64 {
        self.inner.kv_stride
    }
    #[getter]
    fn block_stride(&self) -> u64 {
        self.inner.block_stride
    }
    #[getter]
    fn token_stride(&self) -> u64 {
        self.inner.token_stride
    }
    #[getter]
    fn head_stride(&self) -> u64 {
        self.inner.head_stride
    }
    /// Bytes between layers in a pooled tensor; `None` for one tensor per
    /// layer.
    #[getter]
    fn layer_stride(&self) -> Option<u64> {
        match self.inner.tensors {
            strait::kv::KvTensors::PerLayer => None,
            strait::kv::KvTensors::Pool { layer_stride } => Some(layer_stride),
        }
    }
    /// Tensors the cache has: one per layer, or 1.
    #[getter]
    fn tensor_count(&self) -> usize {
        self.inner.tensor_count()
    }
    /// Bytes each tensor must have at least.
    #[getter]
    fn tensor_bytes(&self) -> u64 {
        self.inner.tensor_bytes()
    }
    /// Bytes of one layer's K and V (all blocks).
    #[getter]
    fn layer_bytes(&self) -> u64 {
        self.inner.layer_bytes()
    }

    fn __repr__(&self) -> String {
        let l = &self.inner;
        format!(
            "<strait.kv.KvLayout {} {} layers x {} blocks x {} tokens, {}/{} heads x {} x {} B, strides kv={} \
             block={} token={} head={}{}>",
            kind_name(l.kind),
            l.layers,
            l.blocks,
            l.block_tokens,
            l.heads,
            l.total_heads,
            l.head_dim,
            l.elem_bytes,
            l.kv_stride,
            l.block_stride,
            l.token_stride,
            l.head_stride,
            match l.tensors {
                strait::kv::KvTensors::PerLayer => String::new(),
                strait::kv::KvTensors::Pool { layer_stride } => format!(" layer={layer_stride} (pooled)"),
            }
        )
    }
}

/// A rank's cache as its peers see it: the layout, the tensor-parallel
/// position and one descriptor per tensor. `KvCacheDesc(data)` validates
/// the bytes a peer sent; `bytes(d)` gives them back. Anything that takes
/// one also takes the bytes.
#[pyclass(module = "strait._strait", frozen, eq, skip_from_py_object)]
#[derive(Clone, PartialEq)]
pub struct KvCacheDesc {
    inner: strait::kv::KvCacheDesc,
}

#[pymethods]
impl KvCacheDesc {
    #[new]
    fn new(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(KvCacheDesc { inner: strait::kv::KvCacheDesc::from_bytes(data).py(py)? })
    }

    #[getter]
    fn layout(&self) -> KvLayout {
        KvLayout { inner: self.inner.layout }
    }

    /// `(rank, size)`.
    #[getter]
    fn tp(&self) -> (u32, u32) {
        (self.inner.tp.rank, self.inner.tp.size)
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
        let py = slf.py();
        let bytes = PyBytes::new(py, &slf.get().inner.to_bytes());
        pyo3::types::PyTuple::new(py, [slf.get_type().into_any(), pyo3::types::PyTuple::new(py, [bytes])?.into_any()])
    }

    fn __repr__(&self) -> String {
        format!(
            "<strait.kv.KvCacheDesc rank {} of {}, {} tensor(s) on {}>",
            self.inner.tp.rank,
            self.inner.tp.size,
            self.inner.tensors.len(),
            self.inner.owner()
        )
    }
}

fn cache_desc(arg: &Bound<'_, PyAny>) -> PyResult<strait::kv::KvCacheDesc> {
    let py = arg.py();
    if let Ok(d) = arg.cast::<KvCacheDesc>() {
        return Ok(d.get().inner.clone());
    }
    if let Ok(c) = arg.cast::<KvCache>() {
        return Ok(c.get().cache().descriptor().clone());
    }
    match arg.extract::<Vec<u8>>() {
        Ok(bytes) if !arg.is_instance_of::<pyo3::types::PyString>() => {
            strait::kv::KvCacheDesc::from_bytes(&bytes).py(py)
        }
        _ => Err(raise(
            py,
            "InvalidDescriptorError",
            format!("expected a KV cache descriptor (bytes or strait.kv.KvCacheDesc), got {}", arg.get_type().name()?),
        )),
    }
}

fn kv_request(arg: &Bound<'_, PyAny>) -> PyResult<strait::kv::KvRequest> {
    let py = arg.py();
    if let Ok(r) = arg.cast::<KvRecv>() {
        return Ok(r.get().recv().request().clone());
    }
    match arg.extract::<Vec<u8>>() {
        Ok(bytes) if !arg.is_instance_of::<pyo3::types::PyString>() => strait::kv::KvRequest::from_bytes(&bytes).py(py),
        _ => Err(raise(py, "InvalidDescriptorError", "expected a KV request (the bytes of KvRecv.request)")),
    }
}

/// A rank's registered KV cache (see `strait.kv.KvCache`, which registers
/// the tensors and builds this).
#[pyclass(module = "strait._strait", frozen)]
pub struct KvCache {
    inner: Option<strait::kv::KvCache>,
    /// The registered tensors' regions (they keep the tensors alive).
    regions: Vec<Py<Region>>,
}

impl Drop for KvCache {
    fn drop(&mut self) {
        // The last handle joins the cache's monitor thread, which may be
        // waiting for the GIL in a callback.
        drop_detached(self.inner.take());
    }
}

impl KvCache {
    fn cache(&self) -> &strait::kv::KvCache {
        self.inner.as_ref().expect("only Drop takes the cache")
    }
}

#[pymethods]
impl KvCache {
    /// A cache over `regions` (one registered region per layer, or one
    /// pool, with remote read and write access) or, with `regions=None`,
    /// over tensors the engine allocates (zeroed). `rank` of `size` is the
    /// rank's tensor-parallel position; `heartbeat` (seconds) how often a
    /// quiet peer is pinged.
    #[new]
    #[pyo3(signature = (engine, layout, regions=None, *, rank=0, size=1, heartbeat=0.25, message_slots=256))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn new(
        py: Python<'_>,
        engine: &TransferEngine,
        layout: &KvLayout,
        regions: Option<Vec<Py<Region>>>,
        rank: u32,
        size: u32,
        heartbeat: f64,
        message_slots: usize,
    ) -> PyResult<Self> {
        let tp = strait::kv::Tp::new(rank, size).py(py)?;
        let heartbeat = parse_timeout(py, Some(heartbeat))?.unwrap_or(Duration::from_millis(250));
        let config = strait::kv::KvConfig { heartbeat, message_slots };
        let e = engine.engine(py)?;
        let layout = layout.inner;
        let (inner, regions) = match regions {
            None => (py.detach(|| strait::kv::KvCache::alloc(&e, layout, tp, config)).py(py)?, Vec::new()),
            Some(list) => {
                let mrs = list.iter().map(|r| r.get().region(py)).collect::<PyResult<Vec<_>>>()?;
                (py.detach(|| strait::kv::KvCache::new(&e, layout, tp, mrs, config)).py(py)?, list)
            }
        };
        Ok(KvCache { inner: Some(inner), regions })
    }

    /// The descriptor peers need (bytes): exchange it once, at start-up.
    #[getter]
    fn descriptor<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.cache().descriptor().to_bytes())
    }

    #[getter]
    fn layout(&self) -> KvLayout {
        KvLayout { inner: *self.cache().layout() }
    }

    /// The registered regions the cache was built on (empty when the
    /// engine allocated its tensors).
    #[getter]
    fn regions(&self, py: Python<'_>) -> Vec<Py<Region>> {
        self.regions.iter().map(|r| r.clone_ref(py)).collect()
    }

    /// Expects a request into this rank's `dst_blocks` (in token order)
    /// from the ranks whose descriptors are `senders` (in rank order).
    /// Push by default: the senders write. With `src_blocks` it is a pull:
    /// this rank reads the senders' `src_blocks` once each layer is ready.
    /// `tokens` moves only the first `tokens` tokens (default: every token
    /// of the blocks); `timeout` (seconds) fails it if it has not completed
    /// by then. Send `KvRecv.request` to every sender rank.
    #[pyo3(signature = (senders, dst_blocks, *, src_blocks=None, tokens=None, timeout=None))]
    fn expect(
        &self,
        py: Python<'_>,
        senders: Vec<Bound<'_, PyAny>>,
        dst_blocks: &Bound<'_, PyAny>,
        src_blocks: Option<&Bound<'_, PyAny>>,
        tokens: Option<u64>,
        timeout: Option<f64>,
    ) -> PyResult<KvRecv> {
        let senders = senders.iter().map(cache_desc).collect::<PyResult<Vec<_>>>()?;
        let dst = u32s(dst_blocks, "dst_blocks")?;
        let src = src_blocks.map(|s| u32s(s, "src_blocks")).transpose()?;
        let mut e = match &src {
            None => strait::kv::KvExpect::push(&senders, &dst),
            Some(src) => strait::kv::KvExpect::pull(&senders, src, &dst),
        };
        e.tokens = tokens;
        e.timeout = parse_timeout(py, timeout)?;
        let recv = py.detach(|| self.cache().expect(&e)).py(py)?;
        Ok(KvRecv { inner: Some(recv) })
    }

    /// Starts a push request (`request`: the bytes the decoder's
    /// `KvRecv.request` gave) into the cache described by `decoder`, from
    /// this rank's `src_blocks` (in token order). Everything is checked
    /// here, before anything is posted. Then `send_layers` as layers are
    /// computed, or `send_all`.
    fn push(
        &self,
        py: Python<'_>,
        request: &Bound<'_, PyAny>,
        decoder: &Bound<'_, PyAny>,
        src_blocks: &Bound<'_, PyAny>,
    ) -> PyResult<KvSend> {
        let (request, decoder) = (kv_request(request)?, cache_desc(decoder)?);
        let src = u32s(src_blocks, "src_blocks")?;
        let send = py.detach(|| self.cache().push(&request, &decoder, &src)).py(py)?;
        Ok(KvSend { inner: Some(send) })
    }

    /// Serves a pull request: `send_layers` says which layers are ready to
    /// be read; the outcome comes once the decoder has released the blocks
    /// (its reads are done), or the request failed.
    fn serve_pull(&self, py: Python<'_>, request: &Bound<'_, PyAny>, decoder: &Bound<'_, PyAny>) -> PyResult<KvSend> {
        let (request, decoder) = (kv_request(request)?, cache_desc(decoder)?);
        let send = py.detach(|| self.cache().serve_pull(&request, &decoder)).py(py)?;
        Ok(KvSend { inner: Some(send) })
    }

    fn __repr__(&self) -> String {
        let d = self.cache().descriptor();
        format!(
            "<strait.kv.KvCache rank {} of {}, {} layers x {} blocks>",
            d.tp.rank, d.tp.size, d.layout.layers, d.layout.blocks
        )
    }
}

/// What `KvRecv` and `KvSend` share: their outcome.
trait Outcome {
    fn result(&self) -> Option<strait::Result<()>>;
    fn on_done(&self, f: impl FnOnce(&strait::Result<()>) + Send + 'static);
}

macro_rules! outcome {
    ($ty:ty) => {
        impl Outcome for $ty {
            fn result(&self) -> Option<strait::Result<()>> {
                <$ty>::result(self)
            }
            fn on_done(&self, f: impl FnOnce(&strait::Result<()>) + Send + 'static) {
                <$ty>::on_done(self, f)
            }
        }
    };
}
outcome!(strait::kv::KvRecv);
outcome!(strait::kv::KvSend);

fn exception<O: Outcome>(py: Python<'_>, o: &O) -> PyResult<Option<PyErr>> {
    match o.result() {
        None => Err(raise(py, "InvalidRequestError", "the request has no outcome yet")),
        Some(Ok(())) => Ok(None),
        Some(Err(e)) => Ok(Some(to_py(py, e))),
    }
}

/// Runs `callback(handle)` once `o` has its outcome: on the thread that
/// sets it (with the GIL), or now if it is set already. An exception it
/// raises goes to `sys.unraisablehook`.
fn add_done_callback<O: Outcome>(handle: &Bound<'_, PyAny>, o: &O, callback: Py<PyAny>) {
    let handle = handle.clone().unbind();
    let run = move |_: &strait::Result<()>| {
        Python::attach(|py| {
            if let Err(e) = callback.call1(py, (handle,)) {
                e.write_unraisable(py, Some(callback.bind(py)));
            }
        })
    };
    o.on_done(run);
}

/// Drops a KV handle with the GIL released: dropping an unfinished one
/// cancels it, which takes the request's lock, and the threads holding
/// that lock may be waiting for the GIL.
fn drop_detached<T: Send>(handle: Option<T>) {
    if handle.is_some() {
        Python::attach(|py| py.detach(|| drop(handle)));
    }
}

/// The decoder's side of a request (from `KvCache.expect`).
///
/// `request` is the bytes to send to every sender rank. `wait(timeout)`
/// blocks until the one outcome (GIL released): it returns once every
/// byte has landed, or raises `strait.CancelledError` (cancelled by either
/// side), `strait.AbortedError` (a sender failed, with its reason),
/// `strait.PeerUnreachableError` (a sender died) or `strait.TimeoutError`
/// (the request's own timeout). Whatever it is, once it is reported no
/// write of the request can still land: the blocks are free to reuse.
/// `landed_layers()` / `layer_landed(l)` show per-layer progress; `await`
/// works in asyncio. Dropping an unfinished handle cancels the request.
#[pyclass(module = "strait._strait", frozen)]
pub struct KvRecv {
    inner: Option<strait::kv::KvRecv>,
}

impl KvRecv {
    fn recv(&self) -> &strait::kv::KvRecv {
        self.inner.as_ref().expect("only Drop takes the handle")
    }
}

#[pymethods]
impl KvRecv {
    /// The request's bytes, to hand to every sender rank.
    #[getter]
    fn request<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.recv().request().to_bytes())
    }

    /// The request's id (unique per decoder).
    #[getter]
    fn id(&self) -> u64 {
        self.recv().request().id
    }

    /// Blocks until the outcome; see the class.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        blocking_until(py, timeout, |slice| self.recv().wait_timeout(slice), || self.recv().is_done())
    }

    /// True once the request has its outcome.
    fn done(&self) -> bool {
        self.recv().is_done()
    }

    /// The error it ended with, `None` if it completed.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<PyErr>> {
        exception(py, self.recv())
    }

    /// True once every byte of `layer` has landed.
    fn layer_landed(&self, layer: u32) -> bool {
        self.recv().layer_landed(layer)
    }

    /// The layers that have fully landed, in order.
    fn landed_layers(&self) -> Vec<u32> {
        self.recv().landed_layers()
    }

    /// Cancels: the senders are told to stop; the outcome comes once each
    /// has confirmed that nothing more is posted and nothing is in flight.
    fn cancel(&self, py: Python<'_>) {
        py.detach(|| self.recv().cancel());
    }

    /// Calls `fn(recv)` once the outcome is known (on the thread that set
    /// it, with the GIL; at once if it is known already).
    fn add_done_callback(slf: &Bound<'_, Self>, callback: Py<PyAny>) {
        let this = slf.get();
        add_done_callback(slf.as_any(), this.recv(), callback);
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let coroutine = slf.py().import("strait._aio")?.getattr("wait_transfer")?.call1((slf,))?;
        Ok(coroutine.call_method0("__await__")?.unbind())
    }

    fn __repr__(&self) -> String {
        let r = self.recv().request();
        let state = match self.recv().result() {
            None => format!("{} layer(s) landed", self.recv().landed_layers().len()),
            Some(Ok(())) => "done".into(),
            Some(Err(e)) => format!("failed: {e}"),
        };
        format!("<strait.kv.KvRecv {:#x}, {} blocks, {state}>", r.id, r.dst_blocks.len())
    }
}

impl Drop for KvRecv {
    fn drop(&mut self) {
        drop_detached(self.inner.take());
    }
}

/// A sender rank's side of a request (from `KvCache.push` or
/// `KvCache.serve_pull`).
///
/// `send_layers(start, stop)` posts layers as they are computed (layers
/// this rank does not send to this decoder are skipped), `send_all()`
/// posts every layer. `wait`, `done`, `exception`, callbacks and `await`
/// as on `KvRecv`; it completes when every posted write has completed
/// (pull: when the decoder released the blocks). `fail(reason)` gives up
/// and tells the decoder why; `cancel()` stops and tells it.
#[pyclass(module = "strait._strait", frozen)]
pub struct KvSend {
    inner: Option<strait::kv::KvSend>,
}

impl KvSend {
    fn send(&self) -> &strait::kv::KvSend {
        self.inner.as_ref().expect("only Drop takes the handle")
    }
}

#[pymethods]
impl KvSend {
    /// Posts layers `start..stop` (`stop` default `start + 1`).
    #[pyo3(signature = (start, stop=None))]
    fn send_layers(&self, py: Python<'_>, start: u32, stop: Option<u32>) -> PyResult<()> {
        let stop = stop.unwrap_or(start.saturating_add(1));
        py.detach(|| self.send().send_layers(start..stop)).py(py)
    }

    /// Posts every layer.
    fn send_all(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.send().send_all()).py(py)
    }

    /// The layers this rank sends to this decoder.
    fn layers_to_send(&self) -> Vec<u32> {
        self.send().layers_to_send()
    }

    /// Gives up: the decoder's request fails with `strait.AbortedError`
    /// carrying `reason`, once this rank's writes in flight have completed.
    fn fail(&self, py: Python<'_>, reason: &str) {
        py.detach(|| self.send().fail(reason));
    }

    /// Stops sending and tells the decoder (its request ends cancelled).
    fn cancel(&self, py: Python<'_>) {
        py.detach(|| self.send().cancel());
    }

    /// The request's id.
    #[getter]
    fn id(&self) -> u64 {
        self.send().request().id
    }

    /// Blocks until the outcome.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        blocking_until(py, timeout, |slice| self.send().wait_timeout(slice), || self.send().is_done())
    }

    /// True once the request has its outcome.
    fn done(&self) -> bool {
        self.send().is_done()
    }

    /// The error it ended with, `None` if it completed.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<PyErr>> {
        exception(py, self.send())
    }

    /// Calls `fn(send)` once the outcome is known.
    fn add_done_callback(slf: &Bound<'_, Self>, callback: Py<PyAny>) {
        let this = slf.get();
        add_done_callback(slf.as_any(), this.send(), callback);
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let coroutine = slf.py().import("strait._aio")?.getattr("wait_transfer")?.call1((slf,))?;
        Ok(coroutine.call_method0("__await__")?.unbind())
    }

    fn __repr__(&self) -> String {
        let state = match self.send().result() {
            None => "in flight".into(),
            Some(Ok(())) => "done".into(),
            Some(Err(e)) => format!("failed: {e}"),
        };
        format!("<strait.kv.KvSend {:#x}, {state}>", self.send().request().id)
    }
}

impl Drop for KvSend {
    fn drop(&mut self) {
        drop_detached(self.inner.take());
    }
}
