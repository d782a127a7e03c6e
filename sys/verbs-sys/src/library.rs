//! Finding and opening libibverbs at run time.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use crate::bindings::*;

/// Environment variable naming the libibverbs shared object to use (a full
/// path, or a name the dynamic loader can find). When set, it is the only
/// candidate.
pub const ENV_LIBRARY_PATH: &str = "STRAIT_LIBIBVERBS";

/// Where libibverbs is looked for unless [`ENV_LIBRARY_PATH`] is set: the
/// system library (MLNX_OFED installs its own copy under the same soname).
pub const SEARCH_PATHS: [&str; 1] = ["libibverbs.so.1"];

/// libibverbs could not be opened: every place searched, with the reason.
#[derive(Clone, Debug)]
pub struct LoadError {
    /// `(path, why it failed)` for every candidate tried, in order.
    pub attempts: Vec<(String, String)>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "libibverbs not found (searched")?;
        for (i, (path, why)) in self.attempts.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{path}: {why}")?;
        }
        write!(f, "); install it with `apt-get install libibverbs1 ibverbs-providers`, or set {ENV_LIBRARY_PATH}")
    }
}

impl std::error::Error for LoadError {}

/// Declares the function table: each entry's C signature, symbol name and
/// symbol version, required or optional.
macro_rules! verbs_library {
    (
        required { $($name:ident @ $ver:literal : fn($($arg:ty),*) -> $ret:ty;)* }
        optional { $($oname:ident @ $over:literal : fn($($oarg:ty),*) -> $oret:ty;)* }
    ) => {
        /// The exported libibverbs functions strait calls, resolved from one
        /// loaded copy of the library. Obtain it with [`Library::get`].
        ///
        /// Symbols are resolved at the version whose structure layouts the
        /// bindings describe (`ibv_open_device@IBVERBS_1.1`, ...), never at
        /// the 1.0 compatibility versions.
        pub struct Library {
            /// Where the library was found.
            pub path: String,
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            $(pub $oname: Option<unsafe extern "C" fn($($oarg),*) -> $oret>,)*
        }

        impl Library {
            fn resolve(path: &str, handle: *mut c_void) -> Result<Library, String> {
                // SAFETY: each symbol is resolved from a live handle and
                // transmuted to the C signature verbs.h declares for it at
                // the version named.
                unsafe {
                    Ok(Library {
                        path: path.to_owned(),
                        $($name: std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(
                            symbol(handle, concat!(stringify!($name), "\0"), concat!($ver, "\0"))
                                .ok_or_else(|| format!("symbol {} missing", stringify!($name)))?,
                        ),)*
                        $($oname: symbol(handle, concat!(stringify!($oname), "\0"), concat!($over, "\0")).map(|s| {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($oarg),*) -> $oret>(s)
                        }),)*
                    })
                }
            }
        }
    };
}

verbs_library! {
    required {
        ibv_get_device_list @ "IBVERBS_1.1": fn(*mut c_int) -> *mut *mut ibv_device;
        ibv_free_device_list @ "IBVERBS_1.1": fn(*mut *mut ibv_device) -> ();
        ibv_get_device_name @ "IBVERBS_1.1": fn(*mut ibv_device) -> *const c_char;
        ibv_open_device @ "IBVERBS_1.1": fn(*mut ibv_device) -> *mut ibv_context;
        ibv_close_device @ "IBVERBS_1.1": fn(*mut ibv_context) -> c_int;
        ibv_query_device @ "IBVERBS_1.1": fn(*mut ibv_context, *mut ibv_device_attr) -> c_int;
        // The exported symbol takes the compat layout and copies only that
        // prefix of the provider's answer (rdma-core verbs.c: it calls
        // `__lib_query_port` with `sizeof(struct _compat_ibv_port_attr)`,
        // which memcpys that many bytes), so fields after it (`port_cap_flags2`,
        // `active_speed_ex`) stay as the caller left them. strait reads none
        // of them; it passes a zeroed full `ibv_port_attr`.
        ibv_query_port @ "IBVERBS_1.1": fn(*mut ibv_context, u8, *mut _compat_ibv_port_attr) -> c_int;
        ibv_query_gid @ "IBVERBS_1.1": fn(*mut ibv_context, u8, c_int, *mut ibv_gid) -> c_int;
        ibv_alloc_pd @ "IBVERBS_1.1": fn(*mut ibv_context) -> *mut ibv_pd;
        ibv_dealloc_pd @ "IBVERBS_1.1": fn(*mut ibv_pd) -> c_int;
        ibv_reg_mr @ "IBVERBS_1.1": fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr;
        ibv_dereg_mr @ "IBVERBS_1.1": fn(*mut ibv_mr) -> c_int;
        ibv_create_comp_channel @ "IBVERBS_1.0": fn(*mut ibv_context) -> *mut ibv_comp_channel;
        ibv_destroy_comp_channel @ "IBVERBS_1.0": fn(*mut ibv_comp_channel) -> c_int;
        ibv_create_cq @ "IBVERBS_1.1": fn(*mut ibv_context, c_int, *mut c_void, *mut ibv_comp_channel, c_int) -> *mut ibv_cq;
        ibv_destroy_cq @ "IBVERBS_1.1": fn(*mut ibv_cq) -> c_int;
        ibv_get_cq_event @ "IBVERBS_1.1": fn(*mut ibv_comp_channel, *mut *mut ibv_cq, *mut *mut c_void) -> c_int;
        ibv_ack_cq_events @ "IBVERBS_1.1": fn(*mut ibv_cq, c_uint) -> ();
        ibv_create_srq @ "IBVERBS_1.1": fn(*mut ibv_pd, *mut ibv_srq_init_attr) -> *mut ibv_srq;
        ibv_destroy_srq @ "IBVERBS_1.1": fn(*mut ibv_srq) -> c_int;
        ibv_create_qp @ "IBVERBS_1.1": fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp;
        ibv_modify_qp @ "IBVERBS_1.1": fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int;
        ibv_destroy_qp @ "IBVERBS_1.1": fn(*mut ibv_qp) -> c_int;
        ibv_create_ah @ "IBVERBS_1.1": fn(*mut ibv_pd, *mut ibv_ah_attr) -> *mut ibv_ah;
        ibv_destroy_ah @ "IBVERBS_1.1": fn(*mut ibv_ah) -> c_int;
        ibv_wc_status_str @ "IBVERBS_1.1": fn(ibv_wc_status) -> *const c_char;
        ibv_get_async_event @ "IBVERBS_1.1": fn(*mut ibv_context, *mut ibv_async_event) -> c_int;
        ibv_ack_async_event @ "IBVERBS_1.1": fn(*mut ibv_async_event) -> ();
    }
    optional {
        ibv_reg_mr_iova2 @ "IBVERBS_1.8": fn(*mut ibv_pd, *mut c_void, usize, u64, c_uint) -> *mut ibv_mr;
        _ibv_query_gid_ex @ "IBVERBS_1.11": fn(*mut ibv_context, u32, u32, *mut ibv_gid_entry, u32, usize) -> c_int;
        ibv_reg_dmabuf_mr @ "IBVERBS_1.12": fn(*mut ibv_pd, u64, usize, u64, c_int, c_int) -> *mut ibv_mr;
    }
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library").field("path", &self.path).finish_non_exhaustive()
    }
}

static LIBRARY: OnceLock<Result<Library, LoadError>> = OnceLock::new();

impl Library {
    /// The process-wide libibverbs, opened on first call and never unloaded
    /// (device providers it loads keep global state).
    pub fn get() -> Result<&'static Library, LoadError> {
        LIBRARY.get_or_init(Self::open).as_ref().map_err(Clone::clone)
    }

    fn open() -> Result<Library, LoadError> {
        let mut attempts = Vec::new();
        let from_env = std::env::var(ENV_LIBRARY_PATH).ok().filter(|p| !p.is_empty());
        let candidates: Vec<&str> = match &from_env {
            Some(path) => vec![path.as_str()],
            None => SEARCH_PATHS.to_vec(),
        };
        for path in candidates {
            // SAFETY: loading libibverbs runs its constructors, which only
            // set up tables; the handle is leaked on purpose (see `get`).
            let opened = unsafe { libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            match opened.map_err(|e| e.to_string()).and_then(|lib| Self::resolve(path, lib.into_raw())) {
                Ok(lib) => return Ok(lib),
                Err(why) => attempts.push((path.to_owned(), why)),
            }
        }
        Err(LoadError { attempts })
    }

    /// `ibv_wc_status_str` as an owned string.
    pub fn status_str(&self, status: ibv_wc_status) -> String {
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string
        // for any value ("unknown" for values it does not know).
        unsafe {
            let s = (self.ibv_wc_status_str)(status);
            if s.is_null() {
                format!("status {status}")
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        }
    }
}

/// Resolves `name` at `version`, falling back to the default version for a
/// library built without symbol versions. Both strings end in NUL.
///
/// # Safety
/// `handle` must be a live handle returned by `dlopen`.
unsafe fn symbol(handle: *mut c_void, name: &str, version: &str) -> Option<*mut c_void> {
    let (name, version) = (name.as_ptr().cast::<c_char>(), version.as_ptr().cast::<c_char>());
    // SAFETY: handle is live (caller), name and version are NUL-terminated.
    let mut sym = unsafe { libc::dlvsym(handle, name, version) };
    if sym.is_null() {
        // SAFETY: as above.
        sym = unsafe { libc::dlsym(handle, name) };
    }
    (!sym.is_null()).then_some(sym)
}
