//! What this machine offers: which providers libfabric reports and with
//! which domains, which verbs devices libibverbs finds, or why each is
//! unavailable. `strait-bench info` prints it.

use crate::backend::{fabric, verbs};
use crate::provider::ProviderKind;

/// One provider's availability, from [`probe`].
#[derive(Clone, Debug)]
pub struct ProviderReport {
    /// The provider.
    pub kind: ProviderKind,
    /// `(provider name, domain name)` pairs it offers (for tcp, domains
    /// are interfaces such as `lo`, `eth0`; for EFA, devices; for verbs, a
    /// description of each device's port 1, or why it is unusable), or the
    /// reason it is unavailable (library missing, no devices).
    pub domains: Result<Vec<(String, String)>, String>,
}

/// The libfabric library that would be used (its path, its version and the
/// API version strait asks it for), or why none loads.
pub fn libfabric_library() -> Result<String, String> {
    fabric_sys::Library::get()
        .map(|l| {
            let v = |v: u32| format!("{}.{}", v >> 16, v & 0xffff);
            format!("{} (version {}, API {} asked for)", l.path, v(l.version), v(l.api_version))
        })
        .map_err(|e| e.to_string())
}

/// The libibverbs library that would be used (its path), or why none loads.
pub fn libibverbs_library() -> Result<String, String> {
    verbs_sys::Library::get().map(|l| l.path.clone()).map_err(|e| e.to_string())
}

/// Asks libfabric and libibverbs about every provider strait supports
/// (efa, verbs, tcp, shm), in `Auto`'s order of preference. Never fails: an
/// unavailable provider is a normal answer.
pub fn probe() -> Vec<ProviderReport> {
    [ProviderKind::Efa, ProviderKind::Verbs, ProviderKind::Tcp, ProviderKind::Shm]
        .into_iter()
        .map(|kind| ProviderReport {
            kind,
            domains: if kind == ProviderKind::Verbs { verbs::probe() } else { fabric::probe(kind) },
        })
        .collect()
}
