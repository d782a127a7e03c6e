//! A test double of the backend (tests only, never a transport): NICs that
//! complete operations late, in random order, sometimes fail them, refuse
//! posts now and then, and can be killed. It also checks the engine's side
//! of the immediate contract: an operation carrying an immediate must not be
//! posted while another operation of the same request is still in flight.
//!
//! Writes loop back: a completed write with an immediate delivers it to the
//! same NIC's `poll`, as the peer's engine would see it. A write to a region
//! registered on the same NIC copies its bytes when it completes (not when
//! it is posted: its bytes land late, as on a network), and a send lands in
//! a receive buffer posted on the same NIC, so protocols built on the
//! engine (the KV primitive's control messages) run on the double too.

use std::ffi::c_void;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::null::NullNic;
use super::{Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::Access;
use crate::error::{Error, Result};

/// Knobs and observations shared with the test.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Operations failed, per thousand.
    pub fail_per_mille: u64,
    /// Once set, every pending and later operation fails.
    pub killed: AtomicBool,
    /// Immediates posted while their request still had operations in
    /// flight: must stay 0.
    pub violations: AtomicU64,
    /// Writes whose bytes have landed (copied at completion).
    pub landed: AtomicU64,
    /// Report [`Nic::needs_introduction`], as EFA's efa-direct does.
    pub introduction: bool,
    /// Behave like efa-direct: an RMA target must know the initiator. The
    /// double learns it when it delivers the engine's hello (a target
    /// inserts the initiator when it takes one); a write or read posted
    /// before that fails as efa-direct's would, and is counted in
    /// `unknown_peer`.
    pub require_introduction: bool,
    /// Writes and reads posted before the target knew the initiator: must
    /// stay 0.
    pub unknown_peer: AtomicU64,
    /// A hello was delivered (through any NIC: the target inserts the
    /// initiator on all of its NICs).
    pub known: AtomicBool,
    /// The longest send ([`Nic::max_message`]); 0: unlimited.
    pub max_message: u64,
    /// Receive pools deregistered, and how many of them while the NIC's
    /// endpoints were still open ([`Nic::close_endpoints`] not yet called)
    /// or with anything posted after the close: must stay 0.
    pub pools_released: AtomicU64,
    pub teardown_violations: AtomicU64,
    /// Report [`Nic::device_memory`] (GPUDirect), and count the device
    /// registrations and the posts from or into memory that is not host
    /// memory (`Op::host_memory` false).
    pub device_memory: bool,
    pub device_registrations: AtomicU64,
    pub device_posts: AtomicU64,
}

struct Pending {
    token: u64,
    imm: Option<u32>,
    fail: bool,
    /// A write: (source, destination, bytes), copied when it completes.
    copy: Option<(usize, usize, usize)>,
    /// A send: its bytes, delivered into a posted receive buffer with its
    /// immediate (the engine's control messages carry one).
    message: Option<(Vec<u8>, Option<u32>)>,
}

pub(crate) struct FaultNic {
    /// Address, keys and peers: as the null backend's.
    base: NullNic,
    rng: u64,
    faults: Arc<Faults>,
    pending: Vec<Pending>,
    in_flight: std::collections::HashMap<u64, u32>,
    /// Registered regions by key: (address, length).
    regions: std::collections::HashMap<u64, (usize, u64)>,
    /// Posted receive buffers: (address, length, token).
    receives: std::collections::VecDeque<(usize, usize, u64)>,
    /// The receive pool's key, and whether the endpoints were closed.
    pool_key: Option<u64>,
    closed: bool,
}

impl FaultNic {
    pub(crate) fn new(seed: u64, faults: Arc<Faults>) -> Self {
        FaultNic {
            base: NullNic::new(),
            rng: seed | 1,
            faults,
            pending: Vec::new(),
            in_flight: Default::default(),
            regions: Default::default(),
            receives: Default::default(),
            pool_key: None,
            closed: false,
        }
    }

    /// xorshift64: deterministic per seed.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl Nic for FaultNic {
    fn address(&self) -> &[u8] {
        self.base.address()
    }

    fn virtual_addresses(&self) -> bool {
        self.base.virtual_addresses()
    }

    unsafe fn register(&mut self, addr: *mut u8, len: u64, access: Access) -> Result<NicRegion> {
        // SAFETY: forwarded with the caller's guarantees; the null NIC
        // touches no memory.
        let region = unsafe { self.base.register(addr, len, access) }?;
        self.regions.insert(region.key, (addr as usize, len));
        Ok(region)
    }

    fn device_memory(&self) -> bool {
        self.faults.device_memory
    }

    unsafe fn register_device(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        _gpu: u32,
        _dmabuf: Option<(i32, u64)>,
    ) -> Result<NicRegion> {
        self.faults.device_registrations.fetch_add(1, Ordering::SeqCst);
        // The tests' "device memory" is host memory (the stand-in).
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.register(addr as *mut u8, len, access) }
    }

    unsafe fn register_receive_pool(&mut self, addr: *mut u8, len: u64) -> Result<NicRegion> {
        // SAFETY: forwarded with the caller's guarantees.
        let region = unsafe { self.register(addr, len, Access::LOCAL) }?;
        self.pool_key = Some(region.key);
        Ok(region)
    }

    fn deregister(&mut self, region: NicRegion) {
        if Some(region.key) == self.pool_key {
            self.faults.pools_released.fetch_add(1, Ordering::SeqCst);
            if !self.closed {
                self.faults.teardown_violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.regions.remove(&region.key);
        self.base.deregister(region)
    }

    fn insert_peer(&mut self, address: &[u8]) -> Result<u64> {
        self.base.insert_peer(address)
    }

    unsafe fn post(&mut self, op: &Op) -> Result<Posted> {
        if self.closed {
            self.faults.teardown_violations.fetch_add(1, Ordering::SeqCst);
        }
        if self.next().is_multiple_of(8) {
            return Ok(Posted::Busy);
        }
        if !op.host_memory {
            self.faults.device_posts.fetch_add(1, Ordering::SeqCst);
        }
        let imm = if op.kind == OpKind::Write { op.imm } else { None };
        let outstanding = self.in_flight.entry(op.token).or_default();
        if imm.is_some() && *outstanding > 0 {
            self.faults.violations.fetch_add(1, Ordering::Relaxed);
        }
        *outstanding += 1;
        let unknown =
            self.faults.require_introduction && !self.faults.known.load(Ordering::SeqCst) && op.kind != OpKind::Send;
        if unknown {
            self.faults.unknown_peer.fetch_add(1, Ordering::Relaxed);
        }
        let fail =
            unknown || self.faults.killed.load(Ordering::Relaxed) || self.next() % 1000 < self.faults.fail_per_mille;
        let len = op.len as usize;
        let copy = match self.regions.get(&op.key) {
            Some(&(base, region_len))
                if op.kind == OpKind::Write && len > 0 && op.remote_addr + op.len <= region_len =>
            {
                Some((op.local as usize, base + op.remote_addr as usize, len))
            }
            _ => None,
        };
        let message = (op.kind == OpKind::Send).then(|| {
            // SAFETY: the engine keeps the source of a posted send valid
            // until its completion, and it is `len` bytes long.
            (unsafe { std::slice::from_raw_parts(op.local, len) }.to_vec(), op.imm)
        });
        self.pending.push(Pending { token: op.token, imm, fail, copy, message });
        Ok(Posted::Accepted)
    }

    unsafe fn post_recv(&mut self, buf: *mut u8, len: usize, _desc: *mut c_void, token: u64) -> Result<Posted> {
        self.receives.push_back((buf as usize, len, token));
        Ok(Posted::Accepted)
    }

    fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        let before = events.len();
        let killed = self.faults.killed.load(Ordering::Relaxed);
        // Release a random number of pending operations, in random order.
        let release = if self.pending.is_empty() { 0 } else { self.next() as usize % (self.pending.len() + 1) };
        for _ in 0..release {
            let i = self.next() as usize % self.pending.len();
            let p = self.pending.swap_remove(i);
            if let Some(n) = self.in_flight.get_mut(&p.token) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&p.token);
                }
            }
            if p.fail || killed {
                let error = Error::Transport { op: "write", code: 5, prov_errno: 0, message: "injected fault".into() };
                events.push(Event::Failed { token: p.token, error });
            } else {
                if let Some((src, dst, len)) = p.copy {
                    // SAFETY: the engine keeps both ranges valid until this
                    // completion (the source is held by the request, the
                    // destination is a region registered on this NIC and
                    // checked against its length at post time).
                    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
                    self.faults.landed.fetch_add(1, Ordering::SeqCst);
                }
                if let Some((bytes, imm)) = p.message {
                    use crate::engine::access::Control;
                    if matches!(Control::decode(&bytes), Ok(Control::Hello { .. })) {
                        self.faults.known.store(true, Ordering::SeqCst);
                    }
                    if let Some((buf, cap, token)) = self.receives.pop_front() {
                        let n = bytes.len().min(cap);
                        // SAFETY: a posted receive buffer of `cap` bytes,
                        // the NIC's until it reports it.
                        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n) };
                        events.push(Event::Received { token, len: n, message: true, imm });
                    }
                }
                events.push(Event::Done { token: p.token });
                if let Some(value) = p.imm {
                    events.push(Event::Imm { value });
                }
            }
        }
        events.len() - before
    }

    fn needs_introduction(&self) -> bool {
        self.faults.introduction
    }

    fn close_endpoints(&mut self) {
        self.closed = true;
    }

    fn max_message(&self) -> u64 {
        match self.faults.max_message {
            0 => u64::MAX,
            n => n,
        }
    }

    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn ready_to_sleep(&mut self) -> bool {
        self.pending.is_empty()
    }
}
