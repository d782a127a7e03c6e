//! Plain libfabric without the engine: what `strait-bench --baseline raw`
//! runs to show the engine's overhead. Only with the `raw-baseline` feature.
//!
//! A [`RawGroup`] opens its endpoints exactly as the engine does (same
//! `fi_getinfo` selection, same CQ and AV set-up, same flags on every write:
//! `FI_DELIVERY_COMPLETE`, and `FI_REMOTE_CQ_DATA` with an immediate) and
//! then leaves everything else to the caller, on the caller's thread: no
//! worker, no queues, no planner, no sharding, no completion objects. Each
//! post is one `fi_writemsg`/`fi_readmsg`/`fi_sendmsg`/`fi_recvmsg` call and
//! [`RawGroup::poll`] is `fi_cq_read` on every endpoint. The caller picks
//! the endpoint of every operation and must keep polling (the providers
//! here progress only inside `fi_cq_read`).
//!
//! Not handled, because the baseline does not need it: providers that
//! consume receive buffers for immediates (`FI_RX_CQ_DATA`, some EFA
//! set-ups). Immediates then arrive as [`RawEvent::Received`].

use std::time::Duration;

use crate::address::EngineAddress;
use crate::backend::fabric::{self, FabricNic, FabricOptions};
use crate::backend::{Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::{check_range, Access, MrDesc};
use crate::engine::AlignedBuf;
use crate::error::{Error, Result};
use crate::provider::{Provider, ProviderKind};

/// A registered buffer of a [`RawGroup`], by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRegion(usize);

/// A peer group inserted into every endpoint, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawPeer(usize);

/// What [`RawGroup::poll`] reports.
#[derive(Debug)]
pub enum RawEvent {
    /// The operation posted with this token completed.
    Done(u64),
    /// The operation posted with this token failed.
    Failed(u64, Error),
    /// A peer's write delivered this immediate.
    Imm(u32),
    /// The receive posted with this token got a message of `len` bytes (or,
    /// with `imm`, an immediate on a provider that consumes receives).
    Received {
        /// The receive's token.
        token: u64,
        /// Bytes received.
        len: usize,
        /// The immediate, if it was one.
        imm: Option<u32>,
    },
}

struct Registered {
    memory: AlignedBuf,
    len: u64,
    nic: Vec<NicRegion>,
    desc: MrDesc,
}

/// Endpoints opened like the engine's, driven directly: see the module docs.
pub struct RawGroup {
    nics: Vec<FabricNic>,
    address: EngineAddress,
    regions: Vec<Registered>,
    /// Per peer, the fabric address of the peer's NIC `n % count` in
    /// local endpoint `n`'s AV.
    peers: Vec<Vec<u64>>,
    events: Vec<Event>,
    pollfds: Vec<libc::pollfd>,
}

impl std::fmt::Debug for RawGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawGroup").field("address", &self.address).finish_non_exhaustive()
    }
}

impl RawGroup {
    /// Opens `nics` endpoints of `provider` (restricted to `interface` for
    /// tcp, as [`EngineBuilder::interface`](crate::EngineBuilder::interface)),
    /// with `receives` receive slots each. With `wait_fd`, CQs get a wait
    /// descriptor for [`RawGroup::sleep`], as the engine's adaptive mode.
    pub fn open(
        provider: Provider,
        interface: Option<&str>,
        nics: usize,
        receives: usize,
        wait_fd: bool,
    ) -> Result<Self> {
        if nics == 0 || nics > crate::wire::MAX_NICS {
            return Err(Error::InvalidRequest(format!("nics must be in 1..={}", crate::wire::MAX_NICS)));
        }
        // The same interface list as the engine's builder takes.
        let options = FabricOptions::new(provider, interface, wait_fd, receives);
        let (kind, nics): (ProviderKind, Vec<FabricNic>) = fabric::open_group(&options, nics)?;
        let address = EngineAddress::new(kind, nics.iter().map(|n| n.address().into()).collect());
        let pollfds = nics
            .iter()
            .filter_map(|n| n.wait_fd())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        Ok(RawGroup { nics, address, regions: Vec::new(), peers: Vec::new(), events: Vec::with_capacity(256), pollfds })
    }

    /// The group's address, in the engine's format.
    pub fn address(&self) -> &EngineAddress {
        &self.address
    }

    /// Number of endpoints.
    pub fn nic_count(&self) -> usize {
        self.nics.len()
    }

    /// Allocates `len` zeroed bytes and registers them with every endpoint.
    pub fn alloc(&mut self, len: u64, access: Access) -> Result<RawRegion> {
        let memory = AlignedBuf::zeroed(len)?;
        let mut nic = Vec::with_capacity(self.nics.len());
        for n in &mut self.nics {
            // SAFETY: the memory lives in self.regions until Drop, which
            // deregisters it first.
            match unsafe { n.register(memory.as_ptr(), len, access) } {
                Ok(r) => nic.push(r),
                Err(e) => {
                    for (n, r) in self.nics.iter_mut().zip(nic) {
                        n.deregister(r);
                    }
                    return Err(e);
                }
            }
        }
        let base = if self.nics[0].virtual_addresses() { memory.as_ptr() as u64 } else { 0 };
        let desc = MrDesc::new(self.address.clone(), base, len, access, nic.iter().map(|r| r.key).collect());
        self.regions.push(Registered { memory, len, nic, desc });
        Ok(RawRegion(self.regions.len() - 1))
    }

    /// The descriptor peers use to reach a region.
    pub fn descriptor(&self, region: RawRegion) -> &MrDesc {
        &self.regions[region.0].desc
    }

    /// The bytes of a region. Transfers may be writing them.
    pub fn bytes(&self, region: RawRegion) -> &[u8] {
        let r = &self.regions[region.0];
        // SAFETY: the allocation is r.len bytes, alive as long as self.
        unsafe { std::slice::from_raw_parts(r.memory.as_ptr(), r.len as usize) }
    }

    /// The bytes of a region, to fill before sending them.
    pub fn bytes_mut(&mut self, region: RawRegion) -> &mut [u8] {
        let r = &self.regions[region.0];
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(r.memory.as_ptr(), r.len as usize) }
    }

    /// Inserts a peer's addresses: local endpoint `n` talks to the peer's
    /// endpoint `n % peer_nics`.
    pub fn connect(&mut self, peer: &EngineAddress) -> Result<RawPeer> {
        if peer.provider() != self.address.provider() {
            return Err(Error::InvalidRequest(format!("peer runs on {}", peer.provider())));
        }
        let addrs = (0..self.nics.len())
            .map(|n| self.nics[n].insert_peer(peer.nic(n % peer.nic_count())))
            .collect::<Result<Vec<_>>>()?;
        self.peers.push(addrs);
        Ok(RawPeer(self.peers.len() - 1))
    }

    /// Posts a write of `len` bytes at `offset` of `src` through endpoint
    /// `nic` to `dst` at `dst_offset` (on the peer's endpoint that `nic`
    /// talks to), with an optional immediate. Returns false when the
    /// endpoint is busy: poll and post again.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write(
        &mut self,
        nic: usize,
        peer: RawPeer,
        src: RawRegion,
        offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<bool> {
        self.post_rma(OpKind::Write, nic, peer, src, offset, dst, dst_offset, len, imm, token)
    }

    /// Posts a read of `len` bytes of `src` at `src_offset` into `dst` at
    /// `offset`. Returns false when the endpoint is busy.
    #[allow(clippy::too_many_arguments)]
    pub fn post_read(
        &mut self,
        nic: usize,
        peer: RawPeer,
        dst: RawRegion,
        offset: u64,
        src: &MrDesc,
        src_offset: u64,
        len: u64,
        token: u64,
    ) -> Result<bool> {
        self.post_rma(OpKind::Read, nic, peer, dst, offset, src, src_offset, len, None, token)
    }

    #[allow(clippy::too_many_arguments)]
    fn post_rma(
        &mut self,
        kind: OpKind,
        nic: usize,
        peer: RawPeer,
        local: RawRegion,
        offset: u64,
        remote: &MrDesc,
        remote_offset: u64,
        len: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<bool> {
        remote.check_range(remote_offset, len)?;
        let remote_nic = nic % remote.owner().nic_count();
        let op = Op {
            remote_addr: remote.remote_addr(remote_offset),
            key: remote.key(remote_nic),
            imm,
            delivery_complete: kind == OpKind::Write,
            ..self.local_op(kind, nic, peer, local, offset, len, token)?
        };
        // SAFETY: the local range was checked and stays registered while
        // self lives; the remote range was checked against its descriptor.
        Ok(unsafe { self.nics[nic].post(&op)? } == Posted::Accepted)
    }

    /// Posts a send of `len` bytes of `src` at `offset`. Returns false when
    /// the endpoint is busy.
    pub fn post_send(
        &mut self,
        nic: usize,
        peer: RawPeer,
        src: RawRegion,
        offset: u64,
        len: u64,
        token: u64,
    ) -> Result<bool> {
        let op = self.local_op(OpKind::Send, nic, peer, src, offset, len, token)?;
        // SAFETY: as in post_rma.
        Ok(unsafe { self.nics[nic].post(&op)? } == Posted::Accepted)
    }

    /// Posts a receive buffer of `len` bytes of `dst` at `offset`.
    pub fn post_recv(&mut self, nic: usize, dst: RawRegion, offset: u64, len: u64, token: u64) -> Result<bool> {
        let r = &self.regions[dst.0];
        check_range("receive buffer", offset, len, r.len)?;
        // SAFETY: in range (checked), registered while self lives.
        let buf = unsafe { r.memory.as_ptr().add(offset as usize) };
        let desc = r.nic[nic].desc;
        // SAFETY: as above.
        Ok(unsafe { self.nics[nic].post_recv(buf, len as usize, desc, token)? } == Posted::Accepted)
    }

    #[allow(clippy::too_many_arguments)]
    fn local_op(
        &self,
        kind: OpKind,
        nic: usize,
        peer: RawPeer,
        local: RawRegion,
        offset: u64,
        len: u64,
        token: u64,
    ) -> Result<Op> {
        let r = &self.regions[local.0];
        check_range("local buffer", offset, len, r.len)?;
        Ok(Op {
            kind,
            // SAFETY: offset + len lies inside the allocation (checked).
            local: unsafe { r.memory.as_ptr().add(offset as usize) },
            len,
            local_desc: r.nic[nic].desc,
            peer: self.peers[peer.0][nic],
            remote_addr: 0,
            key: 0,
            imm: None,
            delivery_complete: false,
            host_memory: true,
            rows: crate::plan::Rows::ONE,
            token,
        })
    }

    /// Reads every endpoint's completions into `out`; returns how many.
    pub fn poll(&mut self, out: &mut Vec<RawEvent>) -> usize {
        let before = out.len();
        for nic in &mut self.nics {
            nic.poll(&mut self.events);
        }
        out.extend(self.events.drain(..).map(|e| match e {
            Event::Done { token } => RawEvent::Done(token),
            Event::Failed { token, error } | Event::ReceiveFailed { token, error } => RawEvent::Failed(token, error),
            Event::Imm { value } => RawEvent::Imm(value),
            Event::Received { token, len, imm, .. } => RawEvent::Received { token, len, imm },
        }));
        out.len() - before
    }

    /// Sleeps until a completion may be ready, as the engine's adaptive
    /// worker does: on the CQs' wait descriptors when every endpoint has one
    /// (after `fi_trywait`; at most 10 ms, like the engine), else a plain
    /// nap of `nap` (providers without descriptors need progress calls).
    pub fn sleep(&mut self, nap: Duration) {
        if self.pollfds.len() == self.nics.len() {
            if !self.nics.iter_mut().all(|n| n.ready_to_sleep()) {
                return;
            }
            // SAFETY: pollfds is a live array of len pollfd structs.
            unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as libc::nfds_t, 10) };
        } else {
            std::thread::sleep(nap);
        }
    }
}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // Registrations close before their domains; memory is freed only
        // once the endpoints are closed, so nothing still posted (a receive)
        // can land in freed memory.
        let mut memory = Vec::with_capacity(self.regions.len());
        for r in self.regions.drain(..) {
            for (n, nr) in self.nics.iter_mut().zip(&r.nic) {
                n.deregister(*nr);
            }
            memory.push(r.memory);
        }
        drop(std::mem::take(&mut self.nics));
        drop(memory);
    }
}
