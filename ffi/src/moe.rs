//! Expert-parallel dispatch and combine (`strait::moe`).
//!
//! Each rank creates a `strait_moe_rank`, sends its descriptor's bytes to
//! every other rank by its own channel, and joins the group with everyone's
//! (`strait_moe_connect`). Then every rank calls `strait_moe_dispatch` and
//! `strait_moe_combine` in the same order.

use std::sync::Mutex;
use std::time::Duration;

use strait_rs::moe::{Dispatched, MoeConfig, MoeDtype, MoeGroup, MoeRank, MoeRankDesc};

use crate::engine::{engine_of, strait_engine};
use crate::{bytes_out, call, clear_out, fail, get, handle, new_handle, put, slice, take, CResult};
use crate::{strait_status, strait_status as S};

/// Expert outputs are 4-byte floats (`strait_moe_config.dtype`).
pub const STRAIT_MOE_F32: u32 = 0;
/// Expert outputs are bfloat16 (accumulated in f32).
pub const STRAIT_MOE_BF16: u32 = 1;

/// What every rank of a group agrees on (the Rust `MoeConfig`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_moe_config {
    /// Ranks in the group (at most 256).
    pub ranks: u32,
    /// Experts in all, a multiple of `ranks`.
    pub experts: u32,
    /// Experts per token.
    pub top_k: u32,
    /// Most tokens a rank passes to one dispatch.
    pub max_tokens: u32,
    /// Bytes dispatched per token (hidden state and any fp8 scales).
    pub token_bytes: u32,
    /// Elements per token of the expert outputs (combine).
    pub hidden: u32,
    /// `STRAIT_MOE_F32` or `STRAIT_MOE_BF16`.
    pub dtype: u32,
    /// Copies a rank's receive pool holds (0: `2 * max_tokens * top_k`).
    /// More arrive in rounds (exact, slower).
    pub capacity: u32,
    /// A call fails, naming the rank it waited for, after this long.
    pub timeout_ms: u64,
}

impl strait_moe_config {
    fn rust(&self) -> CResult<MoeConfig> {
        let dtype = match self.dtype {
            STRAIT_MOE_F32 => MoeDtype::F32,
            STRAIT_MOE_BF16 => MoeDtype::Bf16,
            d => return Err(fail(S::InvalidRequest, format!("unknown MoE dtype {d}"))),
        };
        let mut c = MoeConfig::new(self.ranks, self.experts, self.top_k, self.max_tokens, self.hidden, dtype);
        c.token_bytes = self.token_bytes;
        c.capacity = (self.capacity != 0).then_some(self.capacity);
        c.timeout = Duration::from_millis(self.timeout_ms);
        Ok(c)
    }
}

/// A configuration with the defaults: `token_bytes` is `hidden` elements
/// of `dtype`, the default capacity, a 10 s timeout.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_config_init(
    ranks: u32,
    experts: u32,
    top_k: u32,
    max_tokens: u32,
    hidden: u32,
    dtype: u32,
    out: *mut strait_moe_config,
) -> strait_status {
    call(|| {
        let size = match dtype {
            STRAIT_MOE_F32 => 4,
            STRAIT_MOE_BF16 => 2,
            d => return Err(fail(S::InvalidRequest, format!("unknown MoE dtype {d}"))),
        };
        let c = strait_moe_config {
            ranks,
            experts,
            top_k,
            max_tokens,
            token_bytes: hidden.saturating_mul(size),
            hidden,
            dtype,
            capacity: 0,
            timeout_ms: 10_000,
        };
        // SAFETY: header contract.
        unsafe { put(out, c, "out") }
    })
}

/// One rank's regions before the group is joined. Thread-safe to query;
/// `strait_moe_connect` consumes it.
#[derive(Debug)]
pub struct strait_moe_rank {
    _opaque: [u8; 0],
}
handle!(strait_moe_rank, MoeRank, 0x5354_4d4f_4552_4e4b);

/// Allocates and registers rank `rank`'s regions for `config`.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_rank_create(
    engine: *const strait_engine,
    config: *const strait_moe_config,
    rank: u32,
    out: *mut *mut strait_moe_rank,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let c = config.as_ref().ok_or_else(|| fail(S::NullArgument, "config is NULL"))?.rust()?;
            let r = MoeRank::new(engine_of(engine)?, c, rank)?;
            put(out, new_handle::<strait_moe_rank>(r), "out")
        }
    })
}

/// The rank's descriptor bytes, for every other rank.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_rank_descriptor(
    rank: *const strait_moe_rank,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&get::<strait_moe_rank>(rank, "rank")?.descriptor().to_bytes(), buf, cap, len) })
}

/// Frees a rank that did not join a group (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_moe_rank_destroy(rank: *mut strait_moe_rank) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_moe_rank>(rank, "rank") }.map(drop))
}

/// A joined group, seen from one rank. Calls on it run one at a time
/// (callers on several threads are serialized). After a failed call (a
/// rank died or went quiet: the message names it) it refuses further
/// calls.
#[derive(Debug)]
pub struct strait_moe_group {
    _opaque: [u8; 0],
}
handle!(strait_moe_group, Mutex<MoeGroup>, 0x5354_4d4f_4547_5250);

/// Joins the group: `descs[r]` (`lens[r]` bytes) is rank r's descriptor,
/// this rank's own included, for `r < count`. Consumes `rank` whatever
/// the outcome (do not destroy it after).
#[no_mangle]
pub unsafe extern "C" fn strait_moe_connect(
    rank: *mut strait_moe_rank,
    descs: *const *const u8,
    lens: *const usize,
    count: usize,
    out: *mut *mut strait_moe_group,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            let r = take::<strait_moe_rank>(rank, "rank")?.ok_or_else(|| fail(S::NullArgument, "rank is NULL"))?;
            clear_out(out, "out")?;
            let d = slice(descs, count, "descs")?;
            let l = slice(lens, count, "lens")?;
            let ranks = d
                .iter()
                .zip(l)
                .map(|(&p, &n)| Ok(MoeRankDesc::from_bytes(slice(p, n, "descriptor")?)?))
                .collect::<CResult<Vec<_>>>()?;
            let g = r.connect(&ranks)?;
            put(out, new_handle::<strait_moe_group>(Mutex::new(g)), "out")
        }
    })
}

/// Leaves the group and frees it (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_moe_group_destroy(group: *mut strait_moe_group) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_moe_group>(group, "group") }.map(drop))
}

/// What this rank's experts received from one dispatch, and where each
/// copy came from (for combine). Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_moe_dispatched {
    _opaque: [u8; 0],
}
handle!(strait_moe_dispatched, Dispatched, 0x5354_4d4f_4544_5350);

/// Dispatches this rank's `tokens` tokens: `x` is `[tokens, token_bytes]`
/// (`x_len` bytes), `topk_idx` and `topk_weights` are `[tokens, top_k]`
/// (expert -1: none). Every rank calls it; it returns once this rank's
/// experts have every copy sent to them.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_dispatch(
    group: *const strait_moe_group,
    x: *const u8,
    x_len: usize,
    topk_idx: *const i32,
    topk_weights: *const f32,
    tokens: usize,
    out: *mut *mut strait_moe_dispatched,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            clear_out(out, "out")?;
            let g = get::<strait_moe_group>(group, "group")?;
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            let k = g.config().top_k as usize;
            let pairs = tokens.checked_mul(k).ok_or_else(|| fail(S::InvalidRequest, "tokens * top_k overflows"))?;
            let d = g.dispatch(
                slice(x, x_len, "x")?,
                slice(topk_idx, pairs, "topk_idx")?,
                slice(topk_weights, pairs, "topk_weights")?,
            )?;
            put(out, new_handle::<strait_moe_dispatched>(d), "out")
        }
    })
}

/// The received copies: `expert_x` is `[local_experts, capacity,
/// token_bytes]` (`*expert_x_len` bytes), expert e's copies in rows
/// `0..counts[e]` of its block. The pointers are valid until the handle is
/// destroyed. Any out-pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_dispatched_get(
    dispatched: *const strait_moe_dispatched,
    expert_x: *mut *const u8,
    expert_x_len: *mut usize,
    counts: *mut *const u32,
    local_experts: *mut u32,
    capacity: *mut u32,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let d = unsafe { get::<strait_moe_dispatched>(dispatched, "dispatched")? };
        // SAFETY: each out-pointer is NULL or writable (header contract).
        unsafe {
            if let Some(p) = expert_x.as_mut() {
                *p = d.expert_x.as_ptr();
            }
            if let Some(p) = expert_x_len.as_mut() {
                *p = d.expert_x.len();
            }
            if let Some(p) = counts.as_mut() {
                *p = d.counts.as_ptr();
            }
            if let Some(p) = local_experts.as_mut() {
                *p = d.counts.len() as u32;
            }
            if let Some(p) = capacity.as_mut() {
                *p = d.capacity;
            }
        }
        Ok(())
    })
}

/// The source of row `row` of local expert `expert`: the rank, its token
/// index and which of its top-k choices it is. `OUT_OF_BOUNDS` past the
/// expert's count.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_dispatched_source(
    dispatched: *const strait_moe_dispatched,
    expert: u32,
    row: u32,
    rank: *mut u32,
    token: *mut u32,
    k: *mut u32,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let d = unsafe { get::<strait_moe_dispatched>(dispatched, "dispatched")? };
        let (r, t, kk) = d
            .handle
            .source(expert, row)
            .ok_or_else(|| fail(S::OutOfBounds, format!("row {row} of local expert {expert}")))?;
        // SAFETY: header contract.
        unsafe {
            put(rank, r, "rank")?;
            put(token, t, "token")?;
            put(k, kk, "k")
        }
    })
}

/// Frees a dispatch's results (NULL: nothing); combine needs them, so free
/// after it.
#[no_mangle]
pub unsafe extern "C" fn strait_moe_dispatched_destroy(dispatched: *mut strait_moe_dispatched) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_moe_dispatched>(dispatched, "dispatched") }.map(drop))
}

/// Sends each expert output row of `expert_y` (laid out as the dispatch's
/// `expert_x`, `hidden` elements of the dtype per row; `y_len` bytes) back
/// to its token's rank, and writes this rank's tokens' outputs to `y`:
/// `y[t] = sum over k of topk_weights[t][k] * row of (t, k)`, accumulated
/// in f32, `[tokens, hidden]` of the dtype (`*len` bytes; if `cap` is
/// less, `BUFFER_TOO_SMALL` with `*len` the size, checked before anything
/// is sent).
#[no_mangle]
pub unsafe extern "C" fn strait_moe_combine(
    group: *const strait_moe_group,
    expert_y: *const u8,
    expert_y_len: usize,
    dispatched: *const strait_moe_dispatched,
    y: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for every pointer.
        unsafe {
            let g = get::<strait_moe_group>(group, "group")?;
            let d = get::<strait_moe_dispatched>(dispatched, "dispatched")?;
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            let need = d.handle.tokens() as usize * g.config().row_bytes() as usize;
            if cap < need || y.is_null() {
                put(len, need, "len")?;
                return Err(fail(S::BufferTooSmall, format!("combine's {need} bytes do not fit a buffer of {cap}")));
            }
            let out = g.combine(slice(expert_y, expert_y_len, "expert_y")?, &d.handle)?;
            bytes_out(&out, y, cap, len)
        }
    })
}
