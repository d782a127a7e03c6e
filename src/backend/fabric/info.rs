//! Choosing a provider and its `fi_info` with `fi_getinfo`.

use std::ffi::{CStr, CString};
use std::ptr;

use fabric_sys as sys;

use crate::error::{Error, Result};
use crate::provider::{Provider, ProviderKind};

/// The mr_mode bits strait can honour; the provider keeps those it needs.
fn offered_mr_mode(hmem: bool) -> i32 {
    let mut mode =
        sys::FI_MR_LOCAL | sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY | sys::FI_MR_ENDPOINT;
    if hmem {
        mode |= sys::FI_MR_HMEM;
    }
    mode as i32
}

/// A list of `fi_info` from `fi_getinfo`, freed on drop.
pub(crate) struct InfoList {
    head: *mut sys::fi_info,
    lib: &'static sys::Library,
}

// SAFETY: the list is plain heap data owned by this value alone.
unsafe impl Send for InfoList {}

impl Drop for InfoList {
    fn drop(&mut self) {
        if !self.head.is_null() {
            // SAFETY: head came from fi_getinfo and is freed once.
            unsafe { (self.lib.fi_freeinfo)(self.head) };
        }
    }
}

impl InfoList {
    /// The entries in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = *mut sys::fi_info> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur.is_null() {
                return None;
            }
            let this = cur;
            // SAFETY: entries of a list from fi_getinfo are valid until freed.
            cur = unsafe { (*cur).next };
            Some(this)
        })
    }
}

/// Name of the provider of `info` (e.g. `tcp;ofi_rxm`).
pub(crate) fn provider_name(info: *mut sys::fi_info) -> String {
    // SAFETY: info and its fabric_attr come from fi_getinfo; prov_name is a
    // NUL-terminated string or null.
    unsafe { cstr((*(*info).fabric_attr).prov_name) }
}

/// Name of the domain of `info` (e.g. `lo`, `rdmap0s31-rdm`).
pub(crate) fn domain_name(info: *mut sys::fi_info) -> String {
    // SAFETY: as for provider_name.
    unsafe { cstr((*(*info).domain_attr).name) }
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller guarantees NUL termination.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Options that shape `fi_getinfo` hints.
#[derive(Clone, Debug, Default)]
pub(crate) struct InfoRequest {
    /// Restrict to this domain (tcp: the interface, e.g. `lo`).
    pub domain: Option<String>,
    /// Ask for device memory support (EFA with GPUs).
    pub hmem: bool,
}

/// Queries `kind` and returns its RDM entries, best first.
pub(crate) fn query(kind: ProviderKind, request: &InfoRequest) -> Result<InfoList> {
    let lib =
        sys::Library::get().map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
    // SAFETY: fi_dupinfo(NULL) is fi_allocinfo: a zeroed fi_info with all
    // attribute structs allocated, owned by us until fi_freeinfo.
    let hints = unsafe { (lib.fi_dupinfo)(ptr::null()) };
    if hints.is_null() {
        return Err(Error::BackendUnavailable { backend: "libfabric", reason: "fi_allocinfo failed".into() });
    }
    // SAFETY: hints is a fresh fi_info with non-null attribute structs; the
    // strings are strdup'ed because fi_freeinfo frees them with free().
    unsafe {
        let h = &mut *hints;
        h.caps = (sys::FI_MSG | sys::FI_RMA | sys::FI_READ | sys::FI_WRITE | sys::FI_RECV | sys::FI_SEND) as u64
            | (sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64;
        if request.hmem {
            h.caps |= sys::FI_HMEM;
        }
        h.mode = sys::FI_CONTEXT | sys::FI_CONTEXT2 | sys::FI_RX_CQ_DATA;
        (*h.ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
        let d = &mut *h.domain_attr;
        d.mr_mode = offered_mr_mode(request.hmem);
        d.threading = sys::fi_threading_FI_THREAD_DOMAIN;
        d.av_type = sys::fi_av_type_FI_AV_TABLE;
        if let Some(name) = &request.domain {
            let c =
                CString::new(name.as_str()).map_err(|_| Error::InvalidRequest("interface name has a NUL".into()))?;
            d.name = libc::strdup(c.as_ptr());
        }
        let prov = CString::new(kind.fabric_name()).expect("no NUL");
        (*h.fabric_attr).prov_name = libc::strdup(prov.as_ptr());
    }
    let mut info = ptr::null_mut();
    // SAFETY: hints is a valid fi_info; info receives a list we free in
    // InfoList::drop. Hints are freed right after.
    let rc = unsafe { (lib.fi_getinfo)(sys::API_VERSION, ptr::null(), ptr::null(), 0, hints, &mut info) };
    // SAFETY: hints is ours and not used again.
    unsafe { (lib.fi_freeinfo)(hints) };
    let list = InfoList { head: info, lib };
    if rc == -(sys::FI_ENODATA as i32) || (rc == 0 && info.is_null()) {
        let why = match &request.domain {
            Some(d) => format!("provider {kind} offers no RDM endpoint on domain {d:?}"),
            None => format!(
                "provider {kind} offers no RDM endpoint here (no device, or not built into this libfabric at {})",
                lib.path
            ),
        };
        return Err(Error::BackendUnavailable { backend: kind.fabric_name(), reason: why });
    }
    if rc != 0 {
        return Err(super::handle::fabric_error("fi_getinfo", rc));
    }
    // "tcp" may also match the older `sockets`-style providers through
    // layering; keep only entries whose provider name starts with the one
    // asked for (libfabric 1.18+ renames `net` to `tcp`, so match prefixes).
    if !list.iter().any(|i| provider_name(i).starts_with(kind.fabric_name())) {
        return Err(Error::BackendUnavailable {
            backend: kind.fabric_name(),
            reason: "no matching provider entry".into(),
        });
    }
    Ok(list)
}

/// Resolves `Auto` (libfabric's part of it: efa, then tcp) or an explicit choice to a provider and
/// its entries. Each unavailable candidate's reason is kept for the error.
pub(crate) fn select(provider: Provider, request: &InfoRequest) -> Result<(ProviderKind, InfoList)> {
    let candidates: &[ProviderKind] = match provider {
        Provider::Auto => &[ProviderKind::Efa, ProviderKind::Tcp],
        Provider::Efa => &[ProviderKind::Efa],
        Provider::Tcp => &[ProviderKind::Tcp],
        Provider::Shm => &[ProviderKind::Shm],
        // Not a libfabric provider here: the engine opens it itself.
        Provider::Verbs => &[],
    };
    let mut reasons = Vec::new();
    for &kind in candidates {
        // The interface restriction names a tcp interface; other providers
        // have their own domain names.
        let req =
            InfoRequest { domain: request.domain.clone().filter(|_| kind == ProviderKind::Tcp), ..request.clone() };
        match query(kind, &req) {
            Ok(list) => return Ok((kind, list)),
            Err(e @ Error::BackendUnavailable { backend: "libfabric", .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(provider = %kind, error = %e, "provider unavailable");
                reasons.push(e.to_string());
            }
        }
    }
    Err(Error::BackendUnavailable { backend: "libfabric", reason: reasons.join("; ") })
}

/// What `fi_getinfo` offers for one provider: its domains (with the
/// provider's full name), or why it is unavailable.
pub(crate) fn probe(kind: ProviderKind) -> std::result::Result<Vec<(String, String)>, String> {
    let list = query(kind, &InfoRequest::default()).map_err(|e| e.to_string())?;
    let mut domains: Vec<(String, String)> = Vec::new();
    for i in list.iter().filter(|&i| provider_name(i).starts_with(kind.fabric_name())) {
        let entry = (provider_name(i), domain_name(i));
        if !domains.contains(&entry) {
            domains.push(entry);
        }
    }
    Ok(domains)
}
