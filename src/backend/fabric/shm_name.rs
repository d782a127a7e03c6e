//! Names of shm endpoints.
//!
//! libfabric 1.17's shm names an endpoint after the process id
//! (`fi_shm://<pid>`, a `/dev/shm/<pid>:<uid>:<index>` region of 16 MiB) and
//! removes the region when the endpoint closes. A process that is killed
//! leaves its regions behind, and a later process that gets the same pid
//! cannot open shm at all (`fi_enable`: EBUSY) until they are removed. So
//! strait names its shm endpoints `fi_shm://strait-<pid>-<random>` (unique
//! per engine), and before naming one removes the regions of strait
//! processes that no longer exist, which also returns their memory.

use std::ffi::CString;

use fabric_sys as sys;

use crate::error::{Error, Result};

const PREFIX: &str = "strait-";

/// An `fi_info` copy carrying our endpoint name, freed on drop.
pub(super) struct Named(pub *mut sys::fi_info);

impl Drop for Named {
    fn drop(&mut self) {
        if let Ok(lib) = sys::Library::get() {
            // SAFETY: the copy came from fi_dupinfo and is freed once.
            unsafe { (lib.fi_freeinfo)(self.0) };
        }
    }
}

/// For an shm entry, a copy of it whose source address is a fresh strait
/// name; `None` for other providers (their names need no help).
///
/// # Safety
/// `info` must be a live `fi_info` from `fi_getinfo`.
pub(super) unsafe fn named_info(info: *mut sys::fi_info) -> Result<Option<Named>> {
    let shm = super::info::provider_name(info) == "shm";
    if !shm {
        return Ok(None);
    }
    remove_stale();
    let lib =
        sys::Library::get().map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
    let name = CString::new(format!("fi_shm://{PREFIX}{}-{:08x}", std::process::id(), crate::backend::random_u32()))
        .expect("no NUL");
    // SAFETY: info is live; the copy is ours until Named drops it. Its
    // src_addr is replaced by a malloc'ed string, which fi_freeinfo frees.
    unsafe {
        let copy = (lib.fi_dupinfo)(info);
        if copy.is_null() {
            return Err(Error::BackendUnavailable { backend: "shm", reason: "fi_dupinfo failed".into() });
        }
        libc::free((*copy).src_addr);
        (*copy).src_addr = libc::strdup(name.as_ptr()).cast();
        (*copy).src_addrlen = name.as_bytes_with_nul().len();
        (*copy).addr_format = sys::FI_ADDR_STR;
        Ok(Some(Named(copy)))
    }
}

/// The pid in a region name `strait-<pid>-<random>:<uid>:<index>`.
fn owner(file: &str) -> Option<i32> {
    file.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the shm regions of strait processes that have exited.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!(region = ?name, "removed the shm region of an exited process"),
                Err(e) => tracing::debug!(region = ?name, error = %e, "could not remove a stale shm region"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_read_from_our_names_only() {
        assert_eq!(owner("strait-1234-0badcafe:0:1"), Some(1234));
        assert_eq!(owner("1234:0:1"), None);
        assert_eq!(owner("strait-x-1:0:0"), None);
        assert_eq!(owner("other"), None);
    }
}
