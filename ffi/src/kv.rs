//! KV-cache transfer for disaggregated prefill/decode (`strait::kv`).
//!
//! The decoder registers its cache, calls `strait_kv_expect` with the
//! prefill ranks' cache descriptors and its blocks, and hands the request's
//! bytes (`strait_kv_recv_request`) to every prefill rank by its own
//! channel. Each prefill rank decodes them (`strait_kv_request_from_bytes`),
//! calls `strait_kv_push` and then `strait_kv_send_layers` as layers finish.
//! Each side's request ends in exactly one outcome.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use strait_rs::kv::{
    KvCache, KvCacheDesc, KvConfig, KvExpect, KvKind, KvLayout, KvRecv, KvRequest, KvSend, KvShape, KvTensors, Tp,
};

use crate::engine::{engine_of, mr_handle, mr_of, report, strait_done_fn, strait_engine, strait_mr};
use crate::{
    bytes_out, call, call_status, clear_out, fail, get, handle, new_handle, outcome_status, put, slice, string, take,
    timeout_of, CResult, UserData,
};
use crate::{strait_status, strait_status as S};

/// MHA/GQA: a K and a V per head (`strait_kv_layout.kind`).
pub const STRAIT_KV_MHA: u32 = 0;
/// MLA: one latent vector per token, the same on every TP rank.
pub const STRAIT_KV_MLA: u32 = 1;

/// vLLM flash-attention: `[2, blocks, block_tokens, heads, head_dim]` per
/// layer (`strait_kv_layout_named`).
pub const STRAIT_KV_VLLM: u32 = 0;
/// FlashInfer NHD: `[blocks, 2, block_tokens, heads, head_dim]` per layer.
pub const STRAIT_KV_NHD: u32 = 1;
/// FlashInfer HND: `[blocks, 2, heads, block_tokens, head_dim]` per layer.
pub const STRAIT_KV_HND: u32 = 2;

/// One rank's KV cache: dimensions and byte strides (the Rust `KvLayout`).
///
/// The bytes of (layer l, K or V k, block b, token t, head h) are
/// `head_dim * elem_bytes` contiguous bytes at `layer_base(l) + k *
/// kv_stride + b * block_stride + t * token_stride + h * head_stride` in
/// layer l's tensor (pooled: `layer_base(l) = l * layer_stride` in the one
/// tensor; per layer: 0 in tensor l). Strides are bytes, never elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_kv_layout {
    /// `STRAIT_KV_MHA` or `STRAIT_KV_MLA`.
    pub kind: u32,
    /// Transformer layers.
    pub layers: u32,
    /// Blocks (pages) per layer.
    pub blocks: u32,
    /// Tokens per block.
    pub block_tokens: u32,
    /// KV heads held by this rank (MLA: 1).
    pub heads: u32,
    /// KV heads of the model (MLA: 1).
    pub total_heads: u32,
    /// Elements per head (MLA: the latent dimension).
    pub head_dim: u32,
    /// Bytes per element (2 for bf16/fp16, 1 for fp8).
    pub elem_bytes: u32,
    /// Nonzero: one tensor for all layers, `layer_stride` bytes apart;
    /// zero: one tensor per layer.
    pub pooled: u32,
    /// Bytes from one layer to the next (pooled only).
    pub layer_stride: u64,
    /// Bytes from K to V (MHA; 0 for MLA).
    pub kv_stride: u64,
    /// Bytes from one block to the next.
    pub block_stride: u64,
    /// Bytes from one token to the next within a block.
    pub token_stride: u64,
    /// Bytes from one head to the next.
    pub head_stride: u64,
}

impl strait_kv_layout {
    fn rust(&self) -> CResult<KvLayout> {
        let kind = match self.kind {
            STRAIT_KV_MHA => KvKind::Mha,
            STRAIT_KV_MLA => KvKind::Mla,
            k => return Err(fail(S::InvalidRequest, format!("unknown KV kind {k}"))),
        };
        Ok(KvLayout {
            kind,
            layers: self.layers,
            blocks: self.blocks,
            block_tokens: self.block_tokens,
            heads: self.heads,
            total_heads: self.total_heads,
            head_dim: self.head_dim,
            elem_bytes: self.elem_bytes,
            tensors: if self.pooled != 0 {
                KvTensors::Pool { layer_stride: self.layer_stride }
            } else {
                KvTensors::PerLayer
            },
            kv_stride: self.kv_stride,
            block_stride: self.block_stride,
            token_stride: self.token_stride,
            head_stride: self.head_stride,
        })
    }

    fn of(l: &KvLayout) -> Self {
        let (pooled, layer_stride) = match l.tensors {
            KvTensors::PerLayer => (0, 0),
            KvTensors::Pool { layer_stride } => (1, layer_stride),
        };
        strait_kv_layout {
            kind: if l.kind == KvKind::Mla { STRAIT_KV_MLA } else { STRAIT_KV_MHA },
            layers: l.layers,
            blocks: l.blocks,
            block_tokens: l.block_tokens,
            heads: l.heads,
            total_heads: l.total_heads,
            head_dim: l.head_dim,
            elem_bytes: l.elem_bytes,
            pooled,
            layer_stride,
            kv_stride: l.kv_stride,
            block_stride: l.block_stride,
            token_stride: l.token_stride,
            head_stride: l.head_stride,
        }
    }
}

/// The dimensions of the named layouts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_kv_shape {
    /// Transformer layers.
    pub layers: u32,
    /// Blocks per layer.
    pub blocks: u32,
    /// Tokens per block.
    pub block_tokens: u32,
    /// KV heads held by this rank.
    pub heads: u32,
    /// KV heads of the model.
    pub total_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Bytes per element.
    pub elem_bytes: u32,
}

/// The packed layout `format` (`STRAIT_KV_VLLM`, `_NHD`, `_HND`) of
/// `shape`, one tensor per layer. Set `pooled` and `layer_stride` after
/// for one pool (`strait_kv_layout_pool`).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_layout_named(
    format: u32,
    shape: *const strait_kv_shape,
    out: *mut strait_kv_layout,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { shape.as_ref() }.ok_or_else(|| fail(S::NullArgument, "shape is NULL"))?;
        let s = KvShape {
            layers: s.layers,
            blocks: s.blocks,
            block_tokens: s.block_tokens,
            heads: s.heads,
            total_heads: s.total_heads,
            head_dim: s.head_dim,
            elem_bytes: s.elem_bytes,
        };
        let l = match format {
            STRAIT_KV_VLLM => KvLayout::vllm_flash(s),
            STRAIT_KV_NHD => KvLayout::flashinfer_nhd(s),
            STRAIT_KV_HND => KvLayout::flashinfer_hnd(s),
            f => return Err(fail(S::InvalidRequest, format!("unknown KV layout format {f}"))),
        };
        // SAFETY: header contract.
        unsafe { put(out, strait_kv_layout::of(&l), "out") }
    })
}

/// An MLA layout (one latent of `latent_dim` elements per token), one
/// tensor per layer.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_layout_mla(
    layers: u32,
    blocks: u32,
    block_tokens: u32,
    latent_dim: u32,
    elem_bytes: u32,
    out: *mut strait_kv_layout,
) -> strait_status {
    call(|| {
        let l = KvLayout::mla(layers, blocks, block_tokens, latent_dim, elem_bytes);
        // SAFETY: header contract.
        unsafe { put(out, strait_kv_layout::of(&l), "out") }
    })
}

/// Turns `layout` into one pool with the layers back to back.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_layout_pool(layout: *mut strait_kv_layout) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let l = unsafe { layout.as_mut() }.ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?;
        *l = strait_kv_layout::of(&l.rust()?.pooled());
        Ok(())
    })
}

/// Bytes one tensor of `layout` needs (per layer, or the pool).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_layout_tensor_bytes(
    layout: *const strait_kv_layout,
    bytes: *mut u64,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let l = unsafe { layout.as_ref() }.ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?.rust()?;
        // SAFETY: header contract.
        unsafe { put(bytes, l.tensor_bytes(), "bytes") }
    })
}

/// Settings of a cache (NULL where taken: the defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strait_kv_config {
    /// A peer a request has not heard from for this long is pinged
    /// (default 250 ms).
    pub heartbeat_ms: u64,
    /// Control messages in flight at once (default 256).
    pub message_slots: u32,
}

/// The defaults of `strait_kv_config`.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_config_default(out: *mut strait_kv_config) -> strait_status {
    let d = KvConfig::default();
    let c = strait_kv_config { heartbeat_ms: d.heartbeat.as_millis() as u64, message_slots: d.message_slots as u32 };
    // SAFETY: header contract.
    call(|| unsafe { put(out, c, "out") })
}

/// # Safety
/// `c` is NULL or readable.
unsafe fn config_of(c: *const strait_kv_config) -> KvConfig {
    // SAFETY: as the caller's contract says.
    match unsafe { c.as_ref() } {
        None => KvConfig::default(),
        Some(c) => {
            KvConfig { heartbeat: Duration::from_millis(c.heartbeat_ms), message_slots: c.message_slots as usize }
        }
    }
}

/// A rank's registered KV cache. Thread-safe.
#[derive(Debug)]
pub struct strait_kv_cache {
    _opaque: [u8; 0],
}
handle!(strait_kv_cache, KvCache, 0x5354_4b56_4341_4348);

unsafe fn cache_of<'a>(c: *const strait_kv_cache) -> CResult<&'a KvCache> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_kv_cache>(c, "cache") }
}

fn tp(rank: u32, size: u32) -> CResult<Tp> {
    Ok(Tp::new(rank, size)?)
}

/// Allocates and registers the cache's tensors (zeroed, remote read and
/// write) for `layout` at tensor-parallel rank `tp_rank` of `tp_size`.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_alloc(
    engine: *const strait_engine,
    layout: *const strait_kv_layout,
    tp_rank: u32,
    tp_size: u32,
    config: *const strait_kv_config,
    out: *mut *mut strait_kv_cache,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let l = layout.as_ref().ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?.rust()?;
            let c = KvCache::alloc(engine_of(engine)?, l, tp(tp_rank, tp_size)?, config_of(config))?;
            put(out, new_handle::<strait_kv_cache>(c), "out")
        }
    })
}

/// A cache over regions the caller registered: `count` regions, one per
/// layer (or one pool), each at least `strait_kv_layout_tensor_bytes`
/// long. A decoder that is pushed to needs remote write access, a sender
/// that is pulled from remote read.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_create(
    engine: *const strait_engine,
    layout: *const strait_kv_layout,
    tp_rank: u32,
    tp_size: u32,
    tensors: *const *const strait_mr,
    count: usize,
    config: *const strait_kv_config,
    out: *mut *mut strait_kv_cache,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let l = layout.as_ref().ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?.rust()?;
            let regions =
                slice(tensors, count, "tensors")?.iter().map(|&m| mr_of(m).cloned()).collect::<CResult<Vec<_>>>()?;
            let c = KvCache::new(engine_of(engine)?, l, tp(tp_rank, tp_size)?, regions, config_of(config))?;
            put(out, new_handle::<strait_kv_cache>(c), "out")
        }
    })
}

/// The cache's descriptor as bytes, for the other side (exchange once at
/// start-up; `strait_kv_desc_from_bytes`).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_descriptor(
    cache: *const strait_kv_cache,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&cache_of(cache)?.descriptor().to_bytes(), buf, cap, len) })
}

/// The cache's layout.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_layout(
    cache: *const strait_kv_cache,
    out: *mut strait_kv_layout,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(out, strait_kv_layout::of(cache_of(cache)?.layout()), "out") })
}

/// A new handle on tensor `index` of the cache (its memory:
/// `strait_mr_get`); destroy it when done.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_tensor(
    cache: *const strait_kv_cache,
    index: usize,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let tensors = unsafe { cache_of(cache)? }.tensors();
        let t = tensors
            .get(index)
            .ok_or_else(|| fail(S::OutOfBounds, format!("tensor {index} of a cache of {}", tensors.len())))?;
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(t.clone()), "out") }
    })
}

/// Frees the cache (NULL: nothing); its requests keep what they need until
/// they end.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_cache_destroy(cache: *mut strait_kv_cache) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_kv_cache>(cache, "cache") }.map(drop))
}

/// The other side's cache, decoded and validated. Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_kv_desc {
    _opaque: [u8; 0],
}
handle!(strait_kv_desc, KvCacheDesc, 0x5354_4b56_4445_5343);

/// Decodes a cache descriptor (`INVALID_DESCRIPTOR` on bad bytes).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_desc_from_bytes(
    bytes: *const u8,
    len: usize,
    out: *mut *mut strait_kv_desc,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let d = KvCacheDesc::from_bytes(unsafe { slice(bytes, len, "bytes")? })?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_kv_desc>(d), "out") }
    })
}

/// Frees a cache descriptor (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_desc_destroy(desc: *mut strait_kv_desc) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_kv_desc>(desc, "cache descriptor") }.map(drop))
}

/// A KV request as the senders receive it. Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_kv_request {
    _opaque: [u8; 0],
}
handle!(strait_kv_request, KvRequest, 0x5354_4b56_5245_5155);

/// Decodes a request (from `strait_kv_recv_request` on the decoder).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_request_from_bytes(
    bytes: *const u8,
    len: usize,
    out: *mut *mut strait_kv_request,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let r = KvRequest::from_bytes(unsafe { slice(bytes, len, "bytes")? })?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_kv_request>(r), "out") }
    })
}

/// Frees a request (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_request_destroy(request: *mut strait_kv_request) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_kv_request>(request, "request") }.map(drop))
}

/// Push: the senders write each layer (`strait_kv_expect`).
pub const STRAIT_KV_PUSH: u32 = 0;
/// Pull: the decoder reads each layer once told it is ready.
pub const STRAIT_KV_PULL: u32 = 1;

/// The decoder's side of one request. Thread-safe. Destroying it before
/// its outcome cancels it (as `strait_kv_recv_cancel`).
#[derive(Debug)]
pub struct strait_kv_recv {
    _opaque: [u8; 0],
}
handle!(strait_kv_recv, KvRecv, 0x5354_4b56_5245_4356);

/// Starts a request into this decoder's `dst_blocks` (`block_count` ids,
/// in token order) from the sender ranks' caches `senders[0..sender_count)`
/// (in TP rank order). `mode` is `STRAIT_KV_PUSH` (`src_blocks` NULL) or
/// `STRAIT_KV_PULL` (`src_blocks`: the senders' blocks, `block_count` of
/// them). `tokens` 0 moves every token of the blocks, else that many (the
/// last block partly). `timeout_ms` (`STRAIT_WAIT_FOREVER`: none) fails it
/// with `TIMEOUT` if it has not completed by then. Send the request's
/// bytes (`strait_kv_recv_request`) to every sender rank.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_expect(
    cache: *const strait_kv_cache,
    mode: u32,
    senders: *const *const strait_kv_desc,
    sender_count: usize,
    src_blocks: *const u32,
    dst_blocks: *const u32,
    block_count: usize,
    tokens: u64,
    timeout_ms: u64,
    out: *mut *mut strait_kv_recv,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let c = cache_of(cache)?;
            let s = slice(senders, sender_count, "senders")?
                .iter()
                .map(|&d| get::<strait_kv_desc>(d, "sender descriptor").cloned())
                .collect::<CResult<Vec<_>>>()?;
            let dst = slice(dst_blocks, block_count, "dst_blocks")?;
            let mut e = match mode {
                STRAIT_KV_PUSH => KvExpect::push(&s, dst),
                STRAIT_KV_PULL => KvExpect::pull(&s, slice(src_blocks, block_count, "src_blocks")?, dst),
                m => return Err(fail(S::InvalidRequest, format!("unknown KV mode {m}"))),
            };
            if tokens > 0 {
                e = e.tokens(tokens);
            }
            if let Some(t) = timeout_of(timeout_ms) {
                e = e.timeout(t);
            }
            let r = c.expect(&e)?;
            put(out, new_handle::<strait_kv_recv>(r), "out")
        }
    })
}

unsafe fn recv_of<'a>(r: *const strait_kv_recv) -> CResult<&'a KvRecv> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_kv_recv>(r, "KV receive") }
}

/// The request's bytes, for the sender ranks.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_request(
    recv: *const strait_kv_recv,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&recv_of(recv)?.request().to_bytes(), buf, cap, len) })
}

/// Waits for the outcome up to `timeout_ms` (`TIMEOUT`: not yet; the
/// request carries on). Once it is reported the blocks are the decoder's
/// again: no late write can land in them.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_wait(recv: *const strait_kv_recv, timeout_ms: u64) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let r = unsafe { recv_of(recv)? };
        match timeout_of(timeout_ms) {
            None => r.wait()?,
            Some(d) => r.wait_timeout(d)?,
        }
        Ok(())
    })
}

/// `PENDING` while it runs, then the outcome.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_poll(recv: *const strait_kv_recv) -> strait_status {
    call_status(|| {
        // SAFETY: header contract.
        Ok(match unsafe { recv_of(recv)? }.result() {
            None => S::Pending,
            Some(r) => outcome_status(&r),
        })
    })
}

/// Runs `callback` once with the outcome (on the engine's or the cache's
/// thread, or at once if known).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_on_done(
    recv: *const strait_kv_recv,
    callback: strait_done_fn,
    user_data: *mut c_void,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let r = unsafe { recv_of(recv)? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        r.on_done(move |o| report(cb, user, o));
        Ok(())
    })
}

/// Whether layer `layer` has landed (every sender of it has written it).
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_layer_landed(
    recv: *const strait_kv_recv,
    layer: u32,
    landed: *mut bool,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(landed, recv_of(recv)?.layer_landed(layer), "landed") })
}

/// Cancels: the senders are told to stop, and the outcome (`CANCELLED`)
/// is reported once each has confirmed nothing more will land.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_cancel(recv: *const strait_kv_recv) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { recv_of(recv) }.map(|r| r.cancel()))
}

/// Frees the handle (NULL: nothing), cancelling the request if it has not
/// ended.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_recv_destroy(recv: *mut strait_kv_recv) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_kv_recv>(recv, "KV receive") }.map(drop))
}

/// A sender's side of one request. Thread-safe.
#[derive(Debug)]
pub struct strait_kv_send {
    _opaque: [u8; 0],
}
handle!(strait_kv_send, KvSend, 0x5354_4b56_5345_4e44);

unsafe fn send_of<'a>(s: *const strait_kv_send) -> CResult<&'a KvSend> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_kv_send>(s, "KV send") }
}

/// Push: starts sending `request` from this rank's `src_blocks`
/// (`block_count` ids in token order) into `decoder`'s cache; then call
/// `strait_kv_send_layers` as layers are computed.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_push(
    cache: *const strait_kv_cache,
    request: *const strait_kv_request,
    decoder: *const strait_kv_desc,
    src_blocks: *const u32,
    block_count: usize,
    out: *mut *mut strait_kv_send,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let s = cache_of(cache)?.push(
                get::<strait_kv_request>(request, "request")?,
                get::<strait_kv_desc>(decoder, "decoder descriptor")?,
                slice(src_blocks, block_count, "src_blocks")?,
            )?;
            put(out, new_handle::<strait_kv_send>(s), "out")
        }
    })
}

/// Pull: serves `request` (its source blocks are named in it); then call
/// `strait_kv_send_layers` as layers are ready, and the decoder reads them.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_serve_pull(
    cache: *const strait_kv_cache,
    request: *const strait_kv_request,
    decoder: *const strait_kv_desc,
    out: *mut *mut strait_kv_send,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let s = cache_of(cache)?.serve_pull(
                get::<strait_kv_request>(request, "request")?,
                get::<strait_kv_desc>(decoder, "decoder descriptor")?,
            )?;
            put(out, new_handle::<strait_kv_send>(s), "out")
        }
    })
}

/// Posts layers `first..end` (push: their bytes; pull: that they are
/// ready), skipping layers already posted and those this rank does not
/// send. Fails once the request is stopping or over.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_layers(send: *const strait_kv_send, first: u32, end: u32) -> strait_status {
    // SAFETY: header contract.
    call(|| Ok(unsafe { send_of(send)? }.send_layers(first..end)?))
}

/// Posts every layer.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_all(send: *const strait_kv_send) -> strait_status {
    // SAFETY: header contract.
    call(|| Ok(unsafe { send_of(send)? }.send_all()?))
}

/// Gives up, telling the decoder `reason` once the writes in flight have
/// completed; both sides end `ABORTED`.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_fail(send: *const strait_kv_send, reason: *const c_char) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let (s, r) = unsafe { (send_of(send)?, string(reason, "reason")?) };
        s.fail(r);
        Ok(())
    })
}

/// Cancels: posts nothing more; the decoder's request ends `CANCELLED`.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_cancel(send: *const strait_kv_send) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { send_of(send) }.map(|s| s.cancel()))
}

/// Waits for this side's outcome up to `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_wait(send: *const strait_kv_send, timeout_ms: u64) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { send_of(send)? };
        match timeout_of(timeout_ms) {
            None => s.wait()?,
            Some(d) => s.wait_timeout(d)?,
        }
        Ok(())
    })
}

/// `PENDING` while it runs, then this side's outcome.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_poll(send: *const strait_kv_send) -> strait_status {
    call_status(|| {
        // SAFETY: header contract.
        Ok(match unsafe { send_of(send)? }.result() {
            None => S::Pending,
            Some(r) => outcome_status(&r),
        })
    })
}

/// Runs `callback` once with this side's outcome.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_on_done(
    send: *const strait_kv_send,
    callback: strait_done_fn,
    user_data: *mut c_void,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { send_of(send)? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        s.on_done(move |o| report(cb, user, o));
        Ok(())
    })
}

/// Frees the handle (NULL: nothing). A request still running carries on
/// to its outcome.
#[no_mangle]
pub unsafe extern "C" fn strait_kv_send_destroy(send: *mut strait_kv_send) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_kv_send>(send, "KV send") }.map(drop))
}
