//! libfabric's `static inline` calls, written in Rust.
//!
//! In C these are one-line wrappers in the `rdma/fi_*.h` headers that call
//! through a function pointer in the object's operation table
//! (`ep->rma->writemsg(...)`). They are not exported by the library, so they
//! are reproduced here one to one, with the same names and arguments. A
//! provider that leaves an entry empty gets `-FI_ENOSYS`, as libfabric's own
//! `fi_no_*` stubs would return.
//!
//! # Safety (all functions)
//! Every pointer argument must be what the C function of the same name
//! requires: a live, open libfabric object of the right class, and buffers
//! valid for the lengths given, for as long as libfabric's documentation says
//! (for data-path calls, until the completion is read).

use std::ffi::{c_int, c_void};

use crate::bindings::*;

const ENOSYS: c_int = -(FI_ENOSYS as c_int);

/// Calls `(*table).op(args)`, or yields `-FI_ENOSYS` when the provider left
/// the entry empty.
macro_rules! call_op {
    ($table:expr, $op:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller guarantees the object (and so its table) is live
        // and that the arguments are what the C call requires; the provider
        // installed the entry with the C signature bindgen recorded.
        unsafe {
            match (*$table).$op {
                Some(f) => f($($arg),*),
                None => ENOSYS as _,
            }
        }
    }};
}

/// `fi_close(fid)`.
///
/// # Safety
/// See the module docs; `fid` must not be used afterwards.
pub unsafe fn fi_close(fid: *mut fid) -> c_int {
    call_op!((*fid).ops, close(fid))
}

/// `fi_control(fid, command, arg)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_control(fid: *mut fid, command: c_int, arg: *mut c_void) -> c_int {
    call_op!((*fid).ops, control(fid, command, arg))
}

/// `fi_domain(fabric, info, &domain, context)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_domain(
    fabric: *mut fid_fabric,
    info: *mut fi_info,
    domain: *mut *mut fid_domain,
    context: *mut c_void,
) -> c_int {
    call_op!((*fabric).ops, domain(fabric, info, domain, context))
}

/// `fi_trywait(fabric, fids, count)`: 0 when it is safe to block on the wait
/// objects of `fids`, `-FI_EAGAIN` when they must be read first.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_trywait(fabric: *mut fid_fabric, fids: *mut *mut fid, count: c_int) -> c_int {
    call_op!((*fabric).ops, trywait(fabric, fids, count))
}

/// `fi_endpoint(domain, info, &ep, context)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_endpoint(
    domain: *mut fid_domain,
    info: *mut fi_info,
    ep: *mut *mut fid_ep,
    context: *mut c_void,
) -> c_int {
    call_op!((*domain).ops, endpoint(domain, info, ep, context))
}

/// `fi_cq_open(domain, attr, &cq, context)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_cq_open(
    domain: *mut fid_domain,
    attr: *mut fi_cq_attr,
    cq: *mut *mut fid_cq,
    context: *mut c_void,
) -> c_int {
    call_op!((*domain).ops, cq_open(domain, attr, cq, context))
}

/// `fi_av_open(domain, attr, &av, context)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_av_open(
    domain: *mut fid_domain,
    attr: *mut fi_av_attr,
    av: *mut *mut fid_av,
    context: *mut c_void,
) -> c_int {
    call_op!((*domain).ops, av_open(domain, attr, av, context))
}

/// `fi_mr_regattr(domain, attr, flags, &mr)`.
///
/// # Safety
/// See the module docs; the registered memory must stay valid until the
/// region is closed.
pub unsafe fn fi_mr_regattr(
    domain: *mut fid_domain,
    attr: *const fi_mr_attr,
    flags: u64,
    mr: *mut *mut fid_mr,
) -> c_int {
    call_op!((*domain).mr, regattr(&mut (*domain).fid, attr, flags, mr))
}

/// `fi_mr_key(mr)`: the key a peer uses to reach the region.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_mr_key(mr: *mut fid_mr) -> u64 {
    // SAFETY: the caller guarantees `mr` is a live region.
    unsafe { (*mr).key }
}

/// `fi_mr_desc(mr)`: the local descriptor passed with buffers on data calls.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_mr_desc(mr: *mut fid_mr) -> *mut c_void {
    // SAFETY: the caller guarantees `mr` is a live region.
    unsafe { (*mr).mem_desc }
}

/// `fi_mr_bind(mr, bfid, flags)` (needed under `FI_MR_ENDPOINT`).
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_mr_bind(mr: *mut fid_mr, bfid: *mut fid, flags: u64) -> c_int {
    call_op!((*mr).fid.ops, bind(&mut (*mr).fid, bfid, flags))
}

/// `fi_mr_enable(mr)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_mr_enable(mr: *mut fid_mr) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { fi_control(&mut (*mr).fid, FI_ENABLE as c_int, std::ptr::null_mut()) }
}

/// `fi_ep_bind(ep, bfid, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_ep_bind(ep: *mut fid_ep, bfid: *mut fid, flags: u64) -> c_int {
    call_op!((*ep).fid.ops, bind(&mut (*ep).fid, bfid, flags))
}

/// `fi_enable(ep)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_enable(ep: *mut fid_ep) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { fi_control(&mut (*ep).fid, FI_ENABLE as c_int, std::ptr::null_mut()) }
}

/// `fi_setopt(&ep->fid, level, optname, optval, optlen)`.
///
/// # Safety
/// See the module docs; `optval` points at `optlen` bytes of the option's
/// C type.
pub unsafe fn fi_setopt(ep: *mut fid_ep, level: c_int, optname: c_int, optval: *const c_void, optlen: usize) -> c_int {
    call_op!((*ep).ops, setopt(&mut (*ep).fid, level, optname, optval, optlen))
}

/// `fi_getopt(&ep->fid, level, optname, optval, &optlen)`.
///
/// # Safety
/// See the module docs; `optval` has room for `*optlen` bytes.
pub unsafe fn fi_getopt(
    ep: *mut fid_ep,
    level: c_int,
    optname: c_int,
    optval: *mut c_void,
    optlen: *mut usize,
) -> c_int {
    call_op!((*ep).ops, getopt(&mut (*ep).fid, level, optname, optval, optlen))
}

/// `fi_getname(fid, addr, &addrlen)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_getname(ep: *mut fid_ep, addr: *mut c_void, addrlen: *mut usize) -> c_int {
    call_op!((*ep).cm, getname(&mut (*ep).fid, addr, addrlen))
}

/// `fi_av_insert(av, addr, count, fi_addr, flags, context)`: the number of
/// addresses inserted, or a negative error.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_av_insert(
    av: *mut fid_av,
    addr: *const c_void,
    count: usize,
    fi_addr: *mut fi_addr_t,
    flags: u64,
    context: *mut c_void,
) -> c_int {
    call_op!((*av).ops, insert(av, addr, count, fi_addr, flags, context))
}

/// `fi_writemsg(ep, msg, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_writemsg(ep: *mut fid_ep, msg: *const fi_msg_rma, flags: u64) -> isize {
    call_op!((*ep).rma, writemsg(ep, msg, flags))
}

/// `fi_readmsg(ep, msg, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_readmsg(ep: *mut fid_ep, msg: *const fi_msg_rma, flags: u64) -> isize {
    call_op!((*ep).rma, readmsg(ep, msg, flags))
}

/// `fi_sendmsg(ep, msg, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_sendmsg(ep: *mut fid_ep, msg: *const fi_msg, flags: u64) -> isize {
    call_op!((*ep).msg, sendmsg(ep, msg, flags))
}

/// `fi_recvmsg(ep, msg, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_recvmsg(ep: *mut fid_ep, msg: *const fi_msg, flags: u64) -> isize {
    call_op!((*ep).msg, recvmsg(ep, msg, flags))
}

/// `fi_cq_read(cq, buf, count)`: entries read, `-FI_EAGAIN` when empty,
/// `-FI_EAVAIL` when an error entry waits for [`fi_cq_readerr`].
///
/// # Safety
/// See the module docs; `buf` holds `count` entries of the CQ's format.
pub unsafe fn fi_cq_read(cq: *mut fid_cq, buf: *mut c_void, count: usize) -> isize {
    call_op!((*cq).ops, read(cq, buf, count))
}

/// `fi_cq_readerr(cq, buf, flags)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_cq_readerr(cq: *mut fid_cq, buf: *mut fi_cq_err_entry, flags: u64) -> isize {
    call_op!((*cq).ops, readerr(cq, buf, flags))
}

/// `fi_cq_strerror(cq, prov_errno, err_data, buf, len)`.
///
/// # Safety
/// See the module docs.
pub unsafe fn fi_cq_strerror(
    cq: *mut fid_cq,
    prov_errno: c_int,
    err_data: *const c_void,
    buf: *mut std::ffi::c_char,
    len: usize,
) -> *const std::ffi::c_char {
    // SAFETY: the caller guarantees `cq` is live.
    match unsafe { (*(*cq).ops).strerror } {
        // SAFETY: provider entry with the recorded signature; caller's args.
        Some(f) => unsafe { f(cq, prov_errno, err_data, buf, len) },
        None => std::ptr::null(),
    }
}
