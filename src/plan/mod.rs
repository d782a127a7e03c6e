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

/// The rows of a work item: `count` runs of the piece's `len` bytes, the
/// first at the piece's offsets and each next one `src_stride` /
/// `dst_stride` further. One row for every plan but strided copies, and for
/// those only on transports that take several remote ranges per operation
/// (libfabric tcp: four).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Runs (at least 1).
    pub count: u32,
    /// Distance between runs in the source.
    pub src_stride: u64,
    /// Distance between runs in the destination.
    pub dst_stride: u64,
}

impl Rows {
    /// A single run.
    pub const ONE: Rows = Rows { count: 1, src_stride: 0, dst_stride: 0 };
}

/// One work item: a contiguous range (or a few runs, see [`Rows`]) written
/// (or read) through one local NIC to one remote NIC. Offsets are relative
/// to the start of the source and destination regions.
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
    /// Bytes (of each run).
    pub len: u64,
    /// The runs; [`Rows::ONE`] for a contiguous range.
    pub rows: Rows,
}

/// NIC pair used by the `index`-th piece of a request whose first piece goes
/// to NIC pair `rotation`: consecutive pieces (and consecutive requests) walk
/// both groups round robin, so peers with different NIC counts still use all
/// NICs on both sides.
pub fn nic_pair(index: u64, rotation: usize, local_nics: usize, remote_nics: usize) -> (usize, usize) {
    let i = rotation as u64 + index;
    ((i % local_nics as u64) as usize, (i % remote_nics as u64) as usize)
}
