//! # strait: point-to-point RDMA transfers for LLM systems
//!
//! strait moves bytes between the hosts (and, where the provider supports
//! it, GPUs) of an LLM serving or training cluster with one-sided
//! **write-with-immediate**, one-sided reads, and two-sided send/receive. It
//! runs over libfabric: AWS EFA (`efa`, SRD: reliable, unordered) in
//! production, and `tcp` and `shm` on any Linux machine, which is how it is
//! developed and tested; and over ibverbs RC queue pairs on NVIDIA ConnectX
//! (InfiniBand and RoCE; [`Provider::Verbs`], tuned with [`VerbsConfig`]).
//! Several NICs per GPU are driven as one group.
//!
//! ## Quick start
//!
//! Two engines in one process over tcp on loopback; the receiver learns that
//! the bytes have landed from the immediate.
//!
//! ```no_run
//! use std::time::Duration;
//! use strait::{Access, PollMode, Provider, TransferEngine};
//!
//! fn main() -> strait::Result<()> {
//!     let engine = |nics| {
//!         TransferEngine::builder()
//!             .provider(Provider::Tcp)
//!             .interface("lo")
//!             .nics(nics)
//!             .poll_mode(PollMode::default()) // spins briefly, then sleeps
//!             .build()
//!     };
//!     let (sender, receiver) = (engine(2)?, engine(1)?);
//!
//!     // The receiver registers memory peers may write, and sends its
//!     // descriptor (bytes) to the sender by any out-of-band means.
//!     let inbox = receiver.alloc(1 << 20, Access::REMOTE_WRITE)?;
//!     let descriptor = strait::MrDesc::from_bytes(&inbox.descriptor().to_bytes())?;
//!     let arrived = receiver.expect_imm(42, 1)?;
//!
//!     let outbox = sender.alloc(1 << 20, Access::LOCAL)?;
//!     outbox.write_at(0, b"hello")?;
//!     sender.write(&outbox, 0, &descriptor, 0, 1 << 20, Some(42))?.wait()?;
//!
//!     arrived.wait_timeout(Duration::from_secs(5))?;
//!     assert_eq!(inbox.to_vec(0, 5)?, b"hello");
//!     Ok(())
//! }
//! ```
//!
//! ## Concepts
//!
//! * [`TransferEngine`]: a group of NICs and the worker thread that drives
//!   them. Its [`EngineAddress`] is what peers need to reach it.
//! * [`MemoryRegion`]: memory registered with every NIC of the group, local
//!   only unless [`Access`] says otherwise. Its [`MrDesc`] is what a peer
//!   needs to write into it or read from it; [`MrDesc::from_bytes`] validates
//!   every field of a descriptor received from another process.
//! * Operations return a [`Transfer`]: wait on it (with or without a
//!   timeout), poll it, give it a callback, or `.await` it. Every request
//!   ends in exactly one outcome.
//! * [`ImmCounter`]: counts immediates of one value at the target.
//!
//! ## Semantics
//!
//! * **Unordered.** Nothing assumes two writes land in order, even through
//!   one NIC. Completion at the target is signalled by immediates only.
//! * **One immediate per request** by default, however the request was
//!   split across NICs and whatever the two peers' NIC counts; it arrives
//!   after all of the request's bytes (see [`plan`]).
//! * **Sizes are `u64`**: transfers above 4 GiB work.
//!
//! ## Threads and polling
//!
//! Each engine runs one worker thread that owns its NICs; every engine
//! method may be called from any thread. [`PollMode::Busy`] never sleeps
//! (pin it with [`EngineBuilder::pin_worker`]); the default
//! [`PollMode::Adaptive`] spins for 50 µs after the last work, then sleeps on
//! the completion queues' wait descriptors, so several engines share a small
//! machine well.
//!
//! A thread that blocks in [`Transfer::wait`], [`ImmCounter::wait`] (and
//! their timeout forms), [`TransferEngine::recv_timeout`] or
//! [`TransferEngine::next_imm`] drives the engine itself while it waits,
//! when no other thread does: it runs the worker's polling (spin, then sleep
//! on the wait descriptors) and the worker thread stands aside, so a
//! completion wakes the waiting thread directly. One thread at a time runs
//! the worker. After a wait ends the worker thread stays aside a little
//! longer (the same thread usually submits or waits again at once): from
//! 100 µs after a single wait up to 1 ms after a long run of waits. A
//! request submitted then, with no wait after it, is posted when the
//! worker resumes, at most that much later; meanwhile the engine makes no
//! progress for its peers either. So callbacks
//! ([`Transfer::on_complete`], [`ImmCounter::on_reached`],
//! [`EngineBuilder::on_message`], ...) run on whichever thread drives at
//! that moment, the worker or a waiting thread: keep them short, and do not
//! wait on the engine from them.

//! ## Failures and timeouts
//!
//! A request whose peer completes none of the engine's operations for the
//! request timeout ([`EngineBuilder::request_timeout`], default
//! [`DEFAULT_REQUEST_TIMEOUT`], 10 s) ends with [`Error::PeerUnreachable`]:
//! dead, stopped or unreachable peers never leave a request without an
//! outcome, even on transports that do not report them (shm). Errors the
//! transport reports (connection reset, rejected key as
//! [`Error::RemoteAccess`]) end requests at once.
//!
//! ## Resource cleanup
//!
//! Dropping a [`MemoryRegion`] deregisters it (revoking remote access) once
//! no request uses it. Dropping the last [`TransferEngine`] clone stops the
//! worker: in-flight requests end with [`Error::Shutdown`], and the NICs are
//! closed before drop returns.
//!
//! ## Testing without RDMA hardware
//!
//! libfabric's `tcp` and `shm` providers run on any Linux machine
//! (`apt-get install libfabric1`) and go through the same code path as EFA.
//! Build with `.provider(Provider::Tcp).interface("lo")` to stay on loopback.
//! If libfabric is missing the crate still builds, and
//! [`EngineBuilder::build`] returns [`Error::BackendUnavailable`] saying what
//! was searched and how to install it. The same holds for libibverbs and for
//! a machine without verbs devices: [`Provider::Verbs`] fails with the
//! reason, and [`Provider::Auto`] moves on to tcp.
//!
//! ## Feature flags
//!
//! None yet: every backend is opened at run time, so one build runs
//! everywhere.
#![deny(missing_docs)]
// The build without the stats counters (an A/B of their cost, see
// `counting!` in engine/worker.rs) leaves some helpers unused.
#![cfg_attr(strait_no_stats, allow(unused))]

mod address;
mod backend;
#[cfg(feature = "raw-baseline")]
pub mod baseline;
pub mod cuda;
mod descriptor;
mod engine;
mod error;
pub mod kv;
pub mod moe;
pub mod plan;
pub mod probe;
mod provider;
pub mod topology;
pub mod weights;
mod wire;

pub use address::EngineAddress;
pub use backend::verbs::VerbsConfig;
pub use descriptor::{Access, MrDesc};
pub use engine::stats;
pub use engine::{
    reserved_imm, Batch, EngineBuilder, ImmCounter, ImmSlot, ImmSpace, MemoryRegion, MessagePool, PollMode,
    ScatterTarget, Service, StagingConfig, StreamTrigger, Transfer, TransferEngine, TriggerPoll,
    DEFAULT_REQUEST_TIMEOUT, PAGE_SIZE, PING_IMM, RESERVED_IMM_BASE, SERVICE_HEADER, SERVICE_MAGIC,
};
pub use error::{Error, Result};
pub use plan::{CopyList, PagedLayout, ShardConfig, Strided};
pub use provider::{EfaFabric, Provider, ProviderKind};
pub use wire::{MAX_NICS, MAX_NIC_ADDRESS_LEN};

/// Entry points for the fuzz targets under `fuzz/`, for decoders of bytes
/// from other processes that are not public API. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes an engine control message (a key query or its answer); on
    /// success, returns its encoding, which must equal the input.
    pub fn control_message(bytes: &[u8]) -> Option<Vec<u8>> {
        crate::engine::access::Control::decode(bytes).ok().map(|c| c.encode())
    }
}

/// The README's Rust examples, compiled (and run unless marked `no_run`)
/// as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
