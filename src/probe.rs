//! What this machine offers: which providers libfabric reports and with
//! which domains, or why each is unavailable. `strait-bench info` prints it.

use crate::backend::fabric;
use crate::provider::ProviderKind;

/// One provider's availability, from [`probe`].
#[derive(Clone, Debug)]
pub struct ProviderReport {
    /// The provider.
    pub kind: ProviderKind,
    /// `(provider name, domain name)` pairs it offers (for tcp, domains
    /// are interfaces such as `lo`, `eth0`; for EFA, devices), or the reason
    /// it is unavailable (library missing, no devices).
    pub domains: Result<Vec<(String, String)>, String>,
}

/// The libfabric library that would be used (its path), or why none loads.
pub fn libfabric_library() -> Result<String, String> {
    fabric_sys::Library::get().map(|l| l.path.clone()).map_err(|e| e.to_string())
}

/// Asks libfabric about every provider strait supports (efa, tcp, shm).
/// Never fails: an unavailable provider is a normal answer.
pub fn probe() -> Vec<ProviderReport> {
    [ProviderKind::Efa, ProviderKind::Tcp, ProviderKind::Shm]
        .into_iter()
        .map(|kind| ProviderReport { kind, domains: fabric::probe(kind) })
        .collect()
}
