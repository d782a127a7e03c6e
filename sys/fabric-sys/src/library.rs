//! Finding and opening libfabric at run time.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use crate::bindings::{fi_fabric_attr, fi_info, fid_fabric};

/// Environment variable naming the libfabric shared object to use (a full
/// path, or a name the dynamic loader can find). When set, it is the only
/// candidate: an override that silently fell back to another copy would hide
/// a broken install.
pub const ENV_LIBRARY_PATH: &str = "STRAIT_LIBFABRIC";

/// Where libfabric is looked for, in order, unless [`ENV_LIBRARY_PATH`] is set:
/// AWS's EFA installer first (it carries the `efa` provider), then the
/// system library.
pub const SEARCH_PATHS: [&str; 2] = ["/opt/amazon/efa/lib/libfabric.so.1", "libfabric.so.1"];

type GetInfoFn =
    unsafe extern "C" fn(u32, *const c_char, *const c_char, u64, *const fi_info, *mut *mut fi_info) -> c_int;
type FreeInfoFn = unsafe extern "C" fn(*mut fi_info);
type DupInfoFn = unsafe extern "C" fn(*const fi_info) -> *mut fi_info;
type FabricFn = unsafe extern "C" fn(*mut fi_fabric_attr, *mut *mut fid_fabric, *mut c_void) -> c_int;
type StrErrorFn = unsafe extern "C" fn(c_int) -> *const c_char;
type VersionFn = unsafe extern "C" fn() -> u32;

/// libfabric could not be opened: every place searched, with the reason.
#[derive(Clone, Debug)]
pub struct LoadError {
    /// `(path, why it failed)` for every candidate tried, in order.
    pub attempts: Vec<(String, String)>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "libfabric not found (searched")?;
        for (i, (path, why)) in self.attempts.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{path}: {why}")?;
        }
        write!(f, "); install it with `apt-get install libfabric1`, or set {ENV_LIBRARY_PATH} to its path")
    }
}

impl std::error::Error for LoadError {}

/// The exported libfabric functions strait calls, resolved from one loaded
/// copy of the library. Obtain it with [`Library::get`].
///
/// Versioned symbols are resolved at the version matching the headers the
/// bindings came from (`fi_getinfo@FABRIC_1.3`, ...), so that a newer
/// libfabric hands back structures of the layout these bindings describe.
pub struct Library {
    /// Where the library was found.
    pub path: String,
    pub fi_getinfo: GetInfoFn,
    pub fi_freeinfo: FreeInfoFn,
    pub fi_dupinfo: DupInfoFn,
    pub fi_fabric: FabricFn,
    pub fi_strerror: StrErrorFn,
    pub fi_version: VersionFn,
    /// The library's version (`fi_version()`).
    pub version: u32,
    /// The API version strait asks it for ([`api_version`](crate::api_version)).
    pub api_version: u32,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library").field("path", &self.path).finish_non_exhaustive()
    }
}

static LIBRARY: OnceLock<Result<Library, LoadError>> = OnceLock::new();

impl Library {
    /// The process-wide libfabric, opened on first call. The library is never
    /// unloaded: providers start threads and register atexit handlers that
    /// must outlive every handle.
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
            match Self::open_path(path) {
                Ok(lib) => return Ok(lib),
                Err(why) => attempts.push((path.to_owned(), why)),
            }
        }
        Err(LoadError { attempts })
    }

    fn open_path(path: &str) -> Result<Library, String> {
        // SAFETY: loading libfabric runs its constructors, which only set up
        // provider tables; the handle is leaked on purpose (see `get`).
        let lib = unsafe { libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_LOCAL) }
            .map_err(|e| e.to_string())?;
        let handle = lib.into_raw();
        // SAFETY: each symbol is resolved from the handle just opened and
        // transmuted to the C signature libfabric declares for it in
        // fabric.h (the version named is the one those headers describe).
        let mut library = unsafe {
            Library {
                path: path.to_owned(),
                fi_getinfo: std::mem::transmute::<*mut c_void, GetInfoFn>(symbol(
                    handle,
                    c"fi_getinfo",
                    c"FABRIC_1.3",
                )?),
                fi_freeinfo: std::mem::transmute::<*mut c_void, FreeInfoFn>(symbol(
                    handle,
                    c"fi_freeinfo",
                    c"FABRIC_1.3",
                )?),
                fi_dupinfo: std::mem::transmute::<*mut c_void, DupInfoFn>(symbol(
                    handle,
                    c"fi_dupinfo",
                    c"FABRIC_1.3",
                )?),
                fi_fabric: std::mem::transmute::<*mut c_void, FabricFn>(symbol(handle, c"fi_fabric", c"FABRIC_1.1")?),
                fi_strerror: std::mem::transmute::<*mut c_void, StrErrorFn>(symbol(
                    handle,
                    c"fi_strerror",
                    c"FABRIC_1.0",
                )?),
                fi_version: std::mem::transmute::<*mut c_void, VersionFn>(symbol(
                    handle,
                    c"fi_version",
                    c"FABRIC_1.0",
                )?),
                version: 0,
                api_version: 0,
            }
        };
        // SAFETY: fi_version takes nothing and returns the library's version.
        library.version = unsafe { (library.fi_version)() };
        check_version(library.version)?;
        library.api_version = crate::api_version(library.version);
        Ok(library)
    }

    /// `fi_strerror` as an owned string.
    pub fn strerror(&self, errnum: c_int) -> String {
        // SAFETY: fi_strerror returns a pointer to a static NUL-terminated
        // string for any input.
        unsafe {
            let s = (self.fi_strerror)(errnum.abs());
            if s.is_null() {
                format!("libfabric error {errnum}")
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        }
    }
}

/// The oldest libfabric strait runs on: the version its bindings were
/// generated from ([`BINDINGS_VERSION`](crate::BINDINGS_VERSION)). An older
/// library would not know that API version. (EFA's zero-byte writes, which
/// carry an immediate alone, need the `efa` fabric of 1.19 or later; see
/// the engine's EFA docs.)
pub const MIN_LIBRARY_VERSION: (u32, u32) = (1, 17);

/// Refuses a library older than [`MIN_LIBRARY_VERSION`], naming both.
pub fn check_version(version: u32) -> Result<(), String> {
    let (major, minor) = (version >> 16, version & 0xffff);
    if (major, minor) < MIN_LIBRARY_VERSION {
        return Err(format!(
            "libfabric {major}.{minor} is older than {}.{}, the oldest strait supports",
            MIN_LIBRARY_VERSION.0, MIN_LIBRARY_VERSION.1
        ));
    }
    Ok(())
}

/// Resolves `name` at `version`, falling back to the default version for a
/// library built without symbol versions.
///
/// # Safety
/// `handle` must be a live handle returned by `dlopen`.
unsafe fn symbol(handle: *mut c_void, name: &CStr, version: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: handle is live (caller), name and version are NUL-terminated.
    let mut sym = unsafe { libc::dlvsym(handle, name.as_ptr(), version.as_ptr()) };
    if sym.is_null() {
        // SAFETY: as above.
        sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
    }
    if sym.is_null() {
        Err(format!("symbol {} missing", name.to_string_lossy()))
    } else {
        Ok(sym)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_older_than_the_bindings_are_refused() {
        assert!(check_version(crate::fi_version(1, 17)).is_ok());
        assert!(check_version(crate::fi_version(1, 22)).is_ok());
        assert!(check_version(crate::fi_version(2, 1)).is_ok());
        let old = check_version(crate::fi_version(1, 14)).unwrap_err();
        assert!(old.contains("1.14") && old.contains("1.17"), "{old}");
        assert!(check_version(crate::fi_version(0, 99)).is_err());
    }

    /// 1.18 where the library has it (EFA's device RDMA), never newer than
    /// the library (it would refuse), never past the bindings' layouts.
    #[test]
    fn the_api_version_asked_for_fits_library_and_bindings() {
        use crate::{api_version, fi_version};
        assert_eq!(api_version(fi_version(1, 17)), fi_version(1, 17));
        assert_eq!(api_version(fi_version(1, 18)), fi_version(1, 18));
        assert_eq!(api_version(fi_version(1, 22)), fi_version(1, 18));
        assert_eq!(api_version(fi_version(2, 3)), fi_version(1, 18));
    }
}
