//! Planning: requests in, per-NIC work items out.
//!
//! Pure and deterministic: no FFI, no threads, no clock. The engine's worker
//! asks a plan for its pieces one at a time (nothing is materialised per
//! request) and feeds completions to a [`Sequencer`], which decides when the
//! piece carrying the immediate may go.
//!
//! # Immediate semantics
//! A write request with an immediate delivers **exactly one** immediate to
//! the target, whatever the sharding and the NIC counts of the two peers.
//! A request of one piece carries its immediate on that piece and pays no
//! extra latency. A request split into several pieces posts all of its data
//! pieces at once (they fly in parallel over every NIC pair) and then a
//! zero-length write carrying the immediate, posted only after every data
//! piece has completed at the initiator with delivery-complete semantics,
//! so a target that sees the immediate sees all of the request's bytes, on
//! an unordered transport too. The engine sequences the pieces with a
//! [`Sequencer`] over `data pieces + 1`, the last being that zero-length
//! write. (Holding back the last *data* piece instead halves the bytes in
//! flight of a two-piece request; measured with strait-bench, the trailing
//! zero-length write costs less.)

mod paged;
mod sequencer;
mod shard;
mod strided;

pub use paged::{PagedLayout, PagedPlan};
pub use sequencer::Sequencer;
pub use shard::{ShardConfig, ShardPlan};
pub use strided::{CopyList, Strided, StridedPlan};

/// One work item: a contiguous range written (or read) through one local NIC
/// to one remote NIC. Offsets are relative to the start of the source and
/// destination regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index of the local NIC in the group.
    pub local_nic: usize,
    /// Index of the peer's NIC.
    pub remote_nic: usize,
    /// Offset in the local region.
    pub src_offset: u64,
    /// Offset in the remote region.
    pub dst_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// NIC pair used by the `index`-th piece of a request whose first piece goes
/// to NIC pair `rotation`: consecutive pieces (and consecutive requests) walk
/// both groups round robin, so peers with different NIC counts still use all
/// NICs on both sides.
pub fn nic_pair(index: u64, rotation: usize, local_nics: usize, remote_nics: usize) -> (usize, usize) {
    let i = rotation as u64 + index;
    ((i % local_nics as u64) as usize, (i % remote_nics as u64) as usize)
}
