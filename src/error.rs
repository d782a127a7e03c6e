//! The one error type of the crate.

use std::time::Duration;

/// Everything that can go wrong in strait, with the context to act on it.
///
/// Errors are `Clone` because one request outcome can be read by several
/// waiters (`wait`, a callback and a `Future` on the same handle).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport library or its devices are not present on this machine.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// `libfabric`, `efa`, `tcp`, `shm`, ...
        backend: &'static str,
        /// What was searched and how to fix it.
        reason: String,
    },
    /// A libfabric call failed.
    #[error("{call} failed: {message} ({code})")]
    Fabric {
        /// The libfabric function that failed.
        call: &'static str,
        /// The negative libfabric error code.
        code: i32,
        /// `fi_strerror` of the code.
        message: String,
    },
    /// A libibverbs call failed.
    #[error("{call} failed: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Verbs {
        /// The verbs function that failed.
        call: &'static str,
        /// The error number it returned or set.
        errno: i32,
    },
    /// Registering memory failed.
    #[error("registering {len} bytes at {addr:#x} failed: {reason}")]
    RegisterMemory {
        /// Start of the memory.
        addr: usize,
        /// Length of the memory.
        len: u64,
        /// Why.
        reason: String,
    },
    /// A remote descriptor or engine address could not be decoded.
    #[error("invalid {what}: {reason}")]
    InvalidDescriptor {
        /// `memory descriptor` or `engine address`.
        what: &'static str,
        /// The first problem found.
        reason: String,
    },
    /// An offset/length falls outside a region, or overflows.
    #[error("{side} range {offset}+{len} is outside the region of {region_len} bytes")]
    OutOfBounds {
        /// `source` or `destination`.
        side: &'static str,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
    /// A request's arguments are inconsistent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The peer cannot be reached (connection refused or reset, dead process).
    #[error("peer unreachable: {0}")]
    PeerUnreachable(String),
    /// The peer rejected the access (wrong key, revoked region, no permission).
    #[error("remote access error: {0}")]
    RemoteAccess(String),
    /// A transport error reported through a completion.
    #[error("transport error on {op}: {message} (errno {code}, provider errno {prov_errno})")]
    Transport {
        /// The operation kind (`write`, `read`, `send`, `recv`).
        op: &'static str,
        /// libfabric's positive error number, or on verbs the
        /// `ibv_wc_status`.
        code: i32,
        /// The provider's own error number (verbs: the vendor error).
        prov_errno: i32,
        /// The provider's description.
        message: String,
    },
    /// A wait ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The engine shut down before the request ended.
    #[error("engine shut down")]
    Shutdown,
    /// The waited-on counter was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The two sides of a KV transfer describe different models.
    #[error("KV layouts differ in {what}: sender {sender}, decoder {decoder}")]
    LayoutMismatch {
        /// The field that differs.
        what: &'static str,
        /// The sender's value.
        sender: u64,
        /// The decoder's value.
        decoder: u64,
    },
    /// A weights group's descriptions cannot be planned (a tensor on one
    /// side only, a shape or dtype mismatch, overlapping shares, bytes no
    /// source holds).
    #[error("weights plan: {0}")]
    WeightsPlan(crate::weights::PlanError),
    /// A request was abandoned with a reason: by the caller, or by the
    /// peer, who said why.
    #[error("aborted by {by}: {reason}")]
    Aborted {
        /// Who gave up (`this rank`, or the peer's rank and address).
        by: String,
        /// Why.
        reason: String,
    },
    /// The call would block the engine's own worker thread on itself
    /// (for example registering memory from a completion callback).
    #[error("{0} cannot be called from the engine's worker thread")]
    WouldDeadlock(&'static str),
    /// CUDA is unavailable, or a CUDA call failed (the reason names the
    /// call).
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// `Result` with strait's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
