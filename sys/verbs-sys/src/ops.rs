//! verbs' `static inline` data-path calls, written in Rust.
//!
//! In `infiniband/verbs.h` these are one-line wrappers that call through the
//! device context's operation table (`qp->context->ops.post_send(...)`);
//! they are not exported by libibverbs, so they are reproduced here with the
//! same names and arguments. An entry a provider left empty yields `ENOSYS`
//! (or `-ENOSYS` where the call returns a count).
//!
//! # Safety (all functions)
//! Every pointer argument must be what the C function of the same name
//! requires: a live verbs object, and work requests whose buffers stay valid
//! (and registered) until their completions are polled.

use std::ffi::c_int;

use crate::bindings::*;

/// `ibv_post_send(qp, wr, bad_wr)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn ibv_post_send(qp: *mut ibv_qp, wr: *mut ibv_send_wr, bad_wr: *mut *mut ibv_send_wr) -> c_int {
    // SAFETY: the caller guarantees a live QP, so its context and table are
    // live; the provider installed the entry with this signature.
    unsafe { (*(*qp).context).ops.post_send.map_or(libc::ENOSYS, |f| f(qp, wr, bad_wr)) }
}

/// `ibv_post_recv(qp, wr, bad_wr)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn ibv_post_recv(qp: *mut ibv_qp, wr: *mut ibv_recv_wr, bad_wr: *mut *mut ibv_recv_wr) -> c_int {
    // SAFETY: as for ibv_post_send.
    unsafe { (*(*qp).context).ops.post_recv.map_or(libc::ENOSYS, |f| f(qp, wr, bad_wr)) }
}

/// `ibv_post_srq_recv(srq, wr, bad_wr)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn ibv_post_srq_recv(srq: *mut ibv_srq, wr: *mut ibv_recv_wr, bad_wr: *mut *mut ibv_recv_wr) -> c_int {
    // SAFETY: as for ibv_post_send, with the SRQ's context.
    unsafe { (*(*srq).context).ops.post_srq_recv.map_or(libc::ENOSYS, |f| f(srq, wr, bad_wr)) }
}

/// `ibv_poll_cq(cq, num_entries, wc)`: completions read, or negative on error.
///
/// # Safety
/// See the module docs; `wc` must have room for `num_entries` entries.
pub unsafe fn ibv_poll_cq(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int {
    // SAFETY: as for ibv_post_send, with the CQ's context.
    unsafe { (*(*cq).context).ops.poll_cq.map_or(-libc::ENOSYS, |f| f(cq, num_entries, wc)) }
}

/// `ibv_req_notify_cq(cq, solicited_only)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn ibv_req_notify_cq(cq: *mut ibv_cq, solicited_only: c_int) -> c_int {
    // SAFETY: as for ibv_post_send, with the CQ's context.
    unsafe { (*(*cq).context).ops.req_notify_cq.map_or(libc::ENOSYS, |f| f(cq, solicited_only)) }
}

/// `ibv_query_gid_ex(context, port, index, entry, flags)` through
/// `_ibv_query_gid_ex`, when the library has it.
///
/// # Safety
/// See the module docs.
pub unsafe fn ibv_query_gid_ex(
    lib: &crate::Library,
    context: *mut ibv_context,
    port_num: u32,
    gid_index: u32,
    entry: *mut ibv_gid_entry,
    flags: u32,
) -> c_int {
    match lib._ibv_query_gid_ex {
        // SAFETY: as the caller guarantees; the size is that of the layout
        // the bindings describe, as the C inline passes it.
        Some(f) => unsafe { f(context, port_num, gid_index, entry, flags, std::mem::size_of::<ibv_gid_entry>()) },
        None => libc::EOPNOTSUPP,
    }
}
