//! Choosing a provider and its `fi_info` with `fi_getinfo`.

use std::ffi::{CStr, CString};
use std::ptr;

use fabric_sys as sys;

use crate::error::{Error, Result};
use crate::provider::{EfaFabric, Provider, ProviderKind};

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

/// Name of the fabric of `info` (e.g. `efa`, `efa-direct`, an IP subnet
/// for tcp).
pub(crate) fn fabric_name(info: *mut sys::fi_info) -> String {
    // SAFETY: as for provider_name.
    unsafe { cstr((*(*info).fabric_attr).name) }
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
    /// EFA: the fabric to open (named in the hints).
    pub efa_fabric: EfaFabric,
}

/// The names of one `fi_info` entry that decide whether a NIC opens on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryNames {
    pub provider: String,
    pub fabric: String,
    pub domain: String,
}

impl EntryNames {
    pub(crate) fn of(info: *mut sys::fi_info) -> Self {
        EntryNames { provider: provider_name(info), fabric: fabric_name(info), domain: domain_name(info) }
    }
}

/// The entries a group's NICs open on, as indices into `entries` (the
/// listing order of `fi_getinfo`): those of provider `kind` (by prefix:
/// `tcp;ofi_rxm` is tcp) and, when `fabric` is given, of that fabric only
/// (EFA lists `efa-direct` and `efa` entries under the same domain names);
/// one per domain, the first listed. With `wanted` domains (tcp
/// interfaces), exactly those, in that order, each of which must exist.
pub(crate) fn pick(
    entries: &[EntryNames],
    kind: ProviderKind,
    fabric: Option<&str>,
    wanted: &[String],
) -> Result<Vec<usize>> {
    let mut picked: Vec<usize> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let matches = e.provider.starts_with(kind.fabric_name())
            && fabric.is_none_or(|f| e.fabric == f)
            && (wanted.is_empty() || wanted.contains(&e.domain));
        if matches && !picked.iter().any(|&p| entries[p].domain == e.domain) {
            picked.push(i);
        }
    }
    let unavailable = |reason: String| Error::BackendUnavailable { backend: kind.fabric_name(), reason };
    if wanted.is_empty() {
        if picked.is_empty() {
            let listed: Vec<&str> = entries.iter().map(|e| e.fabric.as_str()).collect();
            return Err(unavailable(match fabric {
                Some(f) => format!("no {f:?} fabric listed (fabrics listed: {listed:?})"),
                None => "no matching provider entry".into(),
            }));
        }
        return Ok(picked);
    }
    let mut domains: Vec<&str> = Vec::new();
    for e in entries.iter().filter(|e| e.provider.starts_with(kind.fabric_name())) {
        if !domains.contains(&e.domain.as_str()) {
            domains.push(&e.domain);
        }
    }
    wanted
        .iter()
        .map(|d| {
            picked
                .iter()
                .copied()
                .find(|&p| entries[p].domain == *d)
                .ok_or_else(|| unavailable(format!("no domain named {d:?} (domains here: {domains:?})")))
        })
        .collect()
}

/// The oldest libfabric whose `efa` provider strait opens: 1.19, the first
/// whose `efa` fabric writes zero bytes (an immediate alone, which the
/// engine sends after the pieces of a multi-piece request; 1.18 asserts on
/// it, `rxr_op_entry_post_remote_write`).
pub(crate) const MIN_EFA_VERSION: (u32, u32) = (1, 19);

/// Queries `kind` and returns its RDM entries, best first. With
/// `request.hmem`, entries that take device memory (`FI_HMEM`) are asked
/// for first; a provider built without CUDA support answers without them,
/// and then device memory is staged.
pub(crate) fn query(kind: ProviderKind, request: &InfoRequest) -> Result<InfoList> {
    if request.hmem {
        match query_modes(kind, request) {
            Err(Error::BackendUnavailable { .. }) => {
                tracing::info!(provider = %kind, "no FI_HMEM entries: device memory will be staged");
                return query_modes(kind, &InfoRequest { hmem: false, ..request.clone() });
            }
            other => return other,
        }
    }
    query_modes(kind, request)
}

fn query_modes(kind: ProviderKind, request: &InfoRequest) -> Result<InfoList> {
    if kind == ProviderKind::Efa {
        let lib = sys::Library::get()
            .map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
        let (major, minor) = (lib.version >> 16, lib.version & 0xffff);
        if (major, minor) < MIN_EFA_VERSION {
            return Err(Error::BackendUnavailable {
                backend: "efa",
                reason: format!(
                    "libfabric {major}.{minor} at {} is older than {}.{}, the oldest whose efa provider strait \
                     uses (zero-byte writes)",
                    lib.path, MIN_EFA_VERSION.0, MIN_EFA_VERSION.1
                ),
            });
        }
        // Without FI_RX_CQ_DATA first: efa-direct then keeps unsolicited
        // write receives on (an immediate consumes no posted buffer), and
        // returns no entry without it only on devices that lack them
        // (`efa_user_info.c`), which the second query covers.
        match query_with(kind, request, sys::FI_CONTEXT | sys::FI_CONTEXT2) {
            Err(Error::BackendUnavailable { .. }) => {}
            other => return other,
        }
    }
    query_with(kind, request, sys::FI_CONTEXT | sys::FI_CONTEXT2 | sys::FI_RX_CQ_DATA)
}

fn query_with(kind: ProviderKind, request: &InfoRequest, mode: u64) -> Result<InfoList> {
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
        if kind == ProviderKind::Efa {
            // Remote peers only: without FI_LOCAL_COMM (which the efa
            // provider adds by default) it opens no shm domain of its own,
            // whose presence makes its CQs refuse FI_WAIT_FD
            // (`efa_rdm_cq_configure_wait`); same-host peers then go through
            // the device. strait's `shm` provider is the same-host path.
            h.caps |= sys::FI_REMOTE_COMM;
        }
        h.mode = mode;
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
        if kind == ProviderKind::Efa {
            let fabric = CString::new(request.efa_fabric.name()).expect("no NUL");
            (*h.fabric_attr).name = libc::strdup(fabric.as_ptr());
        }
    }
    let mut info = ptr::null_mut();
    // SAFETY: hints is a valid fi_info; info receives a list we free in
    // InfoList::drop. Hints are freed right after.
    let rc = unsafe { (lib.fi_getinfo)(lib.api_version, ptr::null(), ptr::null(), 0, hints, &mut info) };
    // SAFETY: hints is ours and not used again.
    unsafe { (lib.fi_freeinfo)(hints) };
    let list = InfoList { head: info, lib };
    if rc == -(sys::FI_ENODATA as i32) || (rc == 0 && info.is_null()) {
        let why = match &request.domain {
            Some(d) => format!("provider {kind} offers no RDM endpoint on domain {d:?}"),
            None if kind == ProviderKind::Efa => format!(
                "provider efa offers no RDM endpoint on fabric {:?} here (no EFA device, or not in this \
                 libfabric at {}, version {}.{}; efa-direct needs 2.1 or later)",
                request.efa_fabric.name(),
                lib.path,
                lib.version >> 16,
                lib.version & 0xffff
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(provider: &str, fabric: &str, domain: &str) -> EntryNames {
        EntryNames { provider: provider.into(), fabric: fabric.into(), domain: domain.into() }
    }

    /// What libfabric 2.1+ lists on a host with two EFA devices when the
    /// hints leave the fabric open: efa-direct's entries first, then efa's,
    /// under the same domain names (`efa_prov.c`, `efa_domain.h`).
    fn efa_host() -> Vec<EntryNames> {
        vec![
            entry("efa", "efa-direct", "rdmap79s0-rdm"),
            entry("efa", "efa-direct", "rdmap80s0-rdm"),
            entry("efa", "efa", "rdmap79s0-rdm"),
            entry("efa", "efa", "rdmap80s0-rdm"),
        ]
    }

    #[test]
    fn the_efa_fabric_asked_for_is_the_one_opened() {
        let host = efa_host();
        // Without a fabric, de-duplication by domain would keep efa-direct.
        assert_eq!(pick(&host, ProviderKind::Efa, None, &[]).unwrap(), vec![0, 1]);
        assert_eq!(pick(&host, ProviderKind::Efa, Some("efa"), &[]).unwrap(), vec![2, 3]);
        assert_eq!(pick(&host, ProviderKind::Efa, Some("efa-direct"), &[]).unwrap(), vec![0, 1]);
        // A library that predates efa-direct lists only efa.
        let old = &host[2..];
        assert_eq!(pick(old, ProviderKind::Efa, Some("efa"), &[]).unwrap(), vec![0, 1]);
        let Err(Error::BackendUnavailable { reason, .. }) = pick(old, ProviderKind::Efa, Some("efa-direct"), &[])
        else {
            panic!("efa-direct picked from a list without it")
        };
        assert!(reason.contains("efa-direct") && reason.contains("\"efa\""), "{reason}");
        // The devices nearest a GPU (`EngineBuilder::for_gpu`), as named.
        let near = ["rdmap80s0-rdm".to_string()];
        assert_eq!(pick(&host, ProviderKind::Efa, Some("efa"), &near).unwrap(), vec![3]);
    }

    #[test]
    fn tcp_interfaces_are_opened_as_named_and_only_those() {
        let host = vec![
            entry("tcp;ofi_rxm", "172.17.0.0/16", "eth0"),
            entry("tcp;ofi_rxm", "127.0.0.0/8", "lo"),
            entry("tcp;ofi_rxm", "10.0.0.0/24", "nic1"),
            entry("tcp;ofi_rxm", "127.0.0.0/8", "lo"),
            entry("sockets", "127.0.0.0/8", "lo"),
        ];
        assert_eq!(pick(&host, ProviderKind::Tcp, None, &[]).unwrap(), vec![0, 1, 2]);
        let named = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(pick(&host, ProviderKind::Tcp, None, &named(&["lo"])).unwrap(), vec![1]);
        assert_eq!(pick(&host, ProviderKind::Tcp, None, &named(&["nic1", "lo", "nic1"])).unwrap(), vec![2, 1, 2]);
        let Err(Error::BackendUnavailable { reason, .. }) = pick(&host, ProviderKind::Tcp, None, &named(&["eth9"]))
        else {
            panic!("a missing interface was accepted")
        };
        assert!(reason.contains("eth9") && reason.contains("lo"), "{reason}");
        assert!(pick(&host, ProviderKind::Shm, None, &[]).is_err());
    }
}
