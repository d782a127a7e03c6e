//! Engine statistics (`TransferEngine::stats`): a snapshot handle with
//! per-NIC and per-peer counters and latency percentiles, and the table and
//! Prometheus renderings.

use std::ffi::c_char;

use strait_rs::stats::{EngineStats, ErrorCounts, Histogram, OpCounts, ERROR_KINDS};

use crate::engine::{engine_of, strait_engine};
use crate::{bytes_out, call, clear_out, fail, get, handle, new_handle, put, string, take, CResult};
use crate::{strait_status, strait_status as S};

/// Operations by kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_op_counts {
    /// RDMA writes (immediate-only writes included).
    pub writes: u64,
    /// RDMA reads.
    pub reads: u64,
    /// Two-sided sends.
    pub sends: u64,
}

fn ops(o: &OpCounts) -> strait_op_counts {
    strait_op_counts { writes: o.writes, reads: o.reads, sends: o.sends }
}

/// Errors by kind, in the order of `strait_stats_error_kind` (transport,
/// peer_unreachable, remote_access, timeout, cancelled, other).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_error_counts {
    /// Counts, indexed by kind.
    pub by_kind: [u64; 6],
}

const _: () = assert!(ERROR_KINDS.len() == 6);

fn errors(e: &ErrorCounts) -> strait_error_counts {
    strait_error_counts { by_kind: e.0 }
}

/// One NIC's counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_nic_stats {
    /// Operations posted.
    pub posted: strait_op_counts,
    /// Bytes posted.
    pub bytes_posted: u64,
    /// Times the NIC's queue was full and work waited.
    pub busy: u64,
    /// Operations completed (successfully or not).
    pub completed: u64,
    /// Failed completions by kind.
    pub errors: strait_error_counts,
    /// Immediates written.
    pub imms_out: u64,
    /// Immediates received.
    pub imms_in: u64,
    /// Two-sided messages received.
    pub messages_in: u64,
    /// Receive buffers posted now (a gauge, at most `receive_buffers`).
    pub receives_posted: u64,
}

/// One peer's counters. Its address and label: `strait_stats_peer_address`
/// and `strait_stats_peer_label`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_peer_stats {
    /// Operations posted to it.
    pub posted: strait_op_counts,
    /// Bytes posted to it.
    pub bytes_posted: u64,
    /// Immediates written to it.
    pub imms_out: u64,
    /// Operations to it completed.
    pub completed: u64,
    /// Failed completions by kind.
    pub errors: strait_error_counts,
    /// Requests to it that succeeded.
    pub requests_ok: u64,
    /// Requests to it that failed.
    pub requests_failed: u64,
    /// Requests to it in flight now.
    pub in_flight: u64,
    /// Age of the oldest of them, in ns (0: none).
    pub oldest_in_flight_ns: u64,
    /// Requests that expired (request timeout).
    pub expired: u64,
    /// Endpoint resets (reconnections) towards it.
    pub resets: u64,
}

/// Request completion times of one kind, in ns (0 when `count` is 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_latency {
    /// Requests timed.
    pub count: u64,
    /// Mean.
    pub mean_ns: u64,
    /// Median (within 1/8).
    pub p50_ns: u64,
    /// 99th percentile (within 1/8).
    pub p99_ns: u64,
    /// Largest.
    pub max_ns: u64,
}

fn latency(h: &Histogram) -> strait_latency {
    let ns = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_nanos() as u64);
    strait_latency {
        count: h.count(),
        mean_ns: ns(h.mean()),
        p50_ns: ns(h.percentile(0.5)),
        p99_ns: ns(h.percentile(0.99)),
        max_ns: ns(h.max()),
    }
}

/// The engine-wide part of a snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_stats_summary {
    /// NICs (`strait_stats_nic` indices).
    pub nics: u32,
    /// Peers seen (`strait_stats_peer` indices).
    pub peers: u32,
    /// Requests in flight.
    pub in_flight: u64,
    /// Age of the oldest, in ns (0: none).
    pub oldest_in_flight_ns: u64,
    /// Receive buffers posted for two-sided messages.
    pub receive_buffers: u64,
    /// Completion times of writes (single, paged, strided, immediate-only).
    pub write: strait_latency,
    /// Of reads.
    pub read: strait_latency,
    /// Of sends.
    pub send: strait_latency,
    /// Immediate counters at this engine: from arming to the count reached.
    pub imm: strait_latency,
    /// Requests this engine moved packed (see `strait_builder_set_packing`).
    pub packed_requests: u64,
    /// Chunks of them committed to peers.
    pub packed_chunks: u64,
    /// Chunks this engine copied into its regions for peers.
    pub packed_served: u64,
}

/// A snapshot of an engine's counters. Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_stats {
    _opaque: [u8; 0],
}
handle!(strait_stats, EngineStats, 0x5354_5354_4154_5320);

unsafe fn stats_of<'a>(s: *const strait_stats) -> CResult<&'a EngineStats> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_stats>(s, "stats") }
}

/// Takes a snapshot (a round trip to the engine's thread; not from a
/// callback: `WOULD_DEADLOCK`).
#[no_mangle]
pub unsafe extern "C" fn strait_engine_stats(
    engine: *const strait_engine,
    out: *mut *mut strait_stats,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let s = unsafe { engine_of(engine)? }.stats()?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_stats>(s), "out") }
    })
}

/// The engine-wide figures of a snapshot.
#[no_mangle]
pub unsafe extern "C" fn strait_stats_get_summary(
    stats: *const strait_stats,
    out: *mut strait_stats_summary,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { stats_of(stats)? };
        let summary = strait_stats_summary {
            nics: s.nics.len() as u32,
            peers: s.peers.len() as u32,
            in_flight: s.in_flight,
            oldest_in_flight_ns: s.oldest_in_flight.map_or(0, |d| d.as_nanos() as u64),
            receive_buffers: s.receive_buffers as u64,
            write: latency(&s.latency.write),
            read: latency(&s.latency.read),
            send: latency(&s.latency.send),
            imm: latency(&s.latency.imm),
            packed_requests: s.packed.requests,
            packed_chunks: s.packed.chunks,
            packed_served: s.packed.served,
        };
        // SAFETY: header contract.
        unsafe { put(out, summary, "out") }
    })
}

/// NIC `index`'s counters (`OUT_OF_BOUNDS` past the last).
#[no_mangle]
pub unsafe extern "C" fn strait_stats_nic(
    stats: *const strait_stats,
    index: u32,
    out: *mut strait_nic_stats,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { stats_of(stats)? };
        let n = s
            .nics
            .get(index as usize)
            .ok_or_else(|| fail(S::OutOfBounds, format!("NIC {index} of {}", s.nics.len())))?;
        let c = strait_nic_stats {
            posted: ops(&n.posted),
            bytes_posted: n.bytes_posted,
            busy: n.busy,
            completed: n.completed,
            errors: errors(&n.errors),
            imms_out: n.imms_out,
            imms_in: n.imms_in,
            messages_in: n.messages_in,
            receives_posted: n.receives_posted,
        };
        // SAFETY: header contract.
        unsafe { put(out, c, "out") }
    })
}

fn peer_at(s: &EngineStats, index: u32) -> CResult<&strait_rs::stats::PeerStats> {
    s.peers.get(index as usize).ok_or_else(|| fail(S::OutOfBounds, format!("peer {index} of {}", s.peers.len())))
}

/// Peer `index`'s counters (`OUT_OF_BOUNDS` past the last).
#[no_mangle]
pub unsafe extern "C" fn strait_stats_peer(
    stats: *const strait_stats,
    index: u32,
    out: *mut strait_peer_stats,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let p = peer_at(unsafe { stats_of(stats)? }, index)?;
        let c = strait_peer_stats {
            posted: ops(&p.posted),
            bytes_posted: p.bytes_posted,
            imms_out: p.imms_out,
            completed: p.completed,
            errors: errors(&p.errors),
            requests_ok: p.requests_ok,
            requests_failed: p.requests_failed,
            in_flight: p.in_flight,
            oldest_in_flight_ns: p.oldest_in_flight.map_or(0, |d| d.as_nanos() as u64),
            expired: p.expired,
            resets: p.resets,
        };
        // SAFETY: header contract.
        unsafe { put(out, c, "out") }
    })
}

/// Peer `index`'s engine address bytes.
#[no_mangle]
pub unsafe extern "C" fn strait_stats_peer_address(
    stats: *const strait_stats,
    index: u32,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&peer_at(stats_of(stats)?, index)?.address.to_bytes(), buf, cap, len) })
}

/// Peer `index`'s label (`strait_engine_label_peer`) as UTF-8 bytes, with
/// no terminating NUL (length 0: none).
#[no_mangle]
pub unsafe extern "C" fn strait_stats_peer_label(
    stats: *const strait_stats,
    index: u32,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let p = peer_at(unsafe { stats_of(stats)? }, index)?;
        // SAFETY: header contract.
        unsafe { bytes_out(p.label.as_deref().unwrap_or("").as_bytes(), buf, cap, len) }
    })
}

/// The name of error kind `index` of `strait_error_counts` (a static
/// string), or NULL past the last.
#[no_mangle]
pub extern "C" fn strait_stats_error_kind(index: u32) -> *const c_char {
    const NAMES: [&std::ffi::CStr; 6] =
        [c"transport", c"peer_unreachable", c"remote_access", c"timeout", c"cancelled", c"other"];
    NAMES.get(index as usize).map_or(std::ptr::null(), |n| n.as_ptr())
}

/// The snapshot as a text table (`STRAIT_STATS_TABLE`) or in the
/// Prometheus text format (`STRAIT_STATS_PROMETHEUS`, metric names
/// prefixed with `prefix`, e.g. `"strait"`), with no terminating NUL.
#[no_mangle]
pub unsafe extern "C" fn strait_stats_render(
    stats: *const strait_stats,
    format: u32,
    prefix: *const c_char,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let s = unsafe { stats_of(stats)? };
        let text = match format {
            STRAIT_STATS_TABLE => s.table(),
            // SAFETY: header contract.
            STRAIT_STATS_PROMETHEUS => s.prometheus(unsafe { string(prefix, "prefix")? }),
            f => return Err(fail(S::InvalidRequest, format!("unknown stats format {f}"))),
        };
        // SAFETY: header contract.
        unsafe { bytes_out(text.as_bytes(), buf, cap, len) }
    })
}

/// A text table (`strait_stats_render`).
pub const STRAIT_STATS_TABLE: u32 = 0;
/// The Prometheus text exposition format (`strait_stats_render`).
pub const STRAIT_STATS_PROMETHEUS: u32 = 1;

/// Frees a snapshot (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_stats_destroy(stats: *mut strait_stats) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_stats>(stats, "stats") }.map(drop))
}
