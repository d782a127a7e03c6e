//! The backend contract: what every transport provides to the engine.
//!
//! A backend is a set of [`Nic`]s. The engine's worker thread owns them and
//! is the only caller, so a `Nic` never needs internal locking; it must be
//! `Send` so that the worker can own it.
//!
//! # What a NIC must guarantee
//! * Every operation accepted by [`Nic::post`] (it returned
//!   [`Posted::Accepted`]) produces exactly one [`Event::Done`] or
//!   [`Event::Failed`] carrying the operation's token, eventually, as long
//!   as [`Nic::poll`] keeps being called. A post that returns
//!   [`Posted::Busy`] or an error produced nothing and may be retried or
//!   failed by the engine.
//! * A write with an immediate that completed at the initiator has delivered
//!   the immediate to the target's [`Nic::poll`] as an [`Event::Imm`] (or,
//!   when the provider consumes receive buffers for immediates, as an
//!   [`Event::Received`] with `imm` set).
//! * An operation posted with `delivery_complete` completes at the initiator
//!   only once its data is visible in the target's memory.
//! * Memory registered without remote access is not reachable by peers.
//!
//! # What the engine must not assume
//! * Ordering: completions, and the landing of data at the target, may come
//!   in any order, even for two writes through one NIC pair.
//! * That `poll` makes progress on its own: transports such as libfabric
//!   `tcp` and `shm` progress only inside `poll`, so an idle target must keep
//!   polling (or sleep on the wait descriptor) for its peers to progress.
//! * That a dead peer is reported: some transports (`shm`) never report one.

pub(crate) mod fabric;
#[cfg(test)]
pub(crate) mod fault;
#[cfg(any(test, feature = "test-backend"))]
pub(crate) mod null;
pub(crate) mod verbs;

use std::ffi::c_void;
use std::os::fd::RawFd;

use crate::descriptor::Access;
use crate::error::Result;

/// 32 random bits from the kernel, for names and sequence numbers that must
/// differ between incarnations of a process (not for secrets). Without an
/// entropy source, the clock and the pid.
pub(crate) fn random_u32() -> u32 {
    let mut v = 0u32;
    // SAFETY: writes at most 4 bytes into v.
    if unsafe { libc::getrandom(std::ptr::from_mut(&mut v).cast(), 4, 0) } != 4 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        v = t.subsec_nanos() ^ std::process::id().rotate_left(16);
    }
    v
}

/// A NIC's handle for one registered range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NicRegion {
    /// The provider's object (closed by [`Nic::deregister`]).
    pub handle: *mut c_void,
    /// The key peers use.
    pub key: u64,
    /// The local descriptor passed with buffers in this range.
    pub desc: *mut c_void,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Write,
    Read,
    Send,
}

/// One operation to post. `local`/`len` lie in a range registered on this
/// NIC (`local_desc` from its [`NicRegion`]); `remote_addr`/`key` address the
/// peer's region for writes and reads. A send with `imm` carries it as
/// remote CQ data (the engine's control messages; user sends carry none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub kind: OpKind,
    pub local: *mut u8,
    /// Bytes (of each run, when `rows.count > 1`).
    pub len: u64,
    /// Several runs (writes and reads only, at most
    /// [`Nic::max_rows`]): run `r` is `len` bytes at `local + r *
    /// rows.src_stride` and `remote_addr + r * rows.dst_stride` (`src` is
    /// the local side here, for reads too).
    pub rows: crate::plan::Rows,
    pub local_desc: *mut c_void,
    pub peer: u64,
    pub remote_addr: u64,
    pub key: u64,
    pub imm: Option<u32>,
    pub delivery_complete: bool,
    /// The local buffer is host memory, which the NIC may read with the CPU
    /// at post time (verbs: inline sends); false for device memory.
    pub host_memory: bool,
    pub token: u64,
}

/// Result of a post that did not fail outright.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Posted {
    /// The operation is in flight; an event with its token will come.
    Accepted,
    /// The NIC cannot take it now (queue full, connection being set up):
    /// poll, then try again.
    Busy,
}

/// Something a NIC reports from [`Nic::poll`].
#[derive(Debug)]
pub(crate) enum Event {
    /// The operation with this token completed.
    Done { token: u64 },
    /// The operation with this token failed.
    Failed { token: u64, error: crate::Error },
    /// A peer's write delivered an immediate (no receive buffer consumed).
    Imm { value: u32 },
    /// A posted receive buffer was consumed: by a message of `len` bytes, or
    /// (`imm` set, `message` false) by an immediate on providers that need
    /// buffers for them. The buffer must be posted again.
    Received { token: u64, len: usize, message: bool, imm: Option<u32> },
    /// A receive buffer failed (the buffer may be posted again).
    ReceiveFailed { token: u64, error: crate::Error },
}

/// One NIC of a group: see the module docs for the contract.
pub(crate) trait Nic: Send {
    /// This NIC's address, as peers insert it.
    fn address(&self) -> &[u8];
    /// True when peers address regions by virtual address, false when by
    /// offset from the region start.
    fn virtual_addresses(&self) -> bool;
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must stay valid until [`deregister`](Self::deregister).
    unsafe fn register(&mut self, addr: *mut u8, len: u64, access: Access) -> Result<NicRegion>;
    /// Registers the engine's receive pool: memory only ever posted as
    /// receive buffers (libfabric: `FI_RECV` access alone). The default
    /// registers it as local-only memory.
    ///
    /// # Safety
    /// As for [`register`](Self::register).
    unsafe fn register_receive_pool(&mut self, addr: *mut u8, len: u64) -> Result<NicRegion> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.register(addr, len, Access::LOCAL) }
    }
    /// Whether this NIC reaches GPU memory itself (GPUDirect RDMA: EFA
    /// with `FI_HMEM`, verbs with dma-buf or nvidia-peermem). Device regions
    /// of an engine whose NICs do not are staged (see `engine::staging`).
    fn device_memory(&self) -> bool {
        false
    }
    /// Registers `len` bytes of CUDA device memory at device address
    /// `addr` on GPU `gpu`. `dmabuf`: the range's dma-buf, as (fd, offset of
    /// `addr` in it), when CUDA gave one (verbs registers through it).
    ///
    /// # Safety
    /// The memory must stay allocated until [`deregister`](Self::deregister).
    unsafe fn register_device(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        gpu: u32,
        dmabuf: Option<(i32, u64)>,
    ) -> Result<NicRegion> {
        let _ = (access, gpu, dmabuf);
        Err(crate::Error::RegisterMemory {
            addr: addr as usize,
            len,
            reason: "this NIC cannot reach device memory (no GPUDirect)".into(),
        })
    }
    /// Releases a registration; peers lose access.
    fn deregister(&mut self, region: NicRegion);
    /// Makes a peer NIC reachable; the result is passed as [`Op::peer`].
    fn insert_peer(&mut self, address: &[u8]) -> Result<u64>;
    /// Posts one operation.
    ///
    /// # Safety
    /// The local buffer must stay valid and registered until the operation's
    /// event is returned by `poll`.
    unsafe fn post(&mut self, op: &Op) -> Result<Posted>;
    /// Posts a receive buffer; its event carries `token`.
    ///
    /// # Safety
    /// As for [`post`](Self::post).
    unsafe fn post_recv(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, token: u64) -> Result<Posted>;
    /// A round of posts begins (the engine calls it before each round of
    /// [`post`](Self::post)s). Checks that need not be repeated for every
    /// post of a round (shm: whether a peer's process still runs) are made
    /// once per round and peer. The default does nothing.
    fn start_round(&mut self) {}
    /// Submits work that [`post`](Self::post) staged (backends may chain
    /// several posts into one doorbell). The engine calls it after each
    /// round of posts; `poll` and `ready_to_sleep` flush too.
    fn flush(&mut self) {}
    /// Whether a write or read through a key the target does not hold (a
    /// revoked region, a forged descriptor) fails with
    /// [`Error::RemoteAccess`](crate::Error) here. When false (libfabric
    /// tcp and shm: a connection error, or no completion at all), the
    /// engine asks the region's owner before it reports such a failure
    /// (see `engine::access`).
    fn reports_rejected_keys(&self) -> bool {
        true
    }
    /// Whether operations this NIC posts to one peer are applied at the
    /// target in posting order (and a delivery-complete one completes only
    /// once those before it have been applied). When true, and a request
    /// moves over one path (one NIC on each side), the engine asks for
    /// `delivery_complete` on its last data piece only: the request still
    /// completes only once all its bytes are visible, and the pieces before
    /// it go by the transport's cheaper protocol. libfabric shm: one
    /// command queue per target endpoint, read in order, and a
    /// delivery-complete write of at most 4 KiB takes the segmented
    /// protocol, which admits one such write per peer at a time. The
    /// default is false (delivery-complete on every piece).
    fn in_order_delivery(&self) -> bool {
        false
    }
    /// Most runs one write or read may carry ([`Op::rows`]): several
    /// remote ranges in one operation. 1 (the default) where an operation
    /// has one remote range (RDMA verbs, EFA).
    fn max_rows(&self) -> u32 {
        1
    }
    /// Runs (bytes) below which a strided copy list or paged write is
    /// cheaper packed through the engine's staging buffers than posted as
    /// one operation per run (see `engine::staging`): a transport whose
    /// RMA is carried by the CPU in software, at a cost per operation far
    /// above a memory copy (libfabric tcp and shm). 0 (the default): never.
    fn pack_runs_below(&self) -> u64 {
        0
    }
    /// The largest operation (bytes) the NIC takes: the engine's pieces are
    /// never longer. Unlimited by default.
    fn max_piece(&self) -> u64 {
        u64::MAX
    }
    /// Whether an RMA target must already have this NIC in its address
    /// vector (EFA's efa-direct: a write or read from an initiator the
    /// target has not inserted fails with an unknown-peer error). Then the
    /// engine introduces itself to each new peer with a two-sided hello,
    /// answered, before its first write or read (see the worker's
    /// `Intro`). False by default.
    fn needs_introduction(&self) -> bool {
        false
    }
    /// The largest two-sided message (bytes) the NIC sends: the engine
    /// refuses longer sends. Unlimited by default (the receive buffers'
    /// size is the engine's own limit).
    fn max_message(&self) -> u64 {
        u64::MAX
    }
    /// The engine gave up on operations to `peer` (an [`Op::peer`] value):
    /// its requests expired without progress. A NIC whose transport can
    /// leave later operations queued behind ones that will never complete
    /// replaces its path to the peer, so that the next operations do not
    /// wait behind them. Operations already posted keep their tokens until
    /// they complete, as always. The default does nothing.
    fn reset_peer(&mut self, _peer: u64) {}
    /// The engine is shutting down: close the endpoints (no operation is
    /// posted or polled after this), so that the registrations, receive
    /// pool included, are released with nothing posted on them. The
    /// default does nothing.
    fn close_endpoints(&mut self) {}
    /// Reads available completions into `events`; returns how many.
    fn poll(&mut self, events: &mut Vec<Event>) -> usize;
    /// A file descriptor that becomes readable when `poll` has work, if the
    /// transport has one.
    fn wait_fd(&self) -> Option<RawFd>;
    /// Called before sleeping on [`wait_fd`](Self::wait_fd): false when
    /// `poll` must run first.
    fn ready_to_sleep(&mut self) -> bool;
}
