//! The C API of strait: `libstrait.so` / `libstrait.a` and `strait.h`.
//!
//! Every exported function returns a [`strait_status`] (the getters too),
//! writes results through out-pointers, and never lets a Rust panic cross
//! the boundary: a panic becomes `STRAIT_STATUS_PANIC`. Handles are
//! pointers to boxed values tagged with a per-type magic number, so a null
//! pointer or a handle of the wrong type is an error, not a crash.
//!
//! `ffi/include/strait.h` is generated from these declarations by cbindgen
//! (`ffi/tests/header.rs` fails when it is stale; `STRAIT_BLESS=1` rewrites
//! it). The header's comments are the doc comments here.

#![allow(non_camel_case_types)]
// Every exported function checks its pointers itself (null and handle tags)
// and documents what the caller must guarantee in the header.
#![allow(clippy::missing_safety_doc)]

mod engine;
mod kv;
mod moe;
mod stats;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use strait_rs::Error;

pub use engine::*;
pub use kv::*;
pub use moe::*;
pub use stats::*;

/// The outcome of every call: `STRAIT_STATUS_OK`, `STRAIT_STATUS_PENDING`
/// (polls only), or an error. The first group mirrors the kinds of the Rust
/// `strait::Error` one to one; the second is the C API's own. After an
/// error, `strait_last_error_message()` says what went wrong.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum strait_status {
    /// Success.
    Ok = 0,
    /// A poll: the request, counter or call has not ended yet.
    Pending = 1,
    /// The transport library or its devices are not on this machine
    /// (`Error::BackendUnavailable`).
    BackendUnavailable = 2,
    /// A libfabric call failed (`Error::Fabric`).
    Fabric = 3,
    /// A libibverbs call failed (`Error::Verbs`).
    Verbs = 4,
    /// Registering memory failed (`Error::RegisterMemory`).
    RegisterMemory = 5,
    /// Descriptor, address, request or layout bytes could not be decoded
    /// (`Error::InvalidDescriptor`).
    InvalidDescriptor = 6,
    /// An offset and length fall outside a region (`Error::OutOfBounds`).
    OutOfBounds = 7,
    /// A request's arguments are inconsistent (`Error::InvalidRequest`).
    InvalidRequest = 8,
    /// The peer cannot be reached, or stopped answering
    /// (`Error::PeerUnreachable`).
    PeerUnreachable = 9,
    /// The peer refused the access: wrong key, revoked region, no
    /// permission (`Error::RemoteAccess`).
    RemoteAccess = 10,
    /// A transport error reported by a completion (`Error::Transport`).
    Transport = 11,
    /// A wait ran past its timeout; the request carries on
    /// (`Error::Timeout`).
    Timeout = 12,
    /// The engine shut down before the request ended (`Error::Shutdown`).
    Shutdown = 13,
    /// The request or counter was cancelled (`Error::Cancelled`).
    Cancelled = 14,
    /// The two sides of a KV transfer describe different models
    /// (`Error::LayoutMismatch`).
    LayoutMismatch = 15,
    /// A request was abandoned by this side or the peer, with a reason
    /// (`Error::Aborted`).
    Aborted = 16,
    /// The call would block the engine's own thread on itself, e.g.
    /// registering memory from a completion callback
    /// (`Error::WouldDeadlock`).
    WouldDeadlock = 17,
    /// An error of a kind newer than this header.
    Other = 18,
    /// CUDA is unavailable (no driver), or a CUDA call failed
    /// (`Error::Cuda`).
    Cuda = 19,
    /// A required pointer argument was NULL.
    NullArgument = 32,
    /// A handle argument is not a live handle of the expected type.
    WrongHandle = 33,
    /// The output buffer is too small; the length out-parameter holds the
    /// size needed.
    BufferTooSmall = 34,
    /// A string argument is not UTF-8.
    InvalidString = 35,
    /// strait panicked inside the call (a bug: please report it with the
    /// message). The call had no effect beyond what the message says.
    Panic = 36,
}

/// Wait forever, where a call takes `timeout_ms`.
pub const STRAIT_WAIT_FOREVER: u64 = u64::MAX;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the last call on this thread that did not return
/// `STRAIT_STATUS_OK` or `STRAIT_STATUS_PENDING` (an empty string before
/// any). Valid until the next failing call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn strait_last_error_message() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// The name of a status value (`"STRAIT_STATUS_TIMEOUT"`), or
/// `"STRAIT_STATUS_UNKNOWN"` for a value that is none; a static string,
/// never NULL.
#[no_mangle]
pub extern "C" fn strait_status_name(status: i32) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"STRAIT_STATUS_OK",
        1 => c"STRAIT_STATUS_PENDING",
        2 => c"STRAIT_STATUS_BACKEND_UNAVAILABLE",
        3 => c"STRAIT_STATUS_FABRIC",
        4 => c"STRAIT_STATUS_VERBS",
        5 => c"STRAIT_STATUS_REGISTER_MEMORY",
        6 => c"STRAIT_STATUS_INVALID_DESCRIPTOR",
        7 => c"STRAIT_STATUS_OUT_OF_BOUNDS",
        8 => c"STRAIT_STATUS_INVALID_REQUEST",
        9 => c"STRAIT_STATUS_PEER_UNREACHABLE",
        10 => c"STRAIT_STATUS_REMOTE_ACCESS",
        11 => c"STRAIT_STATUS_TRANSPORT",
        12 => c"STRAIT_STATUS_TIMEOUT",
        13 => c"STRAIT_STATUS_SHUTDOWN",
        14 => c"STRAIT_STATUS_CANCELLED",
        15 => c"STRAIT_STATUS_LAYOUT_MISMATCH",
        16 => c"STRAIT_STATUS_ABORTED",
        17 => c"STRAIT_STATUS_WOULD_DEADLOCK",
        18 => c"STRAIT_STATUS_OTHER",
        19 => c"STRAIT_STATUS_CUDA",
        32 => c"STRAIT_STATUS_NULL_ARGUMENT",
        33 => c"STRAIT_STATUS_WRONG_HANDLE",
        34 => c"STRAIT_STATUS_BUFFER_TOO_SMALL",
        35 => c"STRAIT_STATUS_INVALID_STRING",
        36 => c"STRAIT_STATUS_PANIC",
        _ => c"STRAIT_STATUS_UNKNOWN",
    };
    name.as_ptr()
}

/// The status of a Rust error.
pub(crate) fn status_of(e: &Error) -> strait_status {
    match e {
        Error::BackendUnavailable { .. } => strait_status::BackendUnavailable,
        Error::Fabric { .. } => strait_status::Fabric,
        Error::Verbs { .. } => strait_status::Verbs,
        Error::RegisterMemory { .. } => strait_status::RegisterMemory,
        Error::InvalidDescriptor { .. } => strait_status::InvalidDescriptor,
        Error::OutOfBounds { .. } => strait_status::OutOfBounds,
        Error::InvalidRequest(_) => strait_status::InvalidRequest,
        Error::PeerUnreachable(_) => strait_status::PeerUnreachable,
        Error::RemoteAccess(_) => strait_status::RemoteAccess,
        Error::Transport { .. } => strait_status::Transport,
        Error::Timeout(_) => strait_status::Timeout,
        Error::Shutdown => strait_status::Shutdown,
        Error::Cancelled => strait_status::Cancelled,
        Error::LayoutMismatch { .. } => strait_status::LayoutMismatch,
        Error::Aborted { .. } => strait_status::Aborted,
        Error::WouldDeadlock(_) => strait_status::WouldDeadlock,
        Error::Cuda(_) => strait_status::Cuda,
        _ => strait_status::Other,
    }
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// A failed call whose message is recorded: returned by the bodies of the
/// exported functions, turned into its status at the boundary.
#[derive(Debug)]
pub(crate) struct Fail(strait_status);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        set_last_error(&e.to_string());
        Fail(status_of(&e))
    }
}

/// A failure of the C API's own (null pointer, wrong handle, ...).
pub(crate) fn fail(status: strait_status, message: impl AsRef<str>) -> Fail {
    set_last_error(message.as_ref());
    Fail(status)
}

pub(crate) type CResult<T = ()> = std::result::Result<T, Fail>;

/// Runs the body of an exported function: its result becomes a status, a
/// panic becomes `Panic` (with the panic's message), never an unwind into C.
pub(crate) fn call(body: impl FnOnce() -> CResult) -> strait_status {
    call_status(|| body().map(|()| strait_status::Ok))
}

/// As [`call`], for bodies that choose their success status (polls).
pub(crate) fn call_status(body: impl FnOnce() -> CResult<strait_status>) -> strait_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(Fail(status))) => status,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            set_last_error(&format!("strait panicked: {what}"));
            strait_status::Panic
        }
    }
}

/// The status (and recorded message) of a request's outcome.
pub(crate) fn outcome_status(outcome: &strait_rs::Result<()>) -> strait_status {
    match outcome {
        Ok(()) => strait_status::Ok,
        Err(e) => Fail::from(e.clone()).0,
    }
}

/// A timeout argument: `STRAIT_WAIT_FOREVER` is none.
pub(crate) fn timeout_of(ms: u64) -> Option<Duration> {
    (ms != STRAIT_WAIT_FOREVER).then(|| Duration::from_millis(ms))
}

// ---- Handles -------------------------------------------------------------

/// What a handle pointer points at: the type's magic number, then the value.
#[repr(C)]
struct Tagged<T> {
    magic: u64,
    value: T,
}

/// Magic of a destroyed handle (a use after destroy is still undefined
/// behaviour; this catches some of them).
const DEAD: u64 = 0xdead_dead_dead_dead;

/// An opaque C handle type and the Rust value behind it.
pub(crate) trait Handle {
    /// The value behind the handle.
    type Value;
    /// Tags the handle's allocation.
    const MAGIC: u64;
    /// The type's name in messages.
    const NAME: &'static str;
}

macro_rules! handle {
    ($c:ident, $value:ty, $magic:expr) => {
        impl $crate::Handle for $c {
            type Value = $value;
            const MAGIC: u64 = $magic;
            const NAME: &'static str = stringify!($c);
        }
    };
}
pub(crate) use handle;

/// Moves `value` into a new handle of type `H`.
pub(crate) fn new_handle<H: Handle>(value: H::Value) -> *mut H {
    Box::into_raw(Box::new(Tagged { magic: H::MAGIC, value })).cast()
}

/// The value behind handle `p`, checked: not NULL, tagged as an `H`.
///
/// # Safety
/// `p` is NULL or points at least 8 readable bytes (any live strait handle
/// does).
pub(crate) unsafe fn get<'a, H: Handle>(p: *const H, what: &str) -> CResult<&'a H::Value> {
    if p.is_null() {
        return Err(fail(strait_status::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: every strait handle starts with its u64 magic (Tagged is
    // repr(C)), and the caller passes a live handle pointer.
    let magic = unsafe { p.cast::<u64>().read() };
    if magic != H::MAGIC {
        return Err(fail(strait_status::WrongHandle, format!("{what} is not a live {}", H::NAME)));
    }
    // SAFETY: the magic says it is a Tagged<H::Value>.
    Ok(unsafe { &(*p.cast::<Tagged<H::Value>>()).value })
}

/// As [`get`], mutably (for handles documented as not thread-safe).
///
/// # Safety
/// As [`get`], and no other reference to the value is live.
pub(crate) unsafe fn get_mut<'a, H: Handle>(p: *mut H, what: &str) -> CResult<&'a mut H::Value> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<H>(p, what)? };
    // SAFETY: checked above; exclusive by the caller's contract.
    Ok(unsafe { &mut (*p.cast::<Tagged<H::Value>>()).value })
}

/// Takes the value out of handle `p` and frees it. NULL is a no-op.
///
/// # Safety
/// As [`get`]; `p` is not used again.
pub(crate) unsafe fn take<H: Handle>(p: *mut H, what: &str) -> CResult<Option<H::Value>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: as the caller's contract says.
    unsafe { get::<H>(p, what)? };
    // SAFETY: a live Tagged<H::Value> allocated by new_handle.
    let mut boxed = unsafe { Box::from_raw(p.cast::<Tagged<H::Value>>()) };
    boxed.magic = DEAD;
    let Tagged { value, .. } = *boxed;
    Ok(Some(value))
}

/// Writes `value` to the out-pointer `out` (`*out` is set to NULL first on
/// every path, so a failed call leaves no dangling handle).
///
/// # Safety
/// `out` is NULL or writable.
pub(crate) unsafe fn put<T>(out: *mut T, value: T, what: &str) -> CResult {
    if out.is_null() {
        return Err(fail(strait_status::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: non-null and writable by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Checks an out-pointer up front and clears it, so that every failure
/// path leaves NULL there.
///
/// # Safety
/// `out` is NULL or writable.
pub(crate) unsafe fn clear_out<H>(out: *mut *mut H, what: &str) -> CResult {
    // SAFETY: as the caller's contract says.
    unsafe { put(out, std::ptr::null_mut(), what) }
}

/// `n` elements at `p` (`p` may be NULL when `n` is 0).
///
/// # Safety
/// `p..p+n` is readable when `n > 0`, and stays unchanged during the call.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> CResult<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(fail(strait_status::NullArgument, format!("{what} is NULL with a length of {n}")));
    }
    // SAFETY: readable by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
pub(crate) unsafe fn string<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return Err(fail(strait_status::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| fail(strait_status::InvalidString, format!("{what} is not UTF-8")))
}

/// Copies `data` out: `*len` is set to its length; it is copied to `buf`
/// if `cap` is enough, else `BufferTooSmall` (call with `buf` NULL and
/// `cap` 0 to ask for the size).
///
/// # Safety
/// `buf..buf+cap` is writable (or `cap` is 0); `len` is NULL or writable.
pub(crate) unsafe fn bytes_out(data: &[u8], buf: *mut u8, cap: usize, len: *mut usize) -> CResult {
    // SAFETY: as the caller's contract says.
    unsafe { put(len, data.len(), "the length out-pointer")? };
    if cap < data.len() || (buf.is_null() && !data.is_empty()) {
        return Err(fail(strait_status::BufferTooSmall, format!("{} bytes do not fit a buffer of {cap}", data.len())));
    }
    // SAFETY: `buf` has room for `data.len()` bytes, and cannot overlap a
    // Rust-owned `data`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    Ok(())
}

/// A user's pointer handed back to its callback on another thread.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub *mut std::ffi::c_void);
// SAFETY: strait never dereferences it; the header tells the caller that
// callbacks run on the engine's thread with this pointer.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

impl UserData {
    /// The pointer (a method, so closures capture the whole `UserData`,
    /// which is `Send`, not its raw field).
    pub(crate) fn get(self) -> *mut std::ffi::c_void {
        self.0
    }
}

/// The message of an error as a C string for a callback (valid during the
/// callback).
pub(crate) fn message_of(outcome: &strait_rs::Result<()>) -> Option<CString> {
    outcome.as_ref().err().map(|e| CString::new(e.to_string().replace('\0', "\\0")).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: never NULL, NUL-terminated.
        unsafe { CStr::from_ptr(strait_last_error_message()) }.to_str().unwrap().to_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_with_its_message() {
        let s = call(|| panic!("boom {}", 7));
        assert_eq!(s, strait_status::Panic);
        assert_eq!(last(), "strait panicked: boom 7");
    }

    #[test]
    fn every_status_has_its_header_name() {
        use strait_status as S;
        let all = [
            S::Ok,
            S::Pending,
            S::BackendUnavailable,
            S::Fabric,
            S::Verbs,
            S::RegisterMemory,
            S::InvalidDescriptor,
            S::OutOfBounds,
            S::InvalidRequest,
            S::PeerUnreachable,
            S::RemoteAccess,
            S::Transport,
            S::Timeout,
            S::Shutdown,
            S::Cancelled,
            S::LayoutMismatch,
            S::Aborted,
            S::WouldDeadlock,
            S::Other,
            S::Cuda,
            S::NullArgument,
            S::WrongHandle,
            S::BufferTooSmall,
            S::InvalidString,
            S::Panic,
        ];
        for s in all {
            // Debug name in CamelCase, header name in SCREAMING_SNAKE_CASE.
            let mut want = String::from("STRAIT_STATUS");
            for c in format!("{s:?}").chars() {
                if c.is_uppercase() {
                    want.push('_');
                }
                want.push(c.to_ascii_uppercase());
            }
            // SAFETY: a static NUL-terminated string.
            let got = unsafe { CStr::from_ptr(strait_status_name(s as i32)) }.to_str().unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn errors_map_to_their_statuses() {
        let cases = [
            (Error::Timeout(Duration::from_millis(1)), strait_status::Timeout),
            (Error::Shutdown, strait_status::Shutdown),
            (Error::PeerUnreachable("x".into()), strait_status::PeerUnreachable),
            (Error::InvalidRequest("x".into()), strait_status::InvalidRequest),
            (Error::WouldDeadlock("x"), strait_status::WouldDeadlock),
            (Error::Cuda("x".into()), strait_status::Cuda),
        ];
        for (e, s) in cases {
            let message = e.to_string();
            assert_eq!(Fail::from(e).0, s);
            assert_eq!(last(), message);
        }
    }
}
