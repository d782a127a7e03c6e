//! Owners of libfabric objects: one Rust owner per native handle, closed on
//! drop, holding its parent alive.

use std::sync::Arc;

use fabric_sys as sys;

use crate::error::{Error, Result};

/// Turns a libfabric return code into a `Result`: the one place where C
/// return codes become errors.
pub(crate) fn check(call: &'static str, code: isize) -> Result<isize> {
    if code >= 0 {
        Ok(code)
    } else {
        Err(fabric_error(call, code as i32))
    }
}

/// The error for a negative libfabric return code.
pub(crate) fn fabric_error(call: &'static str, code: i32) -> Error {
    let message = sys::Library::get().map(|l| l.strerror(code)).unwrap_or_default();
    Error::Fabric { call, code, message }
}

/// An open libfabric object of type `T` (a `fid_*` struct whose first field
/// is its `struct fid`), closed with `fi_close` on drop after which `parent`
/// is released.
pub(crate) struct Owned<T, P = ()> {
    ptr: *mut T,
    what: &'static str,
    _parent: P,
}

// SAFETY: a libfabric object may be used from any thread as long as calls on
// it are serialised; the engine's worker is its only user (FI_THREAD_DOMAIN),
// and moving the owner between threads moves that right with it.
unsafe impl<T, P: Send> Send for Owned<T, P> {}
// SAFETY: shared references only read the pointer value; every call through
// it takes `&mut` on the NIC that owns this handle, or happens in `Drop`.
unsafe impl<T, P: Sync> Sync for Owned<T, P> {}

impl<T, P> Owned<T, P> {
    /// Takes ownership of `ptr`, just returned by an open call.
    ///
    /// # Safety
    /// `ptr` must be a live libfabric object whose layout starts with
    /// `struct fid`, owned by nobody else; `parent` must be what it depends on.
    pub(crate) unsafe fn new(ptr: *mut T, what: &'static str, parent: P) -> Self {
        Owned { ptr, what, _parent: parent }
    }

    pub(crate) fn as_ptr(&self) -> *mut T {
        self.ptr
    }

    pub(crate) fn fid(&self) -> *mut sys::fid {
        self.ptr.cast()
    }
}

impl<T, P> Drop for Owned<T, P> {
    fn drop(&mut self) {
        // SAFETY: `ptr` is live and ours alone (see `new`); it is not used
        // after this. Children were dropped first by construction.
        let rc = unsafe { sys::ops::fi_close(self.fid()) };
        if rc != 0 {
            // Recorded, not raised: a close failing in teardown cannot be
            // acted on, and panicking in a worker would lose every request.
            tracing::warn!(object = self.what, error = %fabric_error("fi_close", rc), "closing a libfabric object failed");
        }
    }
}

/// The fabric, shared by the group's domains.
pub(crate) type Fabric = Arc<Owned<sys::fid_fabric>>;
/// A domain (one per NIC), keeping its fabric alive.
pub(crate) type Domain = Arc<Owned<sys::fid_domain, Fabric>>;
