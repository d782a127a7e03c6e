//! One verbs NIC: its resources, connections to peers, and the data path.
//!
//! # Queue pairs
//! Each peer NIC is reached through two RC queue pairs created together
//! (one handshake, one generation): the *RMA* queue pair carries writes,
//! reads and writes with immediate, and receives on the immediate SRQ of
//! zero-length receives (`imm_recv.rs`); the *message* queue pair carries
//! sends and receives on the SRQ the engine stocks with its buffers. A
//! write with immediate consumes a receive of the queue pair it arrives on,
//! and a queue pair has one receive queue, so this split is what keeps
//! immediates off the engine's 64 message buffers.
//!
//! Work posted to a queue pair is staged in that queue pair's chain and
//! posted with one `ibv_post_send` per chain in [`Nic::flush`] (or when the
//! chain is full), so striping pieces across several peers still puts many
//! work requests behind each doorbell.
//!
//! # Connections
//! Queue pairs are created on first use of a peer NIC. The initiator
//! creates its pair (INIT) and sends a handshake request over UD with their
//! QPNs, first PSNs, its RDMA-read responder depth and the pair's
//! generation; the target creates (or reuses) its own pair for that peer,
//! moves it to RTR/RTS against the initiator's, and replies with its own;
//! the initiator moves to RTR/RTS on the reply. Each side's RDMA-read
//! initiator depth is the smaller of its device's and the peer's responder
//! depth. Requests to a peer whose connection is not ready are refused as
//! busy, so the engine queues them; the request is resent after 50 ms,
//! doubling up to 1 s, until [`VerbsConfig::connect_timeout`] passes since
//! the first attempt of the series (an attempt that fails after the reply,
//! such as an RTR the device refuses, does not restart the clock); then
//! the waiting requests fail with `PeerUnreachable`.
//!
//! Both sides may start at once: each has one pair per peer and connects it
//! to the other's from whichever message arrives first. Every new pair gets
//! a higher generation; a message about an older generation than the last
//! one seen from that peer is ignored, so late or duplicated datagrams
//! cannot tear down a working connection.
//!
//! # Failures
//! A work request that completes in error (or a receive error, or a fatal
//! async event, on one of a peer's queue pairs) breaks that peer's
//! connection: that request fails with the mapped error (retry exceeded:
//! `PeerUnreachable`; remote access: `RemoteAccess`), both queue pairs are
//! retired (`drain.rs`: moved to ERR, polled until drained, then
//! destroyed), so every later request on them fails as flushed while the
//! receives and immediates that had already arrived are still delivered,
//! and the connection is rebuilt (new pair, new handshake) on the next
//! request to that peer. A peer that announces a newer pair (it rebuilt, or
//! restarted on the same address) replaces ours the same way. When the
//! engine gives up on a peer's requests ([`Nic::reset_peer`]), a connection
//! with work outstanding is broken likewise: the device flushes that work,
//! its tokens come back as failed, and the next request reconnects. A chain
//! the device refuses in part fails its refused work requests and breaks
//! the connection too, so the accepted prefix (which may end unsignalled)
//! completes by flushing. Other peers are never affected.
//!
//! The handshake's UD queue pair is rebuilt (RESET, then INIT/RTR/RTS,
//! every receive reposted) when one of its completions or an async event
//! says it is in error; datagrams of the old incarnation are recognised by
//! an epoch in their work-request ids and ignored.
//!
//! Async events are read (non-blocking) every [`ASYNC_EVERY`] polls, and at
//! every poll while a queue pair is retiring: fatal queue-pair events break
//! the peer, `LAST_WQE_REACHED` completes a retirement, port, CQ and device
//! errors are logged.
//!
//! # Limits
//! Writes complete when the responder acknowledged them. For host memory
//! at the target, RC's ACK after placement and PCIe ordering make the data
//! visible by then, which is what `delivery_complete` asks. For GPU memory
//! at the target that is not guaranteed: the NIC's peer-to-peer writes into
//! device memory are not ordered with the ACK (NCCL issues a flush READ for
//! this). strait does not do that yet, so `delivery_complete` is not
//! honoured for device-memory targets on verbs; a GPU consumer must not
//! rely on a completed write being visible to kernels at the target until
//! that flush is added (tracked with the GPU work).

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::ptr;
use std::time::{Duration, Instant};

use verbs_sys as sys;

use super::config::{mtu_code, VerbsConfig};
use super::conn::{End, Link, Phase};
use super::device::{errno, unavailable, verbs_error, Context};
use super::drain::{Drain, Verdict};
use super::events::{classify, AsyncKind};
use super::gid::select_gid;
use super::imm_recv::{ImmRecvs, IMM_RECVS, REPOST_BATCH};
use super::qp::{self, Transition};
use super::sendq::{self, Chain, Entry, Retired, SendRing, WrSpec};
use super::wire::{Handshake, HandshakeKind, NicAddr, HANDSHAKE_LEN};
use super::VerbsOptions;
use crate::backend::{random_u32, Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::Access;
use crate::error::{Error, Result};

/// Work-request ids of the backend's own work requests have this bit set;
/// the engine's receive tokens never do (they use bit 63 and the low 36).
const INTERNAL: u64 = 1 << 62;
/// Bits 59..=61: what the work request is.
const KIND_SHIFT: u32 = 59;
const KIND_RC_SEND: u64 = 0;
const KIND_UD_SEND: u64 = 1;
const KIND_UD_RECV: u64 = 2;
const KIND_IMM_RECV: u64 = 3;
const KIND_MARKER: u64 = 4;
/// RC sends and markers: the peer in bits 33..=56, the lane in bit 32, the
/// low 32 bits of the ring sequence number below. UD: the epoch in bits
/// 32..=39, the buffer slot below.
const PEER_SHIFT: u32 = 33;
const PEER_MASK: u64 = 0xff_ffff;
const LANE_BIT: u64 = 1 << 32;

/// UD handshake buffers: receives carry a 40-byte GRH before the payload.
const GRH: usize = 40;
const UD_SLOT: usize = 256;
const UD_RECVS: usize = 32;
const UD_SENDS: usize = 16;

/// Depth of each message queue pair's send queue: sends are limited by the
/// peer's receive buffers (the engine posts 64 per NIC) anyway.
const MSG_DEPTH: u32 = 256;

const CQ_BATCH: usize = 32;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// After a handshake timed out, requests to that peer fail at once for
/// this long before a new handshake is tried.
const FAILED_HOLD: Duration = Duration::from_secs(1);
/// Polls between two reads of the async event queue (a non-blocking read,
/// one system call) while no queue pair is retiring.
pub(crate) const ASYNC_EVERY: u32 = 256;
/// The least time between two rebuilds of the handshake queue pair.
const UD_REBUILD_HOLD: Duration = Duration::from_millis(100);

/// Which of a peer's two queue pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Writes, reads, writes with immediate (on the immediate SRQ).
    Rma = 0,
    /// Sends (on the message SRQ).
    Msg = 1,
}

const LANES: [Lane; 2] = [Lane::Rma, Lane::Msg];

impl Lane {
    fn of(kind: OpKind) -> Lane {
        if kind == OpKind::Send {
            Lane::Msg
        } else {
            Lane::Rma
        }
    }
}

fn rc_wr_id(kind: u64, peer: usize, lane: Lane, seq: u64) -> u64 {
    INTERNAL
        | kind << KIND_SHIFT
        | (peer as u64 & PEER_MASK) << PEER_SHIFT
        | if lane == Lane::Msg { LANE_BIT } else { 0 }
        | (seq & 0xffff_ffff)
}

fn rc_target(wr_id: u64) -> (usize, Lane) {
    let peer = ((wr_id >> PEER_SHIFT) & PEER_MASK) as usize;
    (peer, if wr_id & LANE_BIT != 0 { Lane::Msg } else { Lane::Rma })
}

fn ud_wr_id(kind: u64, epoch: u8, slot: usize) -> u64 {
    INTERNAL | kind << KIND_SHIFT | u64::from(epoch) << 32 | slot as u64
}

/// One RC queue pair and the work outstanding on its send queue.
struct RcQp {
    ptr: *mut sys::ibv_qp,
    qpn: u32,
    psn: u32,
    /// What `ibv_create_qp` granted for inline payloads.
    max_inline: u32,
    ring: SendRing,
    /// Work requests retired as flushed whose flush completions the device
    /// has still to deliver (they count against the CQ's room until then).
    flush_pending: usize,
}

/// A queue pair being retired (see `drain.rs`).
struct Retiring {
    peer: usize,
    qp: RcQp,
    drain: Drain,
    /// Why, for the work that the retirement fails.
    why: &'static str,
}

struct Peer {
    addr: NicAddr,
    ah: *mut sys::ibv_ah,
    /// The handshake state (see `conn.rs`); `link.local` describes the RMA
    /// queue pair, which names the pair.
    link: Link,
    /// The current queue pairs, by [`Lane`].
    lanes: [Option<RcQp>; 2],
    /// Work staged for each lane's queue pair, posted by `flush`.
    chains: [Option<Chain>; 2],
}

/// The UD queue pair and its buffers.
struct Ud {
    qp: *mut sys::ibv_qp,
    mr: *mut sys::ibv_mr,
    buf: Box<[u8]>,
    send_free: Vec<usize>,
    /// Raised at every rebuild; completions of an older epoch are ignored.
    epoch: u8,
    /// A completion or event said the queue pair is in error.
    broken: bool,
    rebuilt_at: Option<Instant>,
}

/// Limits read from the device and the queue pairs it created.
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// RDMA reads our queue pairs accept in flight (`max_dest_rd_atomic`).
    rd_responder: u8,
    /// RDMA reads our device keeps in flight per queue pair, before the
    /// peer's responder depth caps it.
    rd_initiator: u8,
    max_msg: u64,
    send_depth: u32,
    msg_depth: u32,
    /// Send work requests the CQ can absorb across all queue pairs.
    cq_budget: usize,
    relaxed: bool,
}

/// One verbs NIC: see the module docs.
pub(crate) struct VerbsNic {
    // Peers, retiring queue pairs, the UD queue pair, the SRQs, CQ, channel
    // and PD are destroyed in `Drop` in that order, then the context (the
    // last field).
    peers: Vec<Peer>,
    by_addr: HashMap<NicAddr, usize>,
    /// The peer of each current RC queue pair, by QPN (to blame receive
    /// errors and async events on the right peer).
    by_qpn: HashMap<u32, usize>,
    retiring: Vec<Retiring>,
    ud: Ud,
    srq: *mut sys::ibv_srq,
    imm_srq: *mut sys::ibv_srq,
    imm: ImmRecvs,
    cq: *mut sys::ibv_cq,
    channel: *mut sys::ibv_comp_channel,
    pd: *mut sys::ibv_pd,
    local: NicAddr,
    address: Box<[u8]>,
    config: VerbsConfig,
    caps: Caps,
    mtu_bound: Option<u8>,
    next_generation: u32,
    /// Lanes whose chains got work since the last flush.
    staged: Vec<(usize, Lane)>,
    deferred: Vec<Event>,
    wcs: Box<[sys::ibv_wc; CQ_BATCH]>,
    /// Completions polled by `ready_to_sleep`, handled by the next `poll`.
    stashed: usize,
    /// Ring entries on every queue pair (current and retiring) plus posted
    /// markers: completions the CQ may still have to hold.
    outstanding: usize,
    /// Sum of the queue pairs' `flush_pending`.
    flush_pending: usize,
    connecting: usize,
    /// A connection became ready: requests waiting on it can go now.
    woke: bool,
    async_countdown: u32,
    ctx: Context,
}

// SAFETY: the verbs objects behind the raw pointers are used only through
// `&mut self` by the one worker thread that owns the NIC; libibverbs objects
// may be used from any thread.
unsafe impl Send for VerbsNic {}

impl std::fmt::Debug for VerbsNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsNic").field("device", &self.ctx.name).field("local", &self.local).finish_non_exhaustive()
    }
}

impl VerbsNic {
    /// Opens NIC `index` of the group on `device`.
    pub(crate) fn open(
        lib: &'static sys::Library,
        device: *mut sys::ibv_device,
        options: &VerbsOptions,
        index: usize,
    ) -> Result<Self> {
        let config = options.config.clone();
        let ctx = Context::open(lib, device)?;
        let dev = ctx.device_attr()?;
        let port_attr = ctx.port_attr(config.port)?;
        if port_attr.state != sys::ibv_port_state_IBV_PORT_ACTIVE {
            return Err(unavailable(format!("{} port {} is not active", ctx.name, config.port)));
        }
        let roce = u32::from(port_attr.link_layer) == sys::IBV_LINK_LAYER_ETHERNET;
        let gid = select_gid(&ctx.gid_table(config.port, &port_attr, roce), roce, config.gid_index)
            .map_err(|why| unavailable(format!("{}: {why}", ctx.name)))?;

        let max_srq_wr = dev.max_srq_wr.max(1) as usize;
        let rx_slots = options.rx_slots.min(max_srq_wr);
        let cqe = (dev.max_cqe.max(256) as usize).min(1 << 16);
        // The immediate SRQ may fill at most a quarter of the CQ.
        let imm_depth = IMM_RECVS.min(max_srq_wr).min(cqe / 4).max(1);
        let cq_budget = cqe.saturating_sub(rx_slots + imm_depth + UD_RECVS + UD_SENDS + 64).max(64);
        let send_depth = config.send_queue_depth.min(dev.max_qp_wr.max(16) as u32);
        let caps = Caps {
            rd_responder: dev.max_qp_rd_atom.clamp(1, 16) as u8,
            rd_initiator: dev.max_qp_init_rd_atom.clamp(1, 16) as u8,
            max_msg: u64::from(port_attr.max_msg_sz).max(1),
            send_depth,
            msg_depth: MSG_DEPTH.min(send_depth),
            cq_budget,
            relaxed: config.relaxed_ordering && lib.ibv_reg_mr_iova2.is_some(),
        };

        let mut nic = VerbsNic {
            peers: Vec::new(),
            by_addr: HashMap::new(),
            by_qpn: HashMap::new(),
            retiring: Vec::new(),
            ud: Ud {
                qp: ptr::null_mut(),
                mr: ptr::null_mut(),
                buf: Box::new([]),
                send_free: Vec::new(),
                epoch: 0,
                broken: false,
                rebuilt_at: None,
            },
            srq: ptr::null_mut(),
            imm_srq: ptr::null_mut(),
            imm: ImmRecvs::new(imm_depth, INTERNAL | KIND_IMM_RECV << KIND_SHIFT),
            cq: ptr::null_mut(),
            channel: ptr::null_mut(),
            pd: ptr::null_mut(),
            local: NicAddr {
                gid: gid.gid,
                lid: port_attr.lid,
                ud_qpn: 0,
                nonce: random_u32(),
                mtu: port_attr.active_mtu as u8,
                roce,
                gid_index: gid.index,
                port: config.port,
            },
            address: Box::new([]),
            mtu_bound: config.max_mtu.and_then(mtu_code),
            config,
            caps,
            next_generation: 0,
            staged: Vec::with_capacity(16),
            deferred: Vec::with_capacity(64),
            // SAFETY: ibv_wc is plain data; all-zero valid.
            wcs: Box::new(unsafe { std::mem::zeroed() }),
            stashed: 0,
            outstanding: 0,
            flush_pending: 0,
            connecting: 0,
            woke: false,
            async_countdown: 0,
            ctx,
        };
        // From here on, a failure drops `nic`, which releases whatever was
        // created so far (every field starts null).
        nic.create_queues(options.wait_fd, cqe, rx_slots, index)?;
        nic.restock_immediates();
        if nic.imm.due() == nic.imm.depth() {
            return Err(verbs_error("ibv_post_srq_recv(immediate receives)", errno()));
        }
        nic.create_ud()?;
        nic.address = nic.local.to_bytes().into();
        tracing::info!(device = %nic.ctx.name, local = ?nic.local, caps = ?nic.caps, "verbs NIC open");
        Ok(nic)
    }

    fn lib(&self) -> &'static sys::Library {
        self.ctx.lib
    }

    fn create_queues(&mut self, wait_fd: bool, cqe: usize, rx_slots: usize, index: usize) -> Result<()> {
        let lib = self.lib();
        // SAFETY: each call gets the live context/PD created just before;
        // results are stored at once so that Drop releases them.
        unsafe {
            // Async events are read from `poll` without blocking.
            let async_fd = (*self.ctx.ptr).async_fd;
            let flags = libc::fcntl(async_fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(async_fd, libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
                return Err(verbs_error("fcntl(async_fd, O_NONBLOCK)", errno()));
            }
            self.pd = (lib.ibv_alloc_pd)(self.ctx.ptr);
            if self.pd.is_null() {
                return Err(verbs_error("ibv_alloc_pd", errno()));
            }
            if wait_fd {
                self.channel = (lib.ibv_create_comp_channel)(self.ctx.ptr);
                if self.channel.is_null() {
                    return Err(verbs_error("ibv_create_comp_channel", errno()));
                }
                let fd = (*self.channel).fd;
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            // NICs of a group that share a device spread their completion
            // interrupts over its vectors.
            let vectors = (*self.ctx.ptr).num_comp_vectors.max(1) as usize;
            let vector = (index % vectors) as i32;
            self.cq = (lib.ibv_create_cq)(self.ctx.ptr, cqe as i32, ptr::null_mut(), self.channel, vector);
            if self.cq.is_null() {
                return Err(verbs_error("ibv_create_cq", errno()));
            }
            if !self.channel.is_null() {
                let rc = sys::ops::ibv_req_notify_cq(self.cq, 0);
                if rc != 0 {
                    return Err(verbs_error("ibv_req_notify_cq", rc));
                }
            }
            let mut srq_attr: sys::ibv_srq_init_attr = std::mem::zeroed();
            srq_attr.attr.max_wr = rx_slots.max(1) as u32;
            srq_attr.attr.max_sge = 1;
            self.srq = (lib.ibv_create_srq)(self.pd, &mut srq_attr);
            if self.srq.is_null() {
                return Err(verbs_error("ibv_create_srq", errno()));
            }
            let mut imm_attr: sys::ibv_srq_init_attr = std::mem::zeroed();
            imm_attr.attr.max_wr = self.imm.depth() as u32;
            imm_attr.attr.max_sge = 1;
            self.imm_srq = (lib.ibv_create_srq)(self.pd, &mut imm_attr);
            if self.imm_srq.is_null() {
                return Err(verbs_error("ibv_create_srq(immediates)", errno()));
            }
        }
        Ok(())
    }

    /// Posts the immediate receives that are due, in chained batches.
    fn restock_immediates(&mut self) {
        let mut due = self.imm.due();
        while due > 0 {
            let count = due.min(REPOST_BATCH);
            let head = self.imm.chain(count);
            let mut bad = ptr::null_mut();
            // SAFETY: the SRQ is live; the receives carry no buffer.
            let rc = unsafe { sys::ops::ibv_post_srq_recv(self.imm_srq, head, &mut bad) };
            if rc != 0 {
                let accepted = if bad.is_null() { 0 } else { self.imm.index_of(bad) };
                self.imm.posted(accepted);
                tracing::warn!(error = %verbs_error("ibv_post_srq_recv(immediates)", rc), "immediate receives not posted; retrying at the next poll");
                return;
            }
            self.imm.posted(count);
            due -= count;
        }
    }

    fn create_qp(
        &mut self,
        kind: sys::ibv_qp_type,
        depth: u32,
        inline: u32,
        srq: *mut sys::ibv_srq,
    ) -> Result<(*mut sys::ibv_qp, u32)> {
        // SAFETY: plain data; all-zero valid.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = self.cq;
        init.recv_cq = self.cq;
        init.qp_type = kind;
        init.cap.max_send_wr = depth;
        init.cap.max_send_sge = 1;
        init.cap.max_inline_data = inline;
        if kind == sys::ibv_qp_type_IBV_QPT_RC {
            init.srq = srq;
        } else {
            init.cap.max_recv_wr = UD_RECVS as u32;
            init.cap.max_recv_sge = 1;
        }
        // SAFETY: the PD and CQ/SRQ named in init are live.
        let mut qp = unsafe { (self.lib().ibv_create_qp)(self.pd, &mut init) };
        if qp.is_null() && inline > 0 {
            // Some devices refuse inline data on some QP types: go without.
            init.cap.max_inline_data = 0;
            // SAFETY: as above.
            qp = unsafe { (self.lib().ibv_create_qp)(self.pd, &mut init) };
        }
        if qp.is_null() {
            return Err(verbs_error("ibv_create_qp", errno()));
        }
        Ok((qp, init.cap.max_inline_data))
    }

    fn modify(&self, qp: *mut sys::ibv_qp, mut step: Transition, what: &'static str) -> Result<()> {
        // SAFETY: qp is live; the attributes are fully initialised.
        let rc = unsafe { (self.lib().ibv_modify_qp)(qp, &mut step.attr, step.mask as i32) };
        if rc != 0 {
            return Err(verbs_error(what, rc));
        }
        Ok(())
    }

    fn destroy_qp(&self, qp: *mut sys::ibv_qp) {
        if qp.is_null() {
            return;
        }
        // SAFETY: qp is live and destroyed once; its CQ and SRQ outlive it.
        // Its async events were acknowledged when read, so this does not
        // wait for them.
        let rc = unsafe { (self.lib().ibv_destroy_qp)(qp) };
        if rc != 0 {
            tracing::warn!(error = %verbs_error("ibv_destroy_qp", rc), "destroying a queue pair failed");
        }
    }

    fn create_ud(&mut self) -> Result<()> {
        let (qp, _) = self.create_qp(sys::ibv_qp_type_IBV_QPT_UD, UD_SENDS as u32, 0, ptr::null_mut())?;
        self.ud.qp = qp;
        self.bring_up_ud()?;
        // SAFETY: qp is live.
        self.local.ud_qpn = unsafe { (*qp).qp_num };
        self.ud.buf = vec![0u8; UD_SLOT * (UD_RECVS + UD_SENDS)].into();
        // SAFETY: the buffer lives in self.ud until after the MR is
        // deregistered (Drop).
        self.ud.mr = unsafe {
            (self.lib().ibv_reg_mr)(
                self.pd,
                self.ud.buf.as_mut_ptr().cast(),
                self.ud.buf.len(),
                sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE as i32,
            )
        };
        if self.ud.mr.is_null() {
            return Err(verbs_error("ibv_reg_mr(handshake buffers)", errno()));
        }
        self.post_all_ud_recvs()
    }

    fn bring_up_ud(&mut self) -> Result<()> {
        for step in qp::ud_steps(self.local.port, random_u32() & 0xff_ffff) {
            self.modify(self.ud.qp, step, "ibv_modify_qp(UD)")?;
        }
        Ok(())
    }

    fn post_all_ud_recvs(&mut self) -> Result<()> {
        self.ud.send_free = (UD_RECVS..UD_RECVS + UD_SENDS).collect();
        for slot in 0..UD_RECVS {
            self.post_ud_recv(slot)?;
        }
        Ok(())
    }

    /// Rebuilds the handshake queue pair after an error: RESET, then up
    /// again with every receive reposted. Its QPN (our address) stays.
    fn rebuild_ud(&mut self) {
        let now = Instant::now();
        if self.ud.rebuilt_at.is_some_and(|at| now.duration_since(at) < UD_REBUILD_HOLD) {
            return;
        }
        self.ud.rebuilt_at = Some(now);
        self.ud.epoch = self.ud.epoch.wrapping_add(1);
        let result = self
            .modify(self.ud.qp, qp::to_reset(), "ibv_modify_qp(UD RESET)")
            .and_then(|()| self.bring_up_ud())
            .and_then(|()| self.post_all_ud_recvs());
        match result {
            Ok(()) => {
                self.ud.broken = false;
                tracing::warn!(device = %self.ctx.name, "the handshake queue pair was in error and has been rebuilt");
            }
            Err(e) => tracing::error!(error = %e, "rebuilding the handshake queue pair failed; retrying"),
        }
    }

    fn ud_slot(&mut self, slot: usize) -> (*mut u8, u32) {
        // SAFETY: slot < UD_RECVS + UD_SENDS, inside the buffer.
        (unsafe { self.ud.buf.as_mut_ptr().add(slot * UD_SLOT) }, lkey(self.ud.mr))
    }

    fn post_ud_recv(&mut self, slot: usize) -> Result<()> {
        let (addr, lkey) = self.ud_slot(slot);
        let mut sge = sys::ibv_sge { addr: addr as u64, length: UD_SLOT as u32, lkey };
        // SAFETY: plain data; all-zero valid.
        let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = ud_wr_id(KIND_UD_RECV, self.ud.epoch, slot);
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = ptr::null_mut();
        // SAFETY: the UD QP is live; the buffer is registered and owned.
        let rc = unsafe { sys::ops::ibv_post_recv(self.ud.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(verbs_error("ibv_post_recv(UD)", rc));
        }
        Ok(())
    }

    /// Sends one handshake datagram to `peer`. A lost or unsendable one is
    /// covered by the initiator's retries.
    fn send_handshake(&mut self, peer: usize, kind: HandshakeKind, echo: Option<End>) {
        let Some(slot) = self.ud.send_free.pop() else {
            tracing::debug!("handshake send slots exhausted; the retry will resend");
            return;
        };
        if self.peers[peer].ah.is_null() {
            let p = &self.peers[peer];
            let mut path = qp::path_to(&p.addr, self.local.port, self.local.gid_index, self.local.roce, &self.config);
            // SAFETY: the PD is live; path is fully initialised.
            let ah = unsafe { (self.lib().ibv_create_ah)(self.pd, &mut path) };
            if ah.is_null() {
                tracing::warn!(error = %verbs_error("ibv_create_ah", errno()), peer = ?p.addr, "no route to peer");
                self.ud.send_free.push(slot);
                return;
            }
            self.peers[peer].ah = ah;
        }
        let p = &self.peers[peer];
        let (Some(local), Some(msg)) = (p.link.local, p.lanes[Lane::Msg as usize].as_ref()) else {
            return self.ud.send_free.push(slot);
        };
        let message = Handshake {
            kind,
            from: self.local,
            to_nonce: p.addr.nonce,
            qpn: local.qpn,
            psn: local.psn,
            msg_qpn: msg.qpn,
            msg_psn: msg.psn,
            rd_depth: self.caps.rd_responder,
            generation: local.generation,
            echo_generation: echo.map_or(0, |r| r.generation),
            echo_qpn: echo.map_or(0, |r| r.qpn),
        }
        .encode();
        let (ah, remote_qpn) = (p.ah, p.addr.ud_qpn);
        let (addr, lkey) = self.ud_slot(slot);
        // SAFETY: the slot is ours (taken from the free list) and
        // UD_SLOT > HANDSHAKE_LEN.
        unsafe { ptr::copy_nonoverlapping(message.as_ptr(), addr, HANDSHAKE_LEN) };
        let mut sge = sys::ibv_sge { addr: addr as u64, length: HANDSHAKE_LEN as u32, lkey };
        // SAFETY: plain data; all-zero valid.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = ud_wr_id(KIND_UD_SEND, self.ud.epoch, slot);
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode_IBV_WR_SEND;
        wr.send_flags = sys::ibv_send_flags_IBV_SEND_SIGNALED;
        wr.wr.ud = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_3 { ah, remote_qpn, remote_qkey: qp::HANDSHAKE_QKEY };
        let mut bad = ptr::null_mut();
        // SAFETY: the UD QP and AH are live; the buffer is registered.
        let rc = unsafe { sys::ops::ibv_post_send(self.ud.qp, &mut wr, &mut bad) };
        if rc != 0 {
            tracing::debug!(error = %verbs_error("ibv_post_send(UD)", rc), "handshake not sent; the retry will resend");
            self.ud.send_free.push(slot);
        }
    }

    fn peer_for(&mut self, addr: NicAddr) -> usize {
        if let Some(&i) = self.by_addr.get(&addr) {
            return i;
        }
        self.peers.push(Peer {
            addr,
            ah: ptr::null_mut(),
            link: Link::new(),
            lanes: [None, None],
            chains: [None, None],
        });
        self.by_addr.insert(addr, self.peers.len() - 1);
        self.peers.len() - 1
    }

    /// Creates one RC queue pair in INIT on `srq`.
    fn new_rc_qp(&mut self, depth: u32, srq: *mut sys::ibv_srq) -> Result<RcQp> {
        let (ptr, max_inline) = self.create_qp(sys::ibv_qp_type_IBV_QPT_RC, depth, self.config.max_inline, srq)?;
        if let Err(e) = self.modify(ptr, qp::rc_init(self.local.port), "ibv_modify_qp(INIT)") {
            self.destroy_qp(ptr);
            return Err(e);
        }
        // SAFETY: ptr is live.
        let qpn = unsafe { (*ptr).qp_num };
        Ok(RcQp {
            ptr,
            qpn,
            psn: random_u32() & 0xff_ffff,
            max_inline,
            ring: SendRing::new(depth as usize),
            flush_pending: 0,
        })
    }

    /// Gives `peer` a fresh pair of queue pairs in INIT, retiring the old
    /// ones (their outstanding work flushes).
    fn fresh_qps(&mut self, peer: usize, why: &'static str) -> Result<()> {
        self.retire_lanes(peer, why);
        let rma = self.new_rc_qp(self.caps.send_depth, self.imm_srq)?;
        let msg = match self.new_rc_qp(self.caps.msg_depth, self.srq) {
            Ok(q) => q,
            Err(e) => {
                self.destroy_qp(rma.ptr);
                return Err(e);
            }
        };
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.by_qpn.insert(rma.qpn, peer);
        self.by_qpn.insert(msg.qpn, peer);
        let p = &mut self.peers[peer];
        p.link.replaced(End { qpn: rma.qpn, psn: rma.psn, generation: self.next_generation });
        p.lanes = [Some(rma), Some(msg)];
        Ok(())
    }

    /// Retires both of `peer`'s queue pairs (if any).
    fn retire_lanes(&mut self, peer: usize, why: &'static str) {
        for lane in LANES {
            self.retire(peer, lane, why);
        }
        self.peers[peer].link.forget_local();
    }

    /// Moves one queue pair to ERR and starts its retirement (`drain.rs`).
    fn retire(&mut self, peer: usize, lane: Lane, why: &'static str) {
        // Staged work goes to the device first, so that every ring entry is
        // on its send queue and flushes in order.
        self.submit(peer, lane);
        let Some(mut qp) = self.peers[peer].lanes[lane as usize].take() else { return };
        self.by_qpn.remove(&qp.qpn);
        if let Err(e) = self.modify(qp.ptr, qp::to_error(), "ibv_modify_qp(ERR)") {
            // Cannot drain what cannot be stopped: fail it and let destroy
            // clean up (what it deletes is lost, as before this module).
            tracing::warn!(error = %e, "cannot move a queue pair to the error state; destroying it");
            self.fail_ring(&mut qp, why);
            self.flush_pending -= qp.flush_pending;
            self.destroy_qp(qp.ptr);
            return;
        }
        let mut marker = false;
        if qp.ring.outstanding() > 0 {
            let mut wr = sendq::marker(rc_wr_id(KIND_MARKER, peer, lane, 0));
            let mut bad = ptr::null_mut();
            // SAFETY: the QP is live; the marker names no memory.
            let rc = unsafe { sys::ops::ibv_post_send(qp.ptr, &mut wr, &mut bad) };
            if rc == 0 {
                marker = true;
                self.outstanding += 1;
            } else {
                // No way to know when the send queue is done: fail its work
                // now; its completions, if any come, retire nothing.
                tracing::warn!(error = %verbs_error("ibv_post_send(marker)", rc), "retiring a queue pair without a marker");
                let n = qp.ring.outstanding();
                self.fail_ring(&mut qp, why);
                qp.flush_pending += n;
                self.flush_pending += n;
            }
        }
        self.retiring.push(Retiring { peer, qp, drain: Drain::new(Instant::now(), marker), why });
    }

    /// Fails everything on `qp`'s ring as flushed (into `deferred`).
    fn fail_ring(&mut self, qp: &mut RcQp, why: &'static str) {
        let deferred = &mut self.deferred;
        let mut n = 0;
        qp.ring.drain(|e| {
            n += 1;
            deferred.push(Event::Failed { token: e.token, error: flushed(e.kind, why) });
        });
        self.outstanding -= n;
    }

    /// Breaks the connection to `peer`: both queue pairs retire, and the
    /// next request reconnects.
    fn break_peer(&mut self, peer: usize, why: &'static str) {
        self.set_phase(peer, Phase::Broken);
        self.retire_lanes(peer, why);
    }

    /// Starts (or restarts) the handshake with `peer`.
    fn connect(&mut self, peer: usize) -> Result<()> {
        self.fresh_qps(peer, "the connection was re-established")?;
        let phase = self.peers[peer].link.attempt(Instant::now(), RETRY_FIRST);
        self.set_phase(peer, phase);
        tracing::debug!(peer = ?self.peers[peer].addr, local = ?self.peers[peer].link.local, "connecting");
        self.send_handshake(peer, HandshakeKind::Request, None);
        Ok(())
    }

    fn set_phase(&mut self, peer: usize, phase: Phase) {
        let was = self.peers[peer].link.is_connecting();
        self.peers[peer].link.phase = phase;
        let is = self.peers[peer].link.is_connecting();
        self.connecting = self.connecting + usize::from(is) - usize::from(was);
    }

    /// Moves our queue pairs for `peer` to RTS against the peer's.
    fn establish(&mut self, peer: usize, remote: End, m: &Handshake) -> Result<()> {
        let p = &self.peers[peer];
        let (Some(local), Some(rma), Some(msg)) = (p.link.local, &p.lanes[0], &p.lanes[1]) else {
            return Err(Error::InvalidRequest("no queue pair to connect".into()));
        };
        let mtu = qp::path_mtu(self.local.mtu, p.addr.mtu, self.mtu_bound);
        let path = qp::path_to(&p.addr, self.local.port, self.local.gid_index, self.local.roce, &self.config);
        let reads = qp::read_depth(self.caps.rd_initiator, m.rd_depth);
        let pairs = [(rma.ptr, local.psn, remote.qpn, remote.psn), (msg.ptr, msg.psn, m.msg_qpn, m.msg_psn)];
        for (qp_ptr, psn, remote_qpn, remote_psn) in pairs {
            let rtr = qp::rc_rtr(path, mtu, remote_qpn, remote_psn, self.caps.rd_responder, &self.config);
            self.modify(qp_ptr, rtr, "ibv_modify_qp(RTR)")?;
            self.modify(qp_ptr, qp::rc_rts(psn, reads, &self.config), "ibv_modify_qp(RTS)")?;
        }
        let was = self.peers[peer].link.is_connecting();
        self.peers[peer].link.connected(remote);
        self.connecting -= usize::from(was);
        self.woke = true;
        tracing::debug!(peer = ?self.peers[peer].addr, remote_qpn = remote.qpn, mtu, reads, "connected");
        Ok(())
    }

    fn on_handshake(&mut self, m: Handshake) {
        if m.to_nonce != self.local.nonce {
            return; // for an earlier incarnation of this NIC
        }
        let remote = End { qpn: m.qpn, psn: m.psn, generation: m.generation };
        let result = match m.kind {
            HandshakeKind::Request => {
                let peer = self.peer_for(m.from);
                self.on_request(peer, remote, &m)
            }
            HandshakeKind::Reply => match self.by_addr.get(&m.from) {
                Some(&peer) if self.peers[peer].link.on_reply(remote, m.echo_generation, m.echo_qpn) => {
                    self.establish(peer, remote, &m)
                }
                _ => Ok(()), // stale, or already connected by the peer's request
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, peer = ?m.from, "connection setup failed");
            if let Some(&peer) = self.by_addr.get(&m.from) {
                self.break_peer(peer, "connection setup failed");
            }
        }
    }

    fn on_request(&mut self, peer: usize, remote: End, m: &Handshake) -> Result<()> {
        let decision = self.peers[peer].link.on_request(remote);
        if decision.replace {
            self.fresh_qps(peer, "the peer re-established the connection")?;
        }
        if decision.connect {
            self.establish(peer, remote, m)?;
        }
        if decision.reply {
            self.send_handshake(peer, HandshakeKind::Reply, Some(remote));
        }
        Ok(())
    }

    /// Resends unanswered requests and gives up on the ones past the
    /// connect timeout.
    fn drive_handshakes(&mut self) {
        let now = Instant::now();
        for peer in 0..self.peers.len() {
            let Phase::Connecting { started, last_sent, retry_after } = self.peers[peer].link.phase else { continue };
            if now.duration_since(started) >= self.config.connect_timeout {
                tracing::warn!(peer = ?self.peers[peer].addr, "no answer to the connection handshake");
                let phase = self.peers[peer].link.gave_up(now + FAILED_HOLD);
                self.set_phase(peer, phase);
            } else if now.duration_since(last_sent) >= retry_after {
                let next = (retry_after * 2).min(RETRY_MAX);
                self.peers[peer].link.phase = Phase::Connecting { started, last_sent: now, retry_after: next };
                self.send_handshake(peer, HandshakeKind::Request, None);
            }
        }
    }

    /// Posts every staged chain.
    fn flush(&mut self) {
        for i in 0..self.staged.len() {
            let (peer, lane) = self.staged[i];
            self.post_chain(peer, lane);
        }
        self.staged.clear();
    }

    /// Posts `peer`'s staged chain for `lane`; a chain the device refuses
    /// (in part) breaks the connection.
    fn post_chain(&mut self, peer: usize, lane: Lane) {
        if !self.submit(peer, lane) {
            self.break_peer(peer, "the device refused work requests to this peer");
        }
    }

    /// Posts `peer`'s staged chain for `lane`. Work requests the device
    /// refuses fail; returns false when there were any.
    fn submit(&mut self, peer: usize, lane: Lane) -> bool {
        let p = &mut self.peers[peer];
        let Some(chain) = p.chains[lane as usize].as_mut().filter(|c| c.len > 0) else { return true };
        let Some(qp) = p.lanes[lane as usize].as_mut() else {
            debug_assert!(false, "work staged for a queue pair that is gone");
            chain.clear();
            return true;
        };
        let head = chain.seal();
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live (a QP is retired only after its chain was
        // submitted); the chain's work requests point at registered memory
        // that the engine keeps alive until their completions.
        let rc = unsafe { sys::ops::ibv_post_send(qp.ptr, head, &mut bad) };
        let len = chain.len;
        let refused = if rc == 0 {
            0
        } else if bad.is_null() {
            len
        } else {
            len - chain.index_of(bad)
        };
        chain.clear();
        if refused == 0 {
            return true;
        }
        let error = verbs_error("ibv_post_send", rc);
        tracing::warn!(%error, refused, "work requests refused; the connection will be rebuilt");
        let deferred = &mut self.deferred;
        qp.ring.unpush(refused, |e| {
            deferred.push(Event::Failed { token: e.token, error: error.clone() });
        });
        self.outstanding -= refused;
        false
    }

    fn on_completion(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        if wc.wr_id & INTERNAL == 0 {
            return self.on_receive(wc, events);
        }
        match (wc.wr_id >> KIND_SHIFT) & 7 {
            KIND_RC_SEND => self.on_send_completion(wc, events),
            KIND_MARKER => self.on_marker(wc, events),
            KIND_IMM_RECV => self.on_immediate(wc, events),
            KIND_UD_SEND | KIND_UD_RECV => self.on_ud_completion(wc),
            _ => tracing::error!(wr_id = wc.wr_id, "completion with an unknown work-request id"),
        }
    }

    fn on_ud_completion(&mut self, wc: &sys::ibv_wc) {
        if ((wc.wr_id >> 32) & 0xff) as u8 != self.ud.epoch {
            return; // from before the last rebuild: its slot was reclaimed then
        }
        let index = (wc.wr_id & 0xffff_ffff) as usize;
        let ok = wc.status == sys::ibv_wc_status_IBV_WC_SUCCESS;
        if !ok {
            // A UD queue pair goes to SQE (send) or ERR (receive) on an
            // error, and would stop every later handshake: rebuild it.
            tracing::debug!(status = %self.lib().status_str(wc.status), "handshake completion failed");
            self.ud.broken = true;
        }
        if (wc.wr_id >> KIND_SHIFT) & 7 == KIND_UD_SEND {
            self.ud.send_free.push(index);
            return;
        }
        if !ok {
            return; // the rebuild reposts every receive
        }
        let len = (wc.byte_len as usize).min(UD_SLOT);
        let bytes = &self.ud.buf[index * UD_SLOT..index * UD_SLOT + len];
        match bytes.get(GRH..).map(Handshake::decode) {
            Some(Ok(m)) => self.on_handshake(m),
            Some(Err(why)) => tracing::debug!(?why, "ignoring a malformed handshake"),
            None => {}
        }
        if let Err(e) = self.post_ud_recv(index) {
            tracing::error!(error = %e, "reposting a handshake buffer failed");
            self.ud.broken = true;
        }
    }

    /// A receive on the message SRQ (an engine buffer).
    fn on_receive(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        let token = wc.wr_id;
        if wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS {
            let error = completion_error(self.lib(), wc, "recv");
            self.receive_error(wc);
            events.push(Event::ReceiveFailed { token, error });
            return;
        }
        // SAFETY: the union's immediate is valid when IBV_WC_WITH_IMM is set.
        let imm = (wc.wc_flags & sys::ibv_wc_flags_IBV_WC_WITH_IMM != 0)
            .then(|| u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data }));
        if wc.opcode == sys::ibv_wc_opcode_IBV_WC_RECV_RDMA_WITH_IMM {
            events.push(Event::Received { token, len: 0, message: false, imm });
        } else {
            events.push(Event::Received { token, len: wc.byte_len as usize, message: true, imm });
        }
    }

    /// A receive on the immediate SRQ: an immediate, or an error.
    fn on_immediate(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        self.imm.consumed();
        if wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS {
            tracing::debug!(status = %self.lib().status_str(wc.status), "immediate receive failed");
            self.receive_error(wc);
        } else if wc.wc_flags & sys::ibv_wc_flags_IBV_WC_WITH_IMM != 0 {
            // SAFETY: the union's immediate is valid when IBV_WC_WITH_IMM is set.
            let value = u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data });
            events.push(Event::Imm { value });
        } else {
            // A send to the RMA queue pair: no strait peer does that.
            tracing::debug!(opcode = wc.opcode, "unexpected receive on the immediate queue");
        }
    }

    /// A receive completed in error: unless it is a flush (its queue pair is
    /// already in error, so its peer is being dealt with), the queue pair
    /// it arrived on is unusable (a receive error takes it to ERR): break
    /// that peer now, so that its next request reconnects instead of
    /// failing as flushed.
    fn receive_error(&mut self, wc: &sys::ibv_wc) {
        if wc.status == sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR {
            return;
        }
        if let Some(&peer) = self.by_qpn.get(&wc.qp_num) {
            tracing::warn!(status = %self.lib().status_str(wc.status), peer = ?self.peers[peer].addr, "receive failed; the connection will be rebuilt");
            self.break_peer(peer, "a receive from this peer failed");
        }
    }

    fn on_send_completion(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        let (peer, lane) = rc_target(wc.wr_id);
        let lib = self.lib();
        let current =
            self.peers.get(peer).and_then(|p| p.lanes[lane as usize].as_ref()).is_some_and(|q| q.qpn == wc.qp_num);
        let failed = wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS;
        let accounted = if current {
            if failed {
                // Every ring entry must be on the device before the ring
                // says which ones flushed.
                self.submit(peer, lane);
            }
            let qp = self.peers[peer].lanes[lane as usize].as_mut().expect("checked above");
            account(qp, wc, |kind| completion_error(lib, wc, op_name(kind)), events)
        } else if let Some(r) = self.retiring.iter_mut().find(|r| r.qp.qpn == wc.qp_num) {
            account(&mut r.qp, wc, |kind| completion_error(lib, wc, op_name(kind)), events)
        } else {
            return; // from a queue pair already destroyed (its work failed then)
        };
        self.outstanding -= accounted.retired;
        self.flush_pending = self.flush_pending + accounted.flushed - accounted.flush_seen;
        if current && accounted.failed {
            tracing::debug!(peer = ?self.peers[peer].addr, "work request failed; the connection will be rebuilt");
            self.break_peer(peer, "an earlier work request to this peer failed");
        }
    }

    /// A retiring queue pair's marker completed: its send queue is empty.
    fn on_marker(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        let Some(i) = self.retiring.iter().position(|r| r.qp.qpn == wc.qp_num) else { return };
        let r = &mut self.retiring[i];
        if !r.drain.awaiting_marker() {
            return;
        }
        r.drain.marker_completed(Instant::now());
        // Entries still on the ring had no completion of their own (the
        // device generated none for flushed unsignalled work requests):
        // they flushed.
        let why = r.why;
        let mut n = 0;
        r.qp.ring.drain(|e| {
            n += 1;
            events.push(Event::Failed { token: e.token, error: flushed(e.kind, why) });
        });
        // Nothing from its send queue follows the marker.
        let pending = std::mem::take(&mut r.qp.flush_pending);
        self.flush_pending -= pending;
        self.outstanding -= n + 1;
    }

    /// Reads and acknowledges every queued async event.
    fn read_async_events(&mut self) {
        loop {
            // SAFETY: plain data; all-zero valid.
            let mut event: sys::ibv_async_event = unsafe { std::mem::zeroed() };
            // SAFETY: the context is open and its async fd non-blocking.
            if unsafe { (self.lib().ibv_get_async_event)(self.ctx.ptr, &mut event) } != 0 {
                return; // EAGAIN: none queued
            }
            let copy = event;
            // Acknowledge first: destroying a queue pair waits for the
            // acknowledgement of its events, and handling may destroy one.
            // SAFETY: the event was just read and is acknowledged once.
            unsafe { (self.lib().ibv_ack_async_event)(&mut event) };
            self.on_async_event(&copy);
        }
    }

    fn on_async_event(&mut self, event: &sys::ibv_async_event) {
        let kind = classify(event.event_type);
        match kind {
            AsyncKind::QueuePairFailed(what) | AsyncKind::LastWqeReached(what) => {
                // SAFETY: the element of a queue-pair event is its qp, which
                // is live: a QP is destroyed only after its events are read.
                let qp = unsafe { event.element.qp };
                if qp == self.ud.qp {
                    tracing::warn!(event = what, "async event on the handshake queue pair");
                    self.ud.broken |= matches!(kind, AsyncKind::QueuePairFailed(_));
                } else if let Some(r) = self.retiring.iter_mut().find(|r| r.qp.ptr == qp) {
                    if matches!(kind, AsyncKind::LastWqeReached(_)) {
                        r.drain.last_wqe_reached();
                    }
                } else if let AsyncKind::QueuePairFailed(what) = kind {
                    let found = self.peers.iter().position(|p| p.lanes.iter().flatten().any(|q| q.ptr == qp));
                    if let Some(peer) = found {
                        tracing::warn!(event = what, peer = ?self.peers[peer].addr, "queue pair failed; the connection will be rebuilt");
                        self.break_peer(peer, "the queue pair to this peer failed");
                    }
                }
            }
            AsyncKind::Port { up, what } => {
                // SAFETY: the element of a port event is its port number.
                let port = unsafe { event.element.port_num };
                if up {
                    tracing::info!(device = %self.ctx.name, port, event = what, "port event");
                } else {
                    tracing::warn!(device = %self.ctx.name, port, event = what, "port event: connections through it will fail");
                }
            }
            AsyncKind::Fatal(what) => tracing::error!(device = %self.ctx.name, event = what, "verbs device error"),
            AsyncKind::Other(what) => tracing::debug!(device = %self.ctx.name, event = what, "async event"),
        }
    }

    /// Destroys the retiring queue pairs that are drained (or past the
    /// hard limit). `swept`: the CQ was just polled empty.
    fn advance_retirements(&mut self, swept: bool, events: &mut Vec<Event>) {
        if self.retiring.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.retiring.len() {
            if swept {
                self.retiring[i].drain.cq_swept();
            }
            match self.retiring[i].drain.verdict(now) {
                Verdict::Wait => i += 1,
                verdict => {
                    let mut r = self.retiring.swap_remove(i);
                    if verdict == Verdict::GiveUp {
                        tracing::warn!(peer = r.peer, "a retiring queue pair did not drain in time; destroying it");
                        let mut n = 0;
                        r.qp.ring.drain(|e| {
                            n += 1;
                            events.push(Event::Failed { token: e.token, error: flushed(e.kind, r.why) });
                        });
                        self.outstanding -= n + usize::from(r.drain.awaiting_marker());
                    }
                    self.flush_pending -= r.qp.flush_pending;
                    self.destroy_qp(r.qp.ptr);
                }
            }
        }
    }

    fn poll_cq(&mut self) -> usize {
        // SAFETY: the CQ is live; wcs has room for CQ_BATCH entries.
        let n = unsafe { sys::ops::ibv_poll_cq(self.cq, CQ_BATCH as i32, self.wcs.as_mut_ptr()) };
        if n < 0 {
            tracing::error!(rc = n, "ibv_poll_cq failed");
            return 0;
        }
        n as usize
    }

    fn handle(&mut self, n: usize, events: &mut Vec<Event>) {
        for i in 0..n {
            let wc = self.wcs[i];
            self.on_completion(&wc, events);
        }
    }
}

/// What one send completion retired.
struct Accounted {
    retired: usize,
    /// Entries newly retired as flushed, whose completions will follow.
    flushed: usize,
    /// Flush completions of entries retired before.
    flush_seen: usize,
    failed: bool,
}

/// Retires what a send completion says about `qp`'s ring: a success
/// completes it and every earlier entry; an error completes the earlier
/// ones, fails it and flushes every later one (a send queue completes in
/// order, and a work request that completes in error always has a
/// completion of its own).
/// `error` makes the failed request's error from its kind.
fn account(qp: &mut RcQp, wc: &sys::ibv_wc, error: impl FnOnce(OpKind) -> Error, events: &mut Vec<Event>) -> Accounted {
    let mut out = Accounted { retired: 0, flushed: 0, flush_seen: 0, failed: false };
    let Some(seq) = qp.ring.resolve(wc.wr_id as u32) else {
        // A flush completion of a work request already failed.
        if qp.flush_pending > 0 {
            qp.flush_pending -= 1;
            out.flush_seen = 1;
        }
        return out;
    };
    if wc.status == sys::ibv_wc_status_IBV_WC_SUCCESS {
        qp.ring.complete_through(seq, |e| {
            out.retired += 1;
            events.push(Event::Done { token: e.token });
        });
        return out;
    }
    out.failed = true;
    let kind = qp.ring.kind_at(seq);
    let error = error(kind);
    let flushed = Error::Transport {
        op: op_name(kind),
        code: sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR as i32,
        prov_errno: 0,
        message: format!("flushed: an earlier work request to this peer failed ({error})"),
    };
    qp.ring.fail_from(seq, |e, how| {
        out.retired += 1;
        events.push(match how {
            Retired::Done => Event::Done { token: e.token },
            Retired::Failed => Event::Failed { token: e.token, error: error.clone() },
            Retired::Flushed => {
                out.flushed += 1;
                Event::Failed { token: e.token, error: flushed.clone() }
            }
        });
    });
    qp.flush_pending += out.flushed;
    out
}

fn completion_error(lib: &sys::Library, wc: &sys::ibv_wc, op: &'static str) -> Error {
    let message = lib.status_str(wc.status);
    let detail = || format!("{op}: {message} (vendor error {:#x})", wc.vendor_err);
    match wc.status {
        sys::ibv_wc_status_IBV_WC_RETRY_EXC_ERR | sys::ibv_wc_status_IBV_WC_RNR_RETRY_EXC_ERR => {
            Error::PeerUnreachable(detail())
        }
        sys::ibv_wc_status_IBV_WC_REM_ACCESS_ERR => Error::RemoteAccess(detail()),
        status => Error::Transport { op, code: status as i32, prov_errno: wc.vendor_err as i32, message },
    }
}

/// The error of work that flushed because its queue pair was retired.
fn flushed(kind: OpKind, why: &'static str) -> Error {
    Error::Transport {
        op: op_name(kind),
        code: sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR as i32,
        prov_errno: 0,
        message: format!("flushed: {why}"),
    }
}

/// Whether `op` may go inline (`IBV_SEND_INLINE`: the provider copies the
/// payload with the CPU while posting): short enough for the queue pair,
/// and from host memory. A device-memory buffer (registered through
/// nvidia-peermem or dma-buf) must be read by the NIC itself.
fn inline_ok(op: &Op, max_inline: u32) -> bool {
    op.host_memory && op.len <= u64::from(max_inline)
}

fn op_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Write => "write",
        OpKind::Read => "read",
        OpKind::Send => "send",
    }
}

fn lkey(mr: *mut sys::ibv_mr) -> u32 {
    sendq::lkey_of(mr.cast())
}

impl Nic for VerbsNic {
    fn address(&self) -> &[u8] {
        &self.address
    }

    fn virtual_addresses(&self) -> bool {
        true
    }

    /// The port's `max_msg_sz`.
    fn max_piece(&self) -> u64 {
        self.caps.max_msg
    }

    unsafe fn register(&mut self, addr: *mut u8, len: u64, access: Access) -> Result<NicRegion> {
        let flags = access_flags(access);
        let lib = self.lib();
        let reg = |flags: u32| -> *mut sys::ibv_mr {
            match lib.ibv_reg_mr_iova2 {
                // SAFETY: the PD is live; the caller keeps the memory valid
                // until deregister. iova = address: peers use virtual
                // addresses. RELAXED_ORDERING is an optional flag the
                // library drops where unsupported.
                Some(f) if self.caps.relaxed => unsafe {
                    f(
                        self.pd,
                        addr.cast(),
                        len as usize,
                        addr as u64,
                        flags | sys::ibv_access_flags_IBV_ACCESS_RELAXED_ORDERING,
                    )
                },
                // SAFETY: as above.
                _ => unsafe { (lib.ibv_reg_mr)(self.pd, addr.cast(), len as usize, flags as i32) },
            }
        };
        let mut mr = reg(flags);
        if mr.is_null() && !access.remote_write && matches!(errno(), libc::EFAULT | libc::EACCES | libc::EPERM) {
            // Read-only memory (a read-only mapping) cannot be pinned for
            // local write; as a source it does not need to be.
            mr = reg(flags & !sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE);
        }
        if mr.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(Error::RegisterMemory { addr: addr as usize, len, reason: format!("ibv_reg_mr: {e}") });
        }
        // SAFETY: mr was just registered.
        let rkey = unsafe { (*mr).rkey };
        Ok(NicRegion { handle: mr.cast(), key: u64::from(rkey), desc: mr.cast() })
    }

    fn device_memory(&self) -> bool {
        // dma-buf (rdma-core 34, a kernel with it, and a CUDA driver that
        // exports device memory as dma-buf: open kernel modules, or r535+),
        // else nvidia-peermem, which lets ibv_reg_mr pin device pointers.
        crate::cuda::available()
            && (self.lib().ibv_reg_dmabuf_mr.is_some() || std::path::Path::new("/sys/module/nvidia_peermem").exists())
    }

    unsafe fn register_device(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        _gpu: u32,
        dmabuf: Option<(i32, u64)>,
    ) -> Result<NicRegion> {
        let flags = access_flags(access);
        let lib = self.lib();
        let (mr, call) = match (dmabuf, lib.ibv_reg_dmabuf_mr) {
            (Some((fd, offset)), Some(reg)) => {
                // SAFETY: the PD is live; fd is the dma-buf of the range
                // (which starts `offset` bytes into it) and stays valid for
                // the call; iova = the device address, as peers name it.
                let mr = unsafe { reg(self.pd, offset, len as usize, addr, fd, flags as i32) };
                (mr, "ibv_reg_dmabuf_mr")
            }
            _ => {
                // With nvidia-peermem, plain registration pins device
                // pointers.
                // SAFETY: as for host memory; the caller keeps it allocated.
                let mr = unsafe { (lib.ibv_reg_mr)(self.pd, addr as *mut c_void, len as usize, flags as i32) };
                (mr, "ibv_reg_mr")
            }
        };
        if mr.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(Error::RegisterMemory {
                addr: addr as usize,
                len,
                reason: format!("{call} on device memory: {e} (dma-buf unsupported, and no nvidia-peermem?)"),
            });
        }
        // SAFETY: mr was just registered.
        let rkey = unsafe { (*mr).rkey };
        Ok(NicRegion { handle: mr.cast(), key: u64::from(rkey), desc: mr.cast() })
    }

    fn deregister(&mut self, region: NicRegion) {
        if region.handle.is_null() {
            return;
        }
        // SAFETY: the handle is a live ibv_mr from `register`, released once.
        let rc = unsafe { (self.lib().ibv_dereg_mr)(region.handle.cast()) };
        if rc != 0 {
            tracing::warn!(error = %verbs_error("ibv_dereg_mr", rc), "deregistering memory failed");
        }
    }

    fn insert_peer(&mut self, address: &[u8]) -> Result<u64> {
        let addr = NicAddr::decode(address).map_err(|why| Error::InvalidDescriptor {
            what: "engine address",
            reason: format!("verbs NIC address: {why}"),
        })?;
        if addr.roce != self.local.roce {
            return Err(Error::PeerUnreachable(format!(
                "peer NIC is on {} but {} is on {}",
                if addr.roce { "RoCE" } else { "InfiniBand" },
                self.ctx.name,
                if self.local.roce { "RoCE" } else { "InfiniBand" }
            )));
        }
        Ok(self.peer_for(addr) as u64)
    }

    unsafe fn post(&mut self, op: &Op) -> Result<Posted> {
        let peer = op.peer as usize;
        match self.peers[peer].link.phase {
            Phase::Ready => {}
            Phase::Connecting { .. } => return Ok(Posted::Busy),
            Phase::Idle | Phase::Broken => {
                self.connect(peer)?;
                return Ok(Posted::Busy);
            }
            Phase::Failed { until } => {
                if Instant::now() < until {
                    return Err(Error::PeerUnreachable(format!(
                        "no answer to the connection handshake within {:?}",
                        self.config.connect_timeout
                    )));
                }
                self.connect(peer)?;
                return Ok(Posted::Busy);
            }
        }
        if op.len > self.caps.max_msg {
            // The engine keeps its pieces within `max_piece`; a longer one
            // here is a bug or a message the caller sized.
            return Err(Error::InvalidRequest(format!(
                "a {}-byte piece exceeds the port's maximum message of {} bytes (lower ShardConfig::max_piece)",
                op.len, self.caps.max_msg
            )));
        }
        let lane = Lane::of(op.kind);
        let full = self.outstanding + self.flush_pending >= self.caps.cq_budget;
        let p = &mut self.peers[peer];
        let Some(qp) = p.lanes[lane as usize].as_mut() else {
            debug_assert!(false, "a ready connection has both queue pairs");
            self.break_peer(peer, "the connection lost a queue pair");
            return Ok(Posted::Busy);
        };
        if qp.ring.free() == 0 || full {
            self.flush();
            return Ok(Posted::Busy);
        }
        let (seq, signaled) = qp.ring.push(Entry { token: op.token, kind: op.kind });
        // Inline copies the payload with the CPU at post time: host memory
        // only (a device pointer would fault or read garbage).
        let inline = inline_ok(op, qp.max_inline);
        // Allocated once per peer and lane, on first use.
        let chain = p.chains[lane as usize].get_or_insert_with(Chain::new);
        if chain.len == 0 {
            self.staged.push((peer, lane));
        }
        let spec = WrSpec {
            wr_id: rc_wr_id(KIND_RC_SEND, peer, lane, seq),
            signaled,
            inline,
            lkey: sendq::lkey_of(op.local_desc),
        };
        chain.push(op, spec);
        let full_chain = chain.is_full();
        self.outstanding += 1;
        if full_chain {
            self.post_chain(peer, lane);
        }
        Ok(Posted::Accepted)
    }

    unsafe fn post_recv(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, token: u64) -> Result<Posted> {
        debug_assert!(token & INTERNAL == 0, "engine receive tokens never use the backend's bit");
        let mut sge = sys::ibv_sge { addr: buf as u64, length: len as u32, lkey: sendq::lkey_of(desc) };
        // SAFETY: plain data; all-zero valid.
        let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = token;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = ptr::null_mut();
        // SAFETY: the SRQ is live; the caller keeps the buffer registered
        // and valid until its completion.
        let rc = unsafe { sys::ops::ibv_post_srq_recv(self.srq, &mut wr, &mut bad) };
        match rc {
            0 => Ok(Posted::Accepted),
            libc::ENOMEM => Ok(Posted::Busy),
            rc => Err(verbs_error("ibv_post_srq_recv", rc)),
        }
    }

    fn flush(&mut self) {
        VerbsNic::flush(self);
    }

    /// Breaks the connection to `peer` when work is outstanding on it (a
    /// stalled peer: RNR retries are unlimited by default, see
    /// [`VerbsConfig::rnr_retry`]): the queue pairs go to ERR, the device
    /// flushes the work, its tokens come back as failed through `poll`, and
    /// the next request reconnects. An idle or connecting link is left
    /// alone.
    fn reset_peer(&mut self, peer: u64) {
        let peer = peer as usize;
        let Some(p) = self.peers.get(peer) else { return };
        let busy = p.lanes.iter().flatten().any(|q| q.ring.outstanding() > 0);
        if busy && matches!(p.link.phase, Phase::Ready | Phase::Broken) {
            tracing::info!(peer = ?p.addr, "resetting the connection to a peer whose requests expired");
            self.break_peer(peer, "the engine reset the connection to this peer (its requests expired)");
        }
    }

    fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        let before = events.len();
        self.flush();
        events.append(&mut self.deferred);
        if self.connecting > 0 {
            self.drive_handshakes();
        }
        // Async events before the CQ sweep: a LAST_WQE_REACHED read here
        // is followed by a sweep of the CQ in this same call.
        self.async_countdown = self.async_countdown.saturating_sub(1);
        if self.async_countdown == 0 || !self.retiring.is_empty() {
            self.async_countdown = ASYNC_EVERY;
            self.read_async_events();
        }
        let stashed = std::mem::take(&mut self.stashed);
        self.handle(stashed, events);
        let swept = loop {
            let n = self.poll_cq();
            self.handle(n, events);
            if n < CQ_BATCH {
                break true;
            }
        };
        self.advance_retirements(swept, events);
        if self.imm.due() > 0 {
            self.restock_immediates();
        }
        if self.ud.broken {
            self.rebuild_ud();
        }
        events.append(&mut self.deferred);
        events.len() - before
    }

    fn wait_fd(&self) -> Option<RawFd> {
        // SAFETY: the channel, when present, is live.
        (!self.channel.is_null()).then(|| unsafe { (*self.channel).fd })
    }

    fn ready_to_sleep(&mut self) -> bool {
        self.flush();
        if !self.deferred.is_empty() || self.stashed > 0 || std::mem::take(&mut self.woke) {
            return false;
        }
        if self.channel.is_null() {
            return true;
        }
        // Acknowledge the events that woke us, re-arm, then look once more:
        // a completion that arrived before re-arming raises no event.
        let mut acked = 0;
        loop {
            let (mut cq, mut context) = (ptr::null_mut(), ptr::null_mut());
            // SAFETY: the channel is live and non-blocking.
            if unsafe { (self.lib().ibv_get_cq_event)(self.channel, &mut cq, &mut context) } != 0 {
                break;
            }
            acked += 1;
        }
        if acked > 0 {
            // SAFETY: the CQ is live; these events were read from it.
            unsafe { (self.lib().ibv_ack_cq_events)(self.cq, acked) };
        }
        // SAFETY: the CQ is live.
        let rc = unsafe { sys::ops::ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            tracing::warn!(error = %verbs_error("ibv_req_notify_cq", rc), "cannot arm the completion channel");
            return false;
        }
        self.stashed = self.poll_cq();
        self.stashed == 0
    }
}

impl Drop for VerbsNic {
    fn drop(&mut self) {
        let lib = self.lib();
        // SAFETY: every object below was created by this NIC, is destroyed
        // once, and only after the objects that depend on it (QPs and AHs
        // before the CQ, SRQs and PD; the PD before the context, which is
        // closed when the `ctx` field drops after this). Nothing is polled
        // any more, so what the QPs still hold is not needed.
        unsafe {
            for p in std::mem::take(&mut self.peers) {
                for qp in p.lanes.into_iter().flatten() {
                    (lib.ibv_destroy_qp)(qp.ptr);
                }
                if !p.ah.is_null() {
                    (lib.ibv_destroy_ah)(p.ah);
                }
            }
            for r in std::mem::take(&mut self.retiring) {
                (lib.ibv_destroy_qp)(r.qp.ptr);
            }
            if !self.ud.qp.is_null() {
                (lib.ibv_destroy_qp)(self.ud.qp);
            }
            if !self.ud.mr.is_null() {
                (lib.ibv_dereg_mr)(self.ud.mr);
            }
            for srq in [self.srq, self.imm_srq] {
                if !srq.is_null() {
                    (lib.ibv_destroy_srq)(srq);
                }
            }
            if !self.cq.is_null() {
                (lib.ibv_destroy_cq)(self.cq);
            }
            if !self.channel.is_null() {
                (lib.ibv_destroy_comp_channel)(self.channel);
            }
            if !self.pd.is_null() {
                (lib.ibv_dealloc_pd)(self.pd);
            }
        }
    }
}

/// The verbs access flags of a region: local write always (reads land in
/// it; read-only memory retries without), remote write and read as asked.
fn access_flags(access: Access) -> u32 {
    let mut flags = sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE;
    if access.remote_write {
        flags |= sys::ibv_access_flags_IBV_ACCESS_REMOTE_WRITE;
    }
    if access.remote_read {
        flags |= sys::ibv_access_flags_IBV_ACCESS_REMOTE_READ;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inline only from host memory, and only what fits.
    #[test]
    fn only_short_host_memory_payloads_go_inline() {
        let op = |len: u64, host_memory: bool| Op {
            kind: OpKind::Write,
            local: 0x1000 as *mut u8,
            len,
            rows: crate::plan::Rows::ONE,
            local_desc: ptr::null_mut(),
            peer: 0,
            remote_addr: 0,
            key: 0,
            imm: None,
            delivery_complete: true,
            host_memory,
            token: 0,
        };
        assert!(inline_ok(&op(64, true), 64));
        assert!(!inline_ok(&op(65, true), 64));
        assert!(!inline_ok(&op(8, false), 64), "device memory is never read by the CPU");
        assert!(!inline_ok(&op(1, true), 0));
    }

    #[test]
    fn work_request_ids_never_collide() {
        for (peer, lane, seq) in [(0, Lane::Rma, 0), (5, Lane::Msg, 0xffff_ffff), (PEER_MASK as usize, Lane::Msg, 7)] {
            let id = rc_wr_id(KIND_RC_SEND, peer, lane, seq);
            assert_eq!(rc_target(id), (peer, lane));
            assert_eq!(id as u32 as u64, seq);
            assert_eq!((id >> KIND_SHIFT) & 7, KIND_RC_SEND);
            assert_ne!(id & INTERNAL, 0, "never an engine receive token");
            let marker = rc_wr_id(KIND_MARKER, peer, lane, 0);
            assert_eq!(((marker >> KIND_SHIFT) & 7, rc_target(marker)), (KIND_MARKER, (peer, lane)));
        }
        let ud = ud_wr_id(KIND_UD_RECV, 0xab, 31);
        assert_eq!(((ud >> KIND_SHIFT) & 7, (ud >> 32) & 0xff, ud & 0xffff_ffff), (KIND_UD_RECV, 0xab, 31));
        // Engine receive tokens use bit 63 and the low 36 bits only.
        let token = 1u64 << 63 | 0xf_ffff_ffff;
        assert_eq!(token & INTERNAL, 0);
        const { assert!(KIND_MARKER < 8 && PEER_SHIFT + 24 <= KIND_SHIFT && KIND_SHIFT + 3 <= 62) };
    }

    fn qp(depth: usize) -> RcQp {
        RcQp { ptr: ptr::null_mut(), qpn: 9, psn: 0, max_inline: 0, ring: SendRing::new(depth), flush_pending: 0 }
    }

    fn wc(seq: u64, status: sys::ibv_wc_status) -> sys::ibv_wc {
        // SAFETY: plain data; all-zero valid.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        wc.wr_id = rc_wr_id(KIND_RC_SEND, 0, Lane::Rma, seq);
        wc.status = status;
        wc.qp_num = 9;
        wc
    }

    fn fail(_: OpKind) -> Error {
        Error::PeerUnreachable("test".into())
    }

    fn tokens(events: &[Event]) -> Vec<(u64, bool)> {
        events
            .iter()
            .map(|e| match e {
                Event::Done { token } => (*token, true),
                Event::Failed { token, .. } => (*token, false),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// A queue pair moved to ERR with 20 work requests on it (every 16th
    /// signalled): what completed before comes back done, the first flushed
    /// one failed, the rest flushed; their own flush completions are then
    /// absorbed, and nothing is reported twice.
    #[test]
    fn completions_of_a_retiring_queue_pair_retire_each_token_once() {
        let mut q = qp(64);
        for t in 0..20 {
            q.ring.push(Entry { token: t, kind: OpKind::Write });
        }
        let mut events = Vec::new();
        let a = account(&mut q, &wc(15, sys::ibv_wc_status_IBV_WC_SUCCESS), fail, &mut events);
        assert_eq!((a.retired, a.failed), (16, false));
        let a = account(&mut q, &wc(16, sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR), fail, &mut events);
        assert_eq!((a.retired, a.flushed, a.failed), (4, 3, true));
        assert_eq!(q.flush_pending, 3);
        for seq in 17..20 {
            let a = account(&mut q, &wc(seq, sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR), fail, &mut events);
            assert_eq!((a.retired, a.flush_seen), (0, 1));
        }
        assert_eq!(q.flush_pending, 0);
        // A stray duplicate changes nothing.
        let a = account(&mut q, &wc(19, sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR), fail, &mut events);
        assert_eq!((a.retired, a.flush_seen), (0, 0));
        let expected: Vec<(u64, bool)> = (0..20).map(|t| (t, t < 16)).collect();
        assert_eq!(tokens(&events), expected);
    }
}
