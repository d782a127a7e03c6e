//! One verbs NIC: its resources, connections to peers, and the data path.
//!
//! # Connections
//! RC queue pairs are created on first use of a peer NIC. The initiator
//! creates its queue pair (INIT) and sends a handshake request over UD with
//! its QPN, first PSN and generation; the target creates (or reuses) its own
//! queue pair for that peer, moves it to RTR/RTS against the initiator's,
//! and replies with its own; the initiator moves to RTR/RTS on the reply.
//! Requests to a peer whose connection is not ready are refused as busy, so
//! the engine queues them; the request is resent after 50 ms, doubling up
//! to 1 s, until [`VerbsConfig::connect_timeout`] passes, when the waiting
//! requests fail with `PeerUnreachable`.
//!
//! Both sides may start at once: each has one queue pair per peer and
//! connects it to the other's from whichever message arrives first. Every
//! new queue pair gets a higher generation; a message about an older
//! generation than the last one seen from that peer is ignored, so late or
//! duplicated datagrams cannot tear down a working connection.
//!
//! # Failures
//! A work request that completes in error takes its queue pair to the
//! error state: that request fails with the mapped error (retry exceeded:
//! `PeerUnreachable`; remote access: `RemoteAccess`), every later one on
//! that queue pair fails as flushed, and the connection is rebuilt (new
//! queue pair, new handshake) on the next request to that peer. A peer that
//! announces a newer queue pair (it rebuilt, or restarted on the same
//! address) replaces ours: operations outstanding on the old one fail.
//! Other peers are never affected.

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::ptr;
use std::time::{Duration, Instant};

use verbs_sys as sys;

use super::config::{mtu_code, VerbsConfig};
use super::conn::{End, Link, Phase};
use super::device::{errno, unavailable, verbs_error, Context};
use super::gid::select_gid;
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
const KIND_SHIFT: u32 = 60;
const KIND_RC_SEND: u64 = 0;
const KIND_UD_SEND: u64 = 1;
const KIND_UD_RECV: u64 = 2;

/// UD handshake buffers: receives carry a 40-byte GRH before the payload.
const GRH: usize = 40;
const UD_SLOT: usize = 256;
const UD_RECVS: usize = 32;
const UD_SENDS: usize = 16;

const CQ_BATCH: usize = 32;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// After a handshake timed out, requests to that peer fail at once for
/// this long before a new handshake is tried.
const FAILED_HOLD: Duration = Duration::from_secs(1);

struct Peer {
    addr: NicAddr,
    ah: *mut sys::ibv_ah,
    qp: *mut sys::ibv_qp,
    /// The handshake state (see `conn.rs`); `link.local` describes `qp`.
    link: Link,
    ring: SendRing,
    /// Work requests retired as flushed whose flush completions the device
    /// has still to deliver (they count against the CQ's room until then).
    flush_pending: usize,
}

/// The UD queue pair and its buffers.
struct Ud {
    qp: *mut sys::ibv_qp,
    mr: *mut sys::ibv_mr,
    buf: Box<[u8]>,
    send_free: Vec<usize>,
}

/// Limits read from the device and the queue pairs it created.
#[derive(Clone, Copy, Debug)]
struct Caps {
    rd_atomic: u8,
    max_msg: u64,
    max_inline: u32,
    send_depth: u32,
    /// Send work requests the CQ can absorb across all queue pairs.
    cq_budget: usize,
    relaxed: bool,
}

/// One verbs NIC: see the module docs.
pub(crate) struct VerbsNic {
    // Peers, the UD queue pair, SRQ, CQ, channel and PD are destroyed in
    // `Drop` in that order, then the context (the last field).
    peers: Vec<Peer>,
    by_addr: HashMap<NicAddr, usize>,
    ud: Ud,
    srq: *mut sys::ibv_srq,
    cq: *mut sys::ibv_cq,
    channel: *mut sys::ibv_comp_channel,
    pd: *mut sys::ibv_pd,
    local: NicAddr,
    address: Box<[u8]>,
    config: VerbsConfig,
    caps: Caps,
    mtu_bound: Option<u8>,
    next_generation: u32,
    chain: Chain,
    deferred: Vec<Event>,
    wcs: Box<[sys::ibv_wc; CQ_BATCH]>,
    /// Completions polled by `ready_to_sleep`, handled by the next `poll`.
    stashed: usize,
    outstanding: usize,
    /// Sum of the peers' `flush_pending`.
    flush_pending: usize,
    connecting: usize,
    /// A connection became ready: requests waiting on it can go now.
    woke: bool,
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
    pub(crate) fn open(
        lib: &'static sys::Library,
        device: *mut sys::ibv_device,
        options: &VerbsOptions,
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

        let rx_slots = options.rx_slots.min(dev.max_srq_wr.max(1) as usize);
        let cqe = (dev.max_cqe.max(256) as usize).min(1 << 16);
        let cq_budget = cqe.saturating_sub(rx_slots + UD_RECVS + UD_SENDS + 64).max(64);
        let caps = Caps {
            rd_atomic: dev.max_qp_rd_atom.min(dev.max_qp_init_rd_atom).clamp(1, 16) as u8,
            max_msg: u64::from(port_attr.max_msg_sz).max(1),
            max_inline: 0,
            send_depth: config.send_queue_depth.min(dev.max_qp_wr.max(16) as u32),
            cq_budget,
            relaxed: config.relaxed_ordering && lib.ibv_reg_mr_iova2.is_some(),
        };

        let mut nic = VerbsNic {
            peers: Vec::new(),
            by_addr: HashMap::new(),
            ud: Ud { qp: ptr::null_mut(), mr: ptr::null_mut(), buf: Box::new([]), send_free: Vec::new() },
            srq: ptr::null_mut(),
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
            chain: Chain::new(),
            deferred: Vec::with_capacity(64),
            // SAFETY: ibv_wc is plain data; all-zero valid.
            wcs: Box::new(unsafe { std::mem::zeroed() }),
            stashed: 0,
            outstanding: 0,
            flush_pending: 0,
            connecting: 0,
            woke: false,
            ctx,
        };
        // From here on, a failure drops `nic`, which releases whatever was
        // created so far (every field starts null).
        nic.create_queues(options.wait_fd, cqe, rx_slots)?;
        nic.create_ud()?;
        nic.address = nic.local.to_bytes().into();
        tracing::info!(device = %nic.ctx.name, local = ?nic.local, caps = ?nic.caps, "verbs NIC open");
        Ok(nic)
    }

    fn lib(&self) -> &'static sys::Library {
        self.ctx.lib
    }

    fn create_queues(&mut self, wait_fd: bool, cqe: usize, rx_slots: usize) -> Result<()> {
        let lib = self.lib();
        // SAFETY: each call gets the live context/PD created just before;
        // results are stored at once so that Drop releases them.
        unsafe {
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
            self.cq = (lib.ibv_create_cq)(self.ctx.ptr, cqe as i32, ptr::null_mut(), self.channel, 0);
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
        }
        Ok(())
    }

    fn create_qp(&mut self, kind: sys::ibv_qp_type, depth: u32, inline: u32) -> Result<(*mut sys::ibv_qp, u32)> {
        // SAFETY: plain data; all-zero valid.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = self.cq;
        init.recv_cq = self.cq;
        init.qp_type = kind;
        init.cap.max_send_wr = depth;
        init.cap.max_send_sge = 1;
        init.cap.max_inline_data = inline;
        if kind == sys::ibv_qp_type_IBV_QPT_RC {
            init.srq = self.srq;
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
        // SAFETY: qp is live and destroyed once; its CQ outlives it.
        let rc = unsafe { (self.lib().ibv_destroy_qp)(qp) };
        if rc != 0 {
            tracing::warn!(error = %verbs_error("ibv_destroy_qp", rc), "destroying a queue pair failed");
        }
    }

    fn create_ud(&mut self) -> Result<()> {
        let (qp, _) = self.create_qp(sys::ibv_qp_type_IBV_QPT_UD, UD_SENDS as u32, 0)?;
        self.ud.qp = qp;
        for step in qp::ud_steps(self.local.port, random_u32() & 0xff_ffff) {
            self.modify(qp, step, "ibv_modify_qp(UD)")?;
        }
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
        self.ud.send_free = (UD_RECVS..UD_RECVS + UD_SENDS).collect();
        for slot in 0..UD_RECVS {
            self.post_ud_recv(slot)?;
        }
        Ok(())
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
        wr.wr_id = INTERNAL | KIND_UD_RECV << KIND_SHIFT | slot as u64;
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
        let Some(local) = p.link.local else { return self.ud.send_free.push(slot) };
        let message = Handshake {
            kind,
            from: self.local,
            to_nonce: p.addr.nonce,
            qpn: local.qpn,
            psn: local.psn,
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
        wr.wr_id = INTERNAL | KIND_UD_SEND << KIND_SHIFT | slot as u64;
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
            qp: ptr::null_mut(),
            link: Link::new(),
            ring: SendRing::new(self.caps.send_depth as usize),
            flush_pending: 0,
        });
        self.by_addr.insert(addr, self.peers.len() - 1);
        self.peers.len() - 1
    }

    /// Gives `peer` a fresh queue pair in INIT, failing whatever was
    /// outstanding on the old one.
    fn fresh_qp(&mut self, peer: usize, why: &str) -> Result<()> {
        if self.chain.peer == peer {
            self.flush();
        }
        let old = std::mem::replace(&mut self.peers[peer].qp, ptr::null_mut());
        if !old.is_null() {
            self.fail_outstanding(peer, why);
            // Destroying the queue pair removes its completions from the CQ.
            self.flush_pending -= std::mem::take(&mut self.peers[peer].flush_pending);
            self.destroy_qp(old);
            self.peers[peer].link.forget_local();
        }
        let (qp, inline) = self.create_qp(sys::ibv_qp_type_IBV_QPT_RC, self.caps.send_depth, self.config.max_inline)?;
        self.caps.max_inline = inline;
        if let Err(e) = self.modify(qp, qp::rc_init(self.local.port), "ibv_modify_qp(INIT)") {
            self.destroy_qp(qp);
            return Err(e);
        }
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let p = &mut self.peers[peer];
        p.qp = qp;
        // SAFETY: qp is live.
        let qpn = unsafe { (*qp).qp_num };
        p.link.replaced(End { qpn, psn: random_u32() & 0xff_ffff, generation: self.next_generation });
        Ok(())
    }

    fn fail_outstanding(&mut self, peer: usize, why: &str) {
        let p = &mut self.peers[peer];
        let deferred = &mut self.deferred;
        let mut n = 0;
        p.ring.drain(|e| {
            n += 1;
            deferred.push(Event::Failed { token: e.token, error: Error::PeerUnreachable(why.to_string()) });
        });
        self.outstanding -= n;
    }

    /// Starts (or restarts) the handshake with `peer`.
    fn connect(&mut self, peer: usize) -> Result<()> {
        self.fresh_qp(peer, "the connection was re-established; operations on the old one were lost")?;
        let now = Instant::now();
        self.set_phase(peer, Phase::Connecting { started: now, last_sent: now, retry_after: RETRY_FIRST });
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

    /// Moves our queue pair for `peer` to RTS against `remote`.
    fn establish(&mut self, peer: usize, remote: End) -> Result<()> {
        let p = &self.peers[peer];
        let Some(local) = p.link.local.filter(|_| !p.qp.is_null()) else {
            return Err(Error::InvalidRequest("no queue pair to connect".into()));
        };
        let mtu = qp::path_mtu(self.local.mtu, p.addr.mtu, self.mtu_bound);
        let path = qp::path_to(&p.addr, self.local.port, self.local.gid_index, self.local.roce, &self.config);
        let qp_ptr = p.qp;
        let rtr = qp::rc_rtr(path, mtu, remote.qpn, remote.psn, self.caps.rd_atomic, &self.config);
        self.modify(qp_ptr, rtr, "ibv_modify_qp(RTR)")?;
        self.modify(qp_ptr, qp::rc_rts(local.psn, self.caps.rd_atomic, &self.config), "ibv_modify_qp(RTS)")?;
        let was = self.peers[peer].link.is_connecting();
        self.peers[peer].link.connected(remote);
        self.connecting -= usize::from(was);
        self.woke = true;
        tracing::debug!(peer = ?self.peers[peer].addr, remote_qpn = remote.qpn, mtu, "connected");
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
                self.on_request(peer, remote)
            }
            HandshakeKind::Reply => match self.by_addr.get(&m.from) {
                Some(&peer) if self.peers[peer].link.on_reply(remote, m.echo_generation, m.echo_qpn) => {
                    self.establish(peer, remote)
                }
                _ => Ok(()), // stale, or already connected by the peer's request
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, peer = ?m.from, "connection setup failed");
            if let Some(&peer) = self.by_addr.get(&m.from) {
                self.set_phase(peer, Phase::Broken);
            }
        }
    }

    fn on_request(&mut self, peer: usize, remote: End) -> Result<()> {
        let decision = self.peers[peer].link.on_request(remote);
        if decision.replace {
            self.fresh_qp(peer, "the peer re-established the connection; operations on the old one were lost")?;
        }
        if decision.connect {
            self.establish(peer, remote)?;
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
                self.set_phase(peer, Phase::Failed { until: now + FAILED_HOLD });
            } else if now.duration_since(last_sent) >= retry_after {
                let next = (retry_after * 2).min(RETRY_MAX);
                self.peers[peer].link.phase = Phase::Connecting { started, last_sent: now, retry_after: next };
                self.send_handshake(peer, HandshakeKind::Request, None);
            }
        }
    }

    /// Posts the staged chain. Work requests the device refuses fail.
    fn flush(&mut self) {
        if self.chain.len == 0 {
            return;
        }
        let peer = self.chain.peer;
        let qp = self.peers[peer].qp;
        let head = self.chain.seal();
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live (it is replaced only after a flush); the
        // chain's work requests point at registered memory that the engine
        // keeps alive until their completions.
        let rc = unsafe { sys::ops::ibv_post_send(qp, head, &mut bad) };
        if rc != 0 {
            let refused = if bad.is_null() { self.chain.len } else { self.chain.len - self.chain.index_of(bad) };
            let error = verbs_error("ibv_post_send", rc);
            tracing::warn!(%error, refused, "work requests refused");
            let deferred = &mut self.deferred;
            self.peers[peer].ring.unpush(refused, |e| {
                deferred.push(Event::Failed { token: e.token, error: error.clone() });
            });
            self.outstanding -= refused;
        }
        self.chain.clear();
    }

    fn on_completion(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        if wc.wr_id & INTERNAL == 0 {
            return self.on_receive(wc, events);
        }
        let index = (wc.wr_id & 0xffff_ffff) as usize;
        match (wc.wr_id >> KIND_SHIFT) & 3 {
            KIND_RC_SEND => self.on_send_completion(wc, events),
            KIND_UD_SEND => {
                if wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS {
                    tracing::debug!(status = %self.lib().status_str(wc.status), "handshake send failed");
                }
                self.ud.send_free.push(index);
            }
            _ => {
                if wc.status == sys::ibv_wc_status_IBV_WC_SUCCESS {
                    let len = (wc.byte_len as usize).min(UD_SLOT);
                    let bytes = &self.ud.buf[index * UD_SLOT..index * UD_SLOT + len];
                    match bytes.get(GRH..).map(Handshake::decode) {
                        Some(Ok(m)) => self.on_handshake(m),
                        Some(Err(why)) => tracing::debug!(?why, "ignoring a malformed handshake"),
                        None => {}
                    }
                }
                if let Err(e) = self.post_ud_recv(index) {
                    tracing::error!(error = %e, "reposting a handshake buffer failed");
                }
            }
        }
    }

    fn on_receive(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        let token = wc.wr_id;
        if wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS {
            let error = self.completion_error(wc, "recv");
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

    fn on_send_completion(&mut self, wc: &sys::ibv_wc, events: &mut Vec<Event>) {
        let peer = ((wc.wr_id >> 40) & 0xf_ffff) as usize;
        let generation = ((wc.wr_id >> 32) & 0xff) as u32;
        let Some(p) = self.peers.get_mut(peer) else { return };
        if p.qp.is_null() || p.link.local.is_none_or(|l| l.generation & 0xff != generation) {
            return; // from a queue pair already destroyed (its work failed then)
        }
        let Some(seq) = p.ring.resolve(wc.wr_id as u32) else {
            // A flush completion of a work request already failed.
            if p.flush_pending > 0 {
                p.flush_pending -= 1;
                self.flush_pending -= 1;
            }
            return;
        };
        if wc.status != sys::ibv_wc_status_IBV_WC_SUCCESS && self.chain.peer == peer {
            self.flush(); // every ring entry is then on the device
        }
        let mut retired = 0;
        if wc.status == sys::ibv_wc_status_IBV_WC_SUCCESS {
            self.peers[peer].ring.complete_through(seq, |e| {
                retired += 1;
                events.push(Event::Done { token: e.token });
            });
        } else {
            let kind = self.peers[peer].ring.kind_at(seq);
            let error = self.completion_error(wc, op_name(kind));
            tracing::debug!(%error, peer = ?self.peers[peer].addr, "work request failed; the connection will be rebuilt");
            let mut flushed_count = 0;
            let flushed = Error::Transport {
                op: op_name(kind),
                code: sys::ibv_wc_status_IBV_WC_WR_FLUSH_ERR as i32,
                prov_errno: 0,
                message: format!("flushed: an earlier work request to this peer failed ({error})"),
            };
            self.peers[peer].ring.fail_from(seq, |e, how| {
                retired += 1;
                events.push(match how {
                    Retired::Done => Event::Done { token: e.token },
                    Retired::Failed => Event::Failed { token: e.token, error: error.clone() },
                    Retired::Flushed => {
                        flushed_count += 1;
                        Event::Failed { token: e.token, error: flushed.clone() }
                    }
                });
            });
            self.peers[peer].flush_pending += flushed_count;
            self.flush_pending += flushed_count;
            self.set_phase(peer, Phase::Broken);
        }
        self.outstanding -= retired;
    }

    fn completion_error(&self, wc: &sys::ibv_wc, op: &'static str) -> Error {
        let message = self.lib().status_str(wc.status);
        let detail = || format!("{op}: {message} (vendor error {:#x})", wc.vendor_err);
        match wc.status {
            sys::ibv_wc_status_IBV_WC_RETRY_EXC_ERR | sys::ibv_wc_status_IBV_WC_RNR_RETRY_EXC_ERR => {
                Error::PeerUnreachable(detail())
            }
            sys::ibv_wc_status_IBV_WC_REM_ACCESS_ERR => Error::RemoteAccess(detail()),
            status => Error::Transport { op, code: status as i32, prov_errno: wc.vendor_err as i32, message },
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
        let mut flags = sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE;
        if access.remote_write {
            flags |= sys::ibv_access_flags_IBV_ACCESS_REMOTE_WRITE;
        }
        if access.remote_read {
            flags |= sys::ibv_access_flags_IBV_ACCESS_REMOTE_READ;
        }
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
        if self.peers[peer].ring.free() == 0 || self.outstanding + self.flush_pending >= self.caps.cq_budget {
            self.flush();
            return Ok(Posted::Busy);
        }
        if self.chain.len > 0 && self.chain.peer != peer {
            self.flush();
        }
        let p = &mut self.peers[peer];
        let (seq, signaled) = p.ring.push(Entry { token: op.token, kind: op.kind });
        let wr_id = INTERNAL
            | KIND_RC_SEND << KIND_SHIFT
            | (peer as u64 & 0xf_ffff) << 40
            | u64::from(p.link.local.map_or(0, |l| l.generation) & 0xff) << 32
            | (seq & 0xffff_ffff);
        let inline = op.len <= u64::from(self.caps.max_inline);
        self.chain.peer = peer;
        self.chain.push(op, WrSpec { wr_id, signaled, inline, lkey: sendq::lkey_of(op.local_desc) });
        self.outstanding += 1;
        if self.chain.is_full() {
            self.flush();
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

    fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        let before = events.len();
        self.flush();
        events.append(&mut self.deferred);
        if self.connecting > 0 {
            self.drive_handshakes();
        }
        let mut n = std::mem::take(&mut self.stashed);
        loop {
            if n == 0 {
                n = self.poll_cq();
                if n == 0 {
                    break;
                }
            }
            for i in 0..n {
                let wc = self.wcs[i];
                self.on_completion(&wc, events);
            }
            if n < CQ_BATCH {
                break;
            }
            n = 0;
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
        // before the CQ, SRQ and PD; the PD before the context, which is
        // closed when the `ctx` field drops after this).
        unsafe {
            for p in std::mem::take(&mut self.peers) {
                if !p.qp.is_null() {
                    (lib.ibv_destroy_qp)(p.qp);
                }
                if !p.ah.is_null() {
                    (lib.ibv_destroy_ah)(p.ah);
                }
            }
            if !self.ud.qp.is_null() {
                (lib.ibv_destroy_qp)(self.ud.qp);
            }
            if !self.ud.mr.is_null() {
                (lib.ibv_dereg_mr)(self.ud.mr);
            }
            if !self.srq.is_null() {
                (lib.ibv_destroy_srq)(self.srq);
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
