//! The libfabric backend: one RDM endpoint, CQ and AV per NIC, for the
//! providers `efa`, `tcp` (as `tcp;ofi_rxm`) and `shm`.
//!
//! Memory-registration modes are honoured as the provider returns them:
//! `FI_MR_LOCAL` (descriptors passed with local buffers), `FI_MR_VIRT_ADDR`
//! (remote addresses are virtual addresses, else offsets from the region
//! start), `FI_MR_PROV_KEY` (provider-chosen keys, else unique keys we request
//! per domain), `FI_MR_ENDPOINT` (regions bound to the endpoint and enabled),
//! `FI_MR_ALLOCATED` (we only register allocated memory) and `FI_MR_HMEM`.
//! Operation contexts are `fi_context2` slots from a fixed arena, so
//! `FI_CONTEXT`/`FI_CONTEXT2` are met without allocating per operation.
//! With `FI_RX_CQ_DATA`, immediates consume posted receive buffers; the
//! engine keeps a pool posted and handles that case.
//!
//! # EFA
//! Written against libfabric's `prov/efa` sources and `fi_efa(7)`, never run
//! on a device (none here); the README's "EFA" section says what runs
//! where. What the code does for it:
//! * the fabric is named in the hints ([`EfaFabric`], default `efa`), and
//!   only its entries are opened ([`info::pick`]); libfabric 1.19 or later;
//! * efa-direct: peers are introduced before RMA
//!   ([`Nic::needs_introduction`]), sends are limited to
//!   `FI_OPT_MAX_MSG_SIZE` ([`Nic::max_message`]), rejected keys come from
//!   the device ([`Nic::reports_rejected_keys`]);
//! * shared memory and CUDA API use off before `fi_enable`, emulated
//!   writes reported (`before_enable_efa`);
//! * registrations ask only for the access their use needs ([`mr_access`]),
//!   and sends go from [`Staging`] buffers;
//! * queried without `FI_RX_CQ_DATA` first (unsolicited write receives on
//!   efa-direct), with a CQ sized for bursts of immediates;
//! * endpoints close before registrations ([`Nic::close_endpoints`]).
//!
//! Decided against, with the anchors' choices in mind: dropping
//! `FI_DELIVERY_COMPLETE` (efa-direct ignores it and device writes on `efa`
//! do too, so it costs only on emulated writes, where it is what makes a
//! completed write mean "landed"); an immediate on every piece counted at
//! the target instead of the trailing zero-byte write (Perplexity's
//! fabric-lib does that; strait's contract is one immediate per request);
//! `FI_MORE` (the worker does not know a round's last post to a NIC when
//! it makes it; fabric-lib does not use it either, interleaving NICs
//! instead, as the worker's round-robin over ready requests does). Progress
//! on the `efa` fabric is manual: `PollMode::Busy` gives the lowest latency
//! there. Its CQs take wait descriptors (libfabric 2.3 and later) only when
//! the domain has no shm domain of its own, which the hints see to by
//! asking for `FI_REMOTE_COMM` without `FI_LOCAL_COMM` (`efa_shm.c`: no shm
//! then; same-host peers loop back through the device).

mod handle;
mod info;
mod shm;

use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;

use fabric_sys as sys;
use fabric_sys::ops as fi;

use self::handle::{check, fabric_error, Domain, Fabric, Owned};
pub(crate) use self::info::{probe, InfoRequest};
use super::{Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::Access;
use crate::error::{Error, Result};
use crate::provider::{EfaFabric, Provider, ProviderKind};

/// How a group of fabric NICs is opened.
#[derive(Clone, Debug)]
pub(crate) struct FabricOptions {
    pub provider: Provider,
    pub info: InfoRequest,
    /// tcp: the interfaces (domains) NIC `i` opens on, `i` cycling; empty:
    /// whatever libfabric lists (one hint in `info` when there is one).
    pub interfaces: Vec<String>,
    /// Open CQs with a wait descriptor (adaptive polling) or without (busy).
    pub wait_fd: bool,
    /// Receive buffers the engine will post per NIC, and their size.
    pub rx_slots: usize,
    pub rx_size: usize,
    /// Introduce peers before RMA (see [`Nic::needs_introduction`]) even
    /// where the fabric does not need it (efa-direct always does): lets
    /// tests run the protocol over tcp and shm.
    pub introduce: bool,
    /// Send from the NIC's own staging buffers (see [`Staging`]) even where
    /// the provider does not need it (EFA always does): lets tests run that
    /// path over tcp and shm.
    pub stage_sends: bool,
    /// EFA: the domains (devices, `rdmap79s0-rdm`) NIC `i` opens on, `i`
    /// cycling; empty: every device libfabric lists.
    pub efa_domains: Vec<String>,
}

/// The interfaces of a comma-separated list, in order (empty: none).
pub(crate) fn interface_list(list: Option<&str>) -> Vec<String> {
    list.map(|l| l.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()).unwrap_or_default()
}

impl FabricOptions {
    /// Options for `provider` on `interface`: one tcp interface, or
    /// several comma-separated (NIC `i` on the `i`-th). One is passed to
    /// fi_getinfo as a hint; several are picked from its full list.
    pub(crate) fn new(provider: Provider, interface: Option<&str>, wait_fd: bool, rx_slots: usize) -> Self {
        let interfaces = interface_list(interface);
        let domain = if interfaces.len() == 1 { Some(interfaces[0].clone()) } else { None };
        let info = InfoRequest { domain, ..InfoRequest::default() };
        FabricOptions {
            provider,
            info,
            interfaces,
            wait_fd,
            rx_slots,
            rx_size: 64 << 10,
            introduce: false,
            stage_sends: false,
            efa_domains: Vec::new(),
        }
    }
}

/// Opens `count` NICs. On EFA each NIC is a distinct device (domain); tcp
/// and shm have one domain, opened once per NIC to stand for several NICs.
pub(crate) fn open_group(options: &FabricOptions, count: usize) -> Result<(ProviderKind, Vec<FabricNic>)> {
    let (kind, list) = info::select(options.provider, &options.info)?;
    let all: Vec<*mut sys::fi_info> = list.iter().collect();
    let names: Vec<info::EntryNames> = all.iter().map(|&i| info::EntryNames::of(i)).collect();
    // libfabric treats the domain-name hint loosely for layered providers,
    // and the fabric-name hint may be ignored by libraries that predate
    // efa-direct: `pick` keeps exactly what was asked for, so that a test
    // bound to `lo` never opens an endpoint on another interface and an
    // EFA engine never opens the other fabric.
    let wanted: &[String] = match kind {
        ProviderKind::Tcp => &options.interfaces,
        ProviderKind::Efa => &options.efa_domains,
        _ => &[],
    };
    let fabric = (kind == ProviderKind::Efa).then(|| options.info.efa_fabric.name());
    let entries: Vec<*mut sys::fi_info> =
        info::pick(&names, kind, fabric, wanted)?.into_iter().map(|i| all[i]).collect();
    let seen: Vec<String> = entries.iter().map(|&i| info::domain_name(i)).collect();
    let first = entries[0];
    let mut fabric_ptr = ptr::null_mut();
    let lib =
        sys::Library::get().map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
    // SAFETY: fabric_attr comes from a live fi_info; the fabric is owned below.
    check("fi_fabric", unsafe { (lib.fi_fabric)((*first).fabric_attr, &mut fabric_ptr, ptr::null_mut()) } as isize)?;
    // SAFETY: fabric_ptr was just opened and is owned by nobody else.
    let fabric: Fabric = Arc::new(unsafe { Owned::new(fabric_ptr, "fabric", ()) });
    let nics = (0..count)
        .map(|n| {
            let entry = entries[n % entries.len()];
            tracing::debug!(nic = n, provider = %info::provider_name(entry), domain = %info::domain_name(entry), "opening NIC");
            FabricNic::open(&fabric, entry, options)
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(provider = %kind, nics = count, domains = ?seen, "libfabric group open");
    Ok((kind, nics))
}

/// An operation context handed to libfabric: `fi_context2` first, as
/// FI_CONTEXT/FI_CONTEXT2 require, then the engine's token.
#[repr(C)]
struct Slot {
    ctx: sys::fi_context2,
    token: u64,
    rx: bool,
    /// The staging buffer its send went from ([`Staging`]), or `NOT_STAGED`.
    staged: u32,
}

const NOT_STAGED: u32 = u32::MAX;

/// Fixed arena of contexts: no allocation per operation, and a natural bound
/// on operations in flight.
struct Slots {
    slots: Box<[Slot]>,
    tx_free: Vec<u32>,
    rx_free: Vec<u32>,
}

impl Slots {
    fn new(tx: usize, rx: usize) -> Self {
        let slots = (0..tx + rx)
            .map(|i| Slot {
                ctx: sys::fi_context2 { internal: [ptr::null_mut(); 8] },
                token: 0,
                rx: i >= tx,
                staged: NOT_STAGED,
            })
            .collect();
        Slots { slots, tx_free: (0..tx as u32).rev().collect(), rx_free: (tx as u32..(tx + rx) as u32).rev().collect() }
    }

    fn take(&mut self, token: u64, rx: bool) -> Option<*mut c_void> {
        let index = if rx { self.rx_free.pop()? } else { self.tx_free.pop()? };
        let slot = &mut self.slots[index as usize];
        slot.token = token;
        slot.staged = NOT_STAGED;
        Some(slot as *mut Slot as *mut c_void)
    }

    /// Marks the operation of `ctx` as sent from staging buffer `buffer`.
    fn stage(&mut self, ctx: *mut c_void, buffer: u32) {
        let index = self.index(ctx);
        self.slots[index].staged = buffer;
    }

    /// Frees the slot; returns the staging buffer its operation used.
    fn give_back(&mut self, ctx: *mut c_void) -> Option<u32> {
        let index = self.index(ctx);
        let slot = &mut self.slots[index];
        let staged = std::mem::replace(&mut slot.staged, NOT_STAGED);
        if slot.rx {
            self.rx_free.push(index as u32);
        } else {
            self.tx_free.push(index as u32);
        }
        (staged != NOT_STAGED).then_some(staged)
    }

    fn index(&self, ctx: *mut c_void) -> usize {
        let base = self.slots.as_ptr() as usize;
        let index = (ctx as usize - base) / std::mem::size_of::<Slot>();
        debug_assert!(index < self.slots.len());
        index
    }

    /// Token and direction of a context returned by the CQ, or `None` for a
    /// context that is not one of ours (null, for remote events).
    fn lookup(&self, ctx: *mut c_void) -> Option<(u64, bool)> {
        let base = self.slots.as_ptr() as usize;
        let end = base + self.slots.len() * std::mem::size_of::<Slot>();
        if (ctx as usize) < base || ctx as usize >= end {
            return None;
        }
        let slot = &self.slots[self.index(ctx)];
        Some((slot.token, slot.rx))
    }
}

/// EFA: the buffers sends go from. The efa provider registers `FI_SEND`
/// memory remotely readable (its read-based protocols for long messages
/// read the sender's buffer: `efa_mr.c` turns `FI_SEND` into
/// `IBV_ACCESS_REMOTE_READ`), so user regions are registered without it and
/// each send is copied into one of these, registered for sending only: no
/// user memory becomes readable by peers because it was sent from. A send
/// waits ([`Posted::Busy`]) while every buffer is in flight. The copy is of
/// at most one receive buffer's size (64 KiB by default), small next to
/// the network's cost of the message.
struct Staging {
    region: NicRegion,
    memory: crate::engine::AlignedBuf,
    size: usize,
    free: Vec<u32>,
}

/// Buffers in [`Staging`].
const STAGING_BUFFERS: usize = 16;

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the MR is live and closed once, here, before the memory it
        // covers is freed (fields drop after this).
        let rc = unsafe { fi::fi_close(self.region.handle.cast()) };
        if rc != 0 {
            tracing::warn!(error = %fabric_error("fi_close(mr)", rc), "closing the staging registration failed");
        }
    }
}

/// The access bits a registration asks for: what the region is used for,
/// nothing more. Every region may be the local side of a write (`FI_WRITE`)
/// or read (`FI_READ`); the receive pool only receives. Sends go from user
/// regions (`FI_SEND`) unless they are staged (EFA, where that bit makes
/// memory remotely readable: see [`Staging`]). Remote access only as
/// granted.
fn mr_access(access: Access, receive_pool: bool, staged_sends: bool) -> u64 {
    if receive_pool {
        return sys::FI_RECV as u64;
    }
    let mut bits = (sys::FI_READ | sys::FI_WRITE) as u64;
    if !staged_sends {
        bits |= sys::FI_SEND as u64;
    }
    if access.remote_write {
        bits |= sys::FI_REMOTE_WRITE as u64;
    }
    if access.remote_read {
        bits |= sys::FI_REMOTE_READ as u64;
    }
    bits
}

const CQ_BATCH: usize = 64;
/// CQ depth on EFA when immediates arrive without posted buffers: a few
/// hundred KiB of device entries, little next to the 4 MiB receive pool.
const UNSOLICITED_CQ_DEPTH: usize = 16384;
/// Most runs one operation carries (`Op::rows`), whatever the provider
/// allows beyond it.
const MAX_ROWS: usize = 4;
/// `Nic::pack_runs_below` on tcp (see there).
const PACK_BELOW_TCP: u64 = 64 << 10;

/// Most shm transmit endpoints one NIC retires (see [`Nic::reset_peer`]).
/// Each keeps its shm region (and a peer entry at its target) until the NIC
/// closes; past this many, a stuck peer stays stuck and its requests keep
/// failing through the request timeout.
const MAX_RETIRED: usize = 16;

/// One libfabric endpoint with its CQ and AV, on its own domain.
///
/// The objects live in [`NicObjects`]; dropping the NIC closes them, except
/// that an shm NIC that peered with another shm NIC of this process is kept
/// open until that one has closed too (see `shm::retire`).
pub(crate) struct FabricNic {
    objects: ManuallyDrop<NicObjects>,
    /// shm: this NIC's address, its key in the in-process registry.
    shm_address: Option<Box<[u8]>>,
}

impl Deref for FabricNic {
    type Target = NicObjects;

    fn deref(&self) -> &NicObjects {
        &self.objects
    }
}

impl DerefMut for FabricNic {
    fn deref_mut(&mut self) -> &mut NicObjects {
        &mut self.objects
    }
}

impl Drop for FabricNic {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is not used afterwards.
        let objects = unsafe { ManuallyDrop::take(&mut self.objects) };
        match self.shm_address.take() {
            Some(address) => shm::retire(address, Box::new(objects)),
            None => drop(objects),
        }
    }
}

impl Drop for NicObjects {
    fn drop(&mut self) {
        if !self.ep_closed {
            // SAFETY: dropped once: here, or in close_endpoints (then
            // ep_closed is set).
            unsafe { ManuallyDrop::drop(&mut self.ep) };
        }
    }
}

/// What a [`FabricNic`] owns.
pub(crate) struct NicObjects {
    // Declaration order is drop order (after `Drop::drop`, which closes
    // `ep`): endpoints before the objects bound to them and the memory
    // registered for them, everything before the domain (held by each),
    // domain before fabric.
    /// shm only: one transmit endpoint per peer, indexed by the peer's AV
    /// index. libfabric 1.17's shm completes an endpoint's operations in
    /// order, so one peer that dies or stops with operations pending would
    /// stall every later operation of a shared endpoint, to every peer;
    /// with an endpoint per peer it stalls only its own. Receives and
    /// peers' operations on us use `ep`, whose name is the NIC's address.
    tx: Vec<Option<Owned<sys::fid_ep, Domain>>>,
    /// shm only: the process behind each peer (by AV index), checked
    /// before the first post to it of every round (see [`shm::PeerWatch`]).
    watches: Vec<Option<shm::PeerWatch>>,
    /// Rounds of posts begun ([`Nic::start_round`]).
    round: u64,
    /// shm only: transmit endpoints replaced by [`Nic::reset_peer`], kept
    /// open (bound to the CQ, so that whatever they still complete returns
    /// its slot) until the NIC closes; at most [`MAX_RETIRED`].
    retired: Vec<Owned<sys::fid_ep, Domain>>,
    tx_info: Option<shm::Named>,
    /// Closed by [`Nic::close_endpoints`] or, if it was not, by `Drop`.
    ep: ManuallyDrop<Owned<sys::fid_ep, Domain>>,
    ep_closed: bool,
    /// EFA: the send buffers, registered on the first send (after the
    /// endpoints close, before the domain).
    staging: Option<Staging>,
    /// Size of a staging buffer: the engine's receive buffer size (at
    /// least a control message's): the longest send when sends are staged.
    staging_size: usize,
    /// Sends go through `staging` (EFA, or when asked for).
    stage_sends: bool,
    av: Owned<sys::fid_av, Domain>,
    cq: Owned<sys::fid_cq, Domain>,
    domain: Domain,
    fabric: Fabric,
    address: Box<[u8]>,
    mr_mode: u32,
    next_key: u64,
    wait_fd: Option<RawFd>,
    delivery_complete: bool,
    /// See [`Nic::in_order_delivery`]: shm.
    in_order: bool,
    /// See [`Nic::max_rows`].
    max_rows: u32,
    /// See [`Nic::max_piece`]: the largest RMA.
    max_msg: u64,
    /// See [`Nic::max_message`]: the largest send.
    max_send: u64,
    /// The efa provider (its own error codes: see `completion_error`).
    efa: bool,
    /// EFA's efa-direct fabric: the device reports rejected keys itself.
    efa_direct: bool,
    /// The entry has `FI_HMEM`: device memory registers with
    /// `FI_HMEM_CUDA` (see [`Nic::device_memory`]).
    hmem: bool,
    /// See [`Nic::needs_introduction`].
    introduce: bool,
    slots: Slots,
    entries: Box<[sys::fi_cq_data_entry; CQ_BATCH]>,
}

// SAFETY: the raw pointers in the fields (context arena, CQ entry buffer,
// objects behind the owners) are only touched through `&mut self` by the one
// thread that owns the NIC; libfabric objects opened with FI_THREAD_DOMAIN may
// move between threads as long as calls on them are not concurrent.
unsafe impl Send for NicObjects {}

impl std::fmt::Debug for FabricNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricNic").field("mr_mode", &self.mr_mode).finish_non_exhaustive()
    }
}

impl FabricNic {
    fn open(fabric: &Fabric, info: *mut sys::fi_info, options: &FabricOptions) -> Result<Self> {
        // SAFETY: open_group passes a live entry of its fi_getinfo list.
        let objects = unsafe { NicObjects::open(fabric, info, options)? };
        let shm_address = objects.tx_info.is_some().then(|| objects.address.clone());
        if let Some(address) = &shm_address {
            shm::opened(address);
        }
        Ok(FabricNic { objects: ManuallyDrop::new(objects), shm_address })
    }
}

impl NicObjects {
    /// # Safety
    /// `info` must be a live entry of the fabric's `fi_getinfo` list.
    unsafe fn open(fabric: &Fabric, info: *mut sys::fi_info, options: &FabricOptions) -> Result<Self> {
        // SAFETY: every call below gets live objects opened just before it
        // (or the fi_info from fi_getinfo, alive for this call), and each new
        // object is handed to exactly one owner right away.
        unsafe {
            let mut dom = ptr::null_mut();
            check("fi_domain", fi::fi_domain(fabric.as_ptr(), info, &mut dom, ptr::null_mut()) as isize)?;
            let domain: Domain = Arc::new(Owned::new(dom, "domain", fabric.clone()));
            let tx_depth = ((*(*info).tx_attr).size).clamp(16, 1024);
            let mr_mode = (*(*info).domain_attr).mr_mode as u32;
            let provider = info::provider_name(info);
            let (efa, shm) = (provider == "efa", provider == "shm");

            let mut cq_attr: sys::fi_cq_attr = std::mem::zeroed();
            cq_attr.size = tx_depth + options.rx_slots + 64;
            if efa && (*info).mode & sys::FI_RX_CQ_DATA == 0 {
                // Unsolicited write receives (efa-direct without
                // FI_RX_CQ_DATA): immediates consume no posted buffer, so
                // nothing bounds how many completions peers can queue
                // between two polls, and the device has no CQ overrun
                // protection. Room for a burst of them.
                cq_attr.size = cq_attr.size.max(UNSOLICITED_CQ_DEPTH);
            }
            cq_attr.format = sys::fi_cq_format_FI_CQ_FORMAT_DATA;
            let mut cq_ptr = ptr::null_mut();
            let mut wait_fd = None;
            if options.wait_fd {
                cq_attr.wait_obj = sys::fi_wait_obj_FI_WAIT_FD;
                if fi::fi_cq_open(dom, &mut cq_attr, &mut cq_ptr, ptr::null_mut()) == 0 {
                    let mut fd: c_int = -1;
                    let rc = fi::fi_control(cq_ptr.cast(), sys::FI_GETWAIT as c_int, (&mut fd as *mut c_int).cast());
                    tracing::debug!(rc, fd, "wait descriptor of the completion queue");
                    if rc == 0 && fd >= 0 {
                        wait_fd = Some(fd);
                    }
                } else {
                    cq_ptr = ptr::null_mut();
                }
            }
            if cq_ptr.is_null() {
                cq_attr.wait_obj = sys::fi_wait_obj_FI_WAIT_NONE;
                check("fi_cq_open", fi::fi_cq_open(dom, &mut cq_attr, &mut cq_ptr, ptr::null_mut()) as isize)?;
            }
            let cq = Owned::new(cq_ptr, "completion queue", domain.clone());

            let mut av_attr: sys::fi_av_attr = std::mem::zeroed();
            av_attr.type_ = sys::fi_av_type_FI_AV_TABLE;
            av_attr.count = 64;
            let mut av_ptr = ptr::null_mut();
            check("fi_av_open", fi::fi_av_open(dom, &mut av_attr, &mut av_ptr, ptr::null_mut()) as isize)?;
            let av = Owned::new(av_ptr, "address vector", domain.clone());

            let ep = open_endpoint(&domain, info, &cq, &av)?;
            let ep_ptr = ep.as_ptr();
            // shm: operations to each peer go through an endpoint of their
            // own (see `tx`); keep the entry to open them with.
            let tx_info = if shm {
                let lib = sys::Library::get()
                    .map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
                let copy = (lib.fi_dupinfo)(info);
                if copy.is_null() {
                    return Err(Error::BackendUnavailable { backend: "shm", reason: "fi_dupinfo failed".into() });
                }
                Some(shm::Named(copy))
            } else {
                None
            };

            // The largest operation: the endpoint's max_msg_size, unless the
            // provider answers the per-kind options of libfabric 2.0
            // (efa-direct: sends up to the MTU, RMA up to the device's
            // largest RDMA, while max_msg_size is the larger of the two).
            let ep_max_msg = match (*(*info).ep_attr).max_msg_size as u64 {
                0 => u64::MAX,
                n => n,
            };
            let mut buf = [0u8; 256];
            let mut len = buf.len();
            check("fi_getname", fi::fi_getname(ep_ptr, buf.as_mut_ptr().cast(), &mut len) as isize)?;
            if len == 0 || len > crate::wire::MAX_NIC_ADDRESS_LEN {
                return Err(Error::BackendUnavailable {
                    backend: "libfabric",
                    reason: format!("endpoint address of {len} bytes is not supported"),
                });
            }
            Ok(NicObjects {
                tx: Vec::new(),
                watches: Vec::new(),
                round: 0,
                retired: Vec::new(),
                tx_info,
                ep: ManuallyDrop::new(ep),
                ep_closed: false,
                staging: None,
                // At least the engine's largest control message (a hello
                // or key query), whatever the receive buffers' size.
                staging_size: options.rx_size.max(crate::engine::access::MAX_QUERY),
                stage_sends: options.stage_sends || efa,
                av,
                cq,
                domain,
                fabric: fabric.clone(),
                address: buf[..len].into(),
                mr_mode,
                next_key: 1,
                wait_fd,
                delivery_complete: true,
                in_order: shm,
                efa,
                efa_direct: efa_direct(info),
                hmem: (*info).caps & sys::FI_HMEM != 0,
                introduce: options.introduce || efa_direct(info),
                max_msg: get_size(ep_ptr, sys::FI_OPT_MAX_RMA_SIZE).unwrap_or(ep_max_msg),
                max_send: get_size(ep_ptr, sys::FI_OPT_MAX_MSG_SIZE).unwrap_or(ep_max_msg),
                max_rows: {
                    let tx = &*(*info).tx_attr;
                    tx.iov_limit.min(tx.rma_iov_limit).clamp(1, MAX_ROWS) as u32
                },
                slots: Slots::new(tx_depth, options.rx_slots),
                entries: Box::new(
                    [sys::fi_cq_data_entry {
                        op_context: ptr::null_mut(),
                        flags: 0,
                        len: 0,
                        buf: ptr::null_mut(),
                        data: 0,
                    }; CQ_BATCH],
                ),
            })
        }
    }

    /// Reads one error entry; false when there was none to read (then the
    /// caller stops polling this turn instead of spinning on `FI_EAVAIL`).
    fn read_error(&mut self, events: &mut Vec<Event>) -> bool {
        // SAFETY: zeroed is a valid fi_cq_err_entry (err_data null, size 0).
        let mut err: sys::fi_cq_err_entry = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is live; err is a valid out-buffer.
        let rc = unsafe { fi::fi_cq_readerr(self.cq.as_ptr(), &mut err, 0) };
        if rc < 0 {
            tracing::warn!(rc, "fi_cq_readerr failed after FI_EAVAIL");
            return false;
        }
        let message = self.cq_strerror(&err);
        let error = completion_error(&err, message, self.efa);
        match self.slots.lookup(err.op_context) {
            Some((token, rx)) => {
                self.release(err.op_context);
                events.push(if rx { Event::ReceiveFailed { token, error } } else { Event::Failed { token, error } });
            }
            None => tracing::warn!(%error, "completion error with no operation attached"),
        }
        true
    }

    /// Whether local buffers need registrations (`FI_MR_LOCAL`, or
    /// `FI_MR_HMEM`): else local-only memory is not registered at all.
    fn registers_local(&self) -> bool {
        self.mr_mode & (sys::FI_MR_LOCAL | sys::FI_MR_HMEM) != 0
    }

    /// Frees an operation's context, and its staging buffer if it had one.
    fn release(&mut self, ctx: *mut c_void) {
        if let Some(buffer) = self.slots.give_back(ctx) {
            if let Some(staging) = &mut self.staging {
                staging.free.push(buffer);
            }
        }
    }

    /// A staging buffer holding a copy of the `len` bytes at `src`, with
    /// its descriptor; `Ok(None)` when all are in flight. Registers the
    /// buffers on first use.
    ///
    /// # Safety
    /// `src` is valid for `len` bytes.
    unsafe fn stage_send(&mut self, src: *const u8, len: usize) -> Result<Option<(u32, *mut u8, *mut c_void)>> {
        // The engine refuses longer sends (`Nic::max_message`); control
        // messages fit by construction.
        if len > self.staging_size {
            return Err(Error::InvalidRequest(format!(
                "a send of {len} bytes is longer than EFA's send buffers ({} bytes)",
                self.staging_size
            )));
        }
        if self.staging.is_none() {
            let size = self.staging_size;
            let memory = crate::engine::AlignedBuf::zeroed((size * STAGING_BUFFERS) as u64)?;
            // SAFETY: the memory lives in the Staging value, whose Drop
            // closes the registration before freeing it.
            let region =
                unsafe { self.register_bits(memory.as_ptr(), (size * STAGING_BUFFERS) as u64, sys::FI_SEND as u64) }?;
            self.staging = Some(Staging { region, memory, size, free: (0..STAGING_BUFFERS as u32).rev().collect() });
        }
        let staging = self.staging.as_mut().expect("registered above");
        let Some(buffer) = staging.free.pop() else { return Ok(None) };
        // SAFETY: the buffer lies inside the staging memory and is free (no
        // operation uses it); src is valid for len <= size bytes (caller).
        let dst = unsafe { staging.memory.as_ptr().add(buffer as usize * staging.size) };
        // SAFETY: as above; the two never overlap (ours vs the caller's).
        unsafe { ptr::copy_nonoverlapping(src, dst, len) };
        Ok(Some((buffer, dst, staging.region.desc)))
    }

    /// Registers `len` bytes at `addr` with `access` bits, bound and
    /// enabled where the provider wants it (`FI_MR_ENDPOINT`).
    ///
    /// # Safety
    /// The memory stays valid until the registration is closed.
    unsafe fn register_bits(&mut self, addr: *mut u8, len: u64, access: u64) -> Result<NicRegion> {
        // SAFETY: forwarded.
        unsafe { self.register_iface(addr, len, access, None) }
    }

    /// As [`register_bits`](Self::register_bits); `cuda`: device memory of
    /// that GPU (`FI_HMEM_CUDA`: the provider pins it through dma-buf or
    /// nvidia-peermem itself).
    ///
    /// # Safety
    /// As for `register_bits`.
    unsafe fn register_iface(&mut self, addr: *mut u8, len: u64, access: u64, cuda: Option<u32>) -> Result<NicRegion> {
        let iov = sys::iovec { iov_base: addr.cast(), iov_len: len as usize };
        // SAFETY: zeroed is a valid fi_mr_attr (null pointers, system iface).
        let mut attr: sys::fi_mr_attr = unsafe { std::mem::zeroed() };
        attr.mr_iov = &iov;
        attr.iov_count = 1;
        attr.access = access;
        attr.iface = sys::fi_hmem_iface_FI_HMEM_SYSTEM;
        if let Some(gpu) = cuda {
            attr.iface = sys::fi_hmem_iface_FI_HMEM_CUDA;
            attr.device = sys::fi_mr_attr__bindgen_ty_1 { cuda: gpu as i32 };
        }
        if self.mr_mode & sys::FI_MR_PROV_KEY == 0 {
            attr.requested_key = self.next_key;
            self.next_key += 1;
        }
        let register_error = |reason: String| Error::RegisterMemory { addr: addr as usize, len, reason };
        let mut mr = ptr::null_mut();
        // SAFETY: the domain is live; attr points at iov for this call; the
        // caller keeps the memory valid until the registration is closed.
        let rc = unsafe { fi::fi_mr_regattr(self.domain.as_ptr(), &attr, 0, &mut mr) };
        if rc != 0 {
            return Err(register_error(fabric_error("fi_mr_regattr", rc).to_string()));
        }
        let region = NicRegion {
            handle: mr.cast(),
            // SAFETY: mr was just registered.
            key: unsafe { fi::fi_mr_key(mr) },
            // SAFETY: as above.
            desc: unsafe { fi::fi_mr_desc(mr) },
        };
        if self.mr_mode & sys::FI_MR_ENDPOINT != 0 {
            // SAFETY: mr and the endpoint are live.
            let rc = unsafe { fi::fi_mr_bind(mr, self.ep.fid(), 0) };
            // SAFETY: as above.
            let rc = if rc == 0 { unsafe { fi::fi_mr_enable(mr) } } else { rc };
            if rc != 0 {
                // SAFETY: mr is live and closed once, here.
                unsafe { fi::fi_close(mr.cast()) };
                return Err(register_error(fabric_error("fi_mr_bind/enable", rc).to_string()));
            }
        }
        Ok(region)
    }

    fn cq_strerror(&self, err: &sys::fi_cq_err_entry) -> String {
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: the CQ is live; err_data/size come from fi_cq_readerr; the
        // returned string is NUL-terminated (in buf or provider-static).
        unsafe {
            let s = fi::fi_cq_strerror(self.cq.as_ptr(), err.prov_errno, err.err_data, buf.as_mut_ptr(), buf.len());
            if s.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        }
    }
}

/// Whether `info` is an entry of EFA's efa-direct fabric.
fn efa_direct(info: *mut sys::fi_info) -> bool {
    info::provider_name(info) == "efa" && info::fabric_name(info) == EfaFabric::EfaDirect.name()
}

/// Opens an endpoint on `domain` bound to `cq` (transmit and receive) and
/// `av`, enabled. shm endpoints get a unique name (see `shm_name`).
///
/// # Safety
/// `info` must be the live entry the domain was opened from.
unsafe fn open_endpoint(
    domain: &Domain,
    info: *mut sys::fi_info,
    cq: &Owned<sys::fid_cq, Domain>,
    av: &Owned<sys::fid_av, Domain>,
) -> Result<Owned<sys::fid_ep, Domain>> {
    // SAFETY: the caller passes the domain's live entry; every object is
    // live, and the endpoint is owned right after it is opened.
    unsafe {
        let named = shm::named_info(info)?;
        let ep_info = named.as_ref().map_or(info, |n| n.0);
        let mut ep_ptr = ptr::null_mut();
        check("fi_endpoint", fi::fi_endpoint(domain.as_ptr(), ep_info, &mut ep_ptr, ptr::null_mut()) as isize)?;
        drop(named);
        let ep = Owned::new(ep_ptr, "endpoint", domain.clone());
        let transmit_recv = (sys::FI_TRANSMIT | sys::FI_RECV) as u64;
        check("fi_ep_bind(cq)", fi::fi_ep_bind(ep_ptr, cq.fid(), transmit_recv) as isize)?;
        check("fi_ep_bind(av)", fi::fi_ep_bind(ep_ptr, av.fid(), 0) as isize)?;
        let efa = info::provider_name(info) == "efa";
        if efa {
            before_enable_efa(ep_ptr, (*info).caps & sys::FI_HMEM != 0);
        }
        check("fi_enable", fi::fi_enable(ep_ptr) as isize)?;
        if efa && get_bool(ep_ptr, sys::FI_OPT_EFA_EMULATED_WRITE) == Some(true) {
            tracing::warn!(
                "EFA: writes are emulated by the provider (this device has no RDMA write): they take a \
                 protocol of sends and reads, slower than device writes, and their sources are registered \
                 remotely readable for it"
            );
        }
        Ok(ep)
    }
}

/// EFA endpoint options, set before `fi_enable` as the provider requires
/// (what Perplexity's fabric-lib and NCCL's plugin set too):
/// * shared memory off: same-host peers do not go through the provider's
///   internal shm (strait's own `shm` provider is the same-host path). The
///   hints' `FI_REMOTE_COMM` without `FI_LOCAL_COMM` already keeps the
///   domain from opening an shm domain (whose presence makes its CQs refuse
///   `FI_WAIT_FD`: `efa_rdm_cq_configure_wait`); this says the same to the
///   endpoint, for libraries that open one anyway.
/// * CUDA API use off unless device memory was asked for: the provider
///   would otherwise call into CUDA (API 1.18 turns it on by default).
///
/// A library older than 1.18 knows neither (`-FI_ENOPROTOOPT`), and a host
/// without CUDA refuses the second (`-FI_EINVAL`): both are normal.
///
/// # Safety
/// `ep` is a live endpoint, not yet enabled.
unsafe fn before_enable_efa(ep: *mut sys::fid_ep, hmem: bool) {
    // SAFETY: forwarded from the caller.
    let rc = unsafe { set_bool(ep, sys::FI_OPT_SHARED_MEMORY_PERMITTED, false) };
    tracing::debug!(rc, "EFA: FI_OPT_SHARED_MEMORY_PERMITTED = false");
    if !hmem {
        // SAFETY: forwarded from the caller.
        let rc = unsafe { set_bool(ep, sys::FI_OPT_CUDA_API_PERMITTED, false) };
        tracing::debug!(rc, "EFA: FI_OPT_CUDA_API_PERMITTED = false");
    }
}

/// Sets a `bool` endpoint option; the provider's return code.
///
/// # Safety
/// `ep` is a live endpoint.
unsafe fn set_bool(ep: *mut sys::fid_ep, name: i32, value: bool) -> c_int {
    // SAFETY: the option is a C bool, one byte, read during the call.
    unsafe {
        fi::fi_setopt(
            ep,
            sys::FI_OPT_ENDPOINT as c_int,
            name,
            (&value as *const bool).cast(),
            std::mem::size_of::<bool>(),
        )
    }
}

/// A `bool` endpoint option, if the provider knows it.
///
/// # Safety
/// `ep` is a live endpoint.
unsafe fn get_bool(ep: *mut sys::fid_ep, name: i32) -> Option<bool> {
    let mut value = false;
    let mut len = std::mem::size_of::<bool>();
    // SAFETY: value has room for the C bool the option holds.
    let rc =
        unsafe { fi::fi_getopt(ep, sys::FI_OPT_ENDPOINT as c_int, name, (&mut value as *mut bool).cast(), &mut len) };
    (rc == 0).then_some(value)
}

/// A `size_t` endpoint option, if the provider knows it (libfabric 2.0's
/// `FI_OPT_MAX_MSG_SIZE`, `FI_OPT_MAX_RMA_SIZE`).
///
/// # Safety
/// `ep` is a live endpoint.
unsafe fn get_size(ep: *mut sys::fid_ep, name: i32) -> Option<u64> {
    let mut value: usize = 0;
    let mut len = std::mem::size_of::<usize>();
    // SAFETY: value has room for the size_t the option holds.
    let rc =
        unsafe { fi::fi_getopt(ep, sys::FI_OPT_ENDPOINT as c_int, name, (&mut value as *mut usize).cast(), &mut len) };
    (rc == 0 && value > 0).then_some(value as u64)
}

/// Maps a CQ error entry to the engine's error kinds.
/// The engine's error for a failed completion. `efa`: the NIC is on the
/// efa provider, whose device errors come as `prov_errno` values of its own
/// (`efa_errno.h`): 7 (`REMOTE_ERROR_BAD_ADDRESS`, a bad or revoked key)
/// is reported with `FI_EINVAL`.
fn completion_error(err: &sys::fi_cq_err_entry, message: String, efa: bool) -> Error {
    let code = err.err;
    let op = if err.flags & sys::FI_READ as u64 != 0 {
        "read"
    } else if err.flags & sys::FI_RECV as u64 != 0 {
        "recv"
    } else if err.flags & sys::FI_SEND as u64 != 0 {
        "send"
    } else {
        "write"
    };
    let detail = || format!("{op}: {message} (errno {code}, provider errno {})", err.prov_errno);
    match code as u32 {
        // ECONNABORTED: EFA's aborted or unresponsive peer (prov_errno 8,
        // 13, 4124, 4126), and any provider's torn-down connection.
        sys::FI_ECONNREFUSED
        | sys::FI_ECONNRESET
        | sys::FI_ECONNABORTED
        | sys::FI_ENOTCONN
        | sys::FI_EHOSTUNREACH
        | sys::FI_ETIMEDOUT => Error::PeerUnreachable(detail()),
        sys::FI_EINVAL if efa && err.prov_errno == 7 => Error::RemoteAccess(detail()),
        c if c == libc::EPIPE as u32 => Error::PeerUnreachable(detail()),
        sys::FI_EACCES | sys::FI_EKEYREJECTED => Error::RemoteAccess(detail()),
        // libfabric 1.17 tcp: the target found no registration for the key
        // (revoked, or never granted for this access) and cancelled the
        // operation.
        c if c == libc::ECANCELED as u32 && err.prov_errno == libc::ENOENT => Error::RemoteAccess(detail()),
        c if c == sys::FI_ENOKEY => Error::RemoteAccess(detail()),
        _ => Error::Transport { op, code, prov_errno: err.prov_errno, message },
    }
}

impl Nic for FabricNic {
    fn address(&self) -> &[u8] {
        &self.address
    }

    fn virtual_addresses(&self) -> bool {
        self.mr_mode & sys::FI_MR_VIRT_ADDR != 0
    }

    unsafe fn register(&mut self, addr: *mut u8, len: u64, access: Access) -> Result<NicRegion> {
        if !access.remote_write && !access.remote_read && !self.registers_local() {
            // Local-only memory on a provider that needs no registration for
            // local buffers (tcp, shm) is not registered at all: no key
            // exists that a peer could use. This matters on tcp, where
            // ofi_rxm adds FI_REMOTE_READ to every registration (for its
            // rendezvous protocol), so a registered "local" region would be
            // readable by any peer that guesses its key and address.
            return Ok(NicRegion { handle: ptr::null_mut(), key: 0, desc: ptr::null_mut() });
        }
        let bits = mr_access(access, false, self.stage_sends);
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.objects.register_bits(addr, len, bits) }
    }

    unsafe fn register_receive_pool(&mut self, addr: *mut u8, len: u64) -> Result<NicRegion> {
        if !self.registers_local() {
            // As for local-only memory in `register`.
            return Ok(NicRegion { handle: ptr::null_mut(), key: 0, desc: ptr::null_mut() });
        }
        let bits = mr_access(Access::LOCAL, true, self.stage_sends);
        // SAFETY: as above.
        unsafe { self.objects.register_bits(addr, len, bits) }
    }

    fn device_memory(&self) -> bool {
        self.hmem
    }

    unsafe fn register_device(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        gpu: u32,
        _dmabuf: Option<(i32, u64)>,
    ) -> Result<NicRegion> {
        if !self.hmem {
            return Err(Error::RegisterMemory {
                addr: addr as usize,
                len,
                reason: "the provider did not offer FI_HMEM: device memory is staged".into(),
            });
        }
        // Registered even when local-only: the provider needs the
        // descriptor to reach device memory. (Sends from device memory go
        // through the engine's stager: EFA's staged sends copy with the
        // CPU.)
        let bits = mr_access(access, false, self.stage_sends);
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.objects.register_iface(addr as *mut u8, len, bits, Some(gpu)) }
    }

    fn deregister(&mut self, region: NicRegion) {
        if region.handle.is_null() {
            return; // local-only, never registered (see `register`)
        }
        // SAFETY: the handle is a live fid_mr from `register`, closed once.
        let rc = unsafe { fi::fi_close(region.handle.cast()) };
        if rc != 0 {
            tracing::warn!(error = %fabric_error("fi_close(mr)", rc), "deregistering memory failed");
        }
    }

    fn insert_peer(&mut self, address: &[u8]) -> Result<u64> {
        let mut fi_addr = sys::FI_ADDR_UNSPEC;
        // SAFETY: the AV is live; address holds one provider address.
        let rc =
            unsafe { fi::fi_av_insert(self.av.as_ptr(), address.as_ptr().cast(), 1, &mut fi_addr, 0, ptr::null_mut()) };
        if rc != 1 {
            let code = if rc < 0 { rc } else { -(sys::FI_EINVAL as i32) };
            return Err(Error::PeerUnreachable(format!(
                "inserting peer address: {}",
                fabric_error("fi_av_insert", code)
            )));
        }
        if let Some(own) = &self.shm_address {
            shm::peered(own, address);
        }
        let objects = &mut *self.objects;
        if let Some(info) = &objects.tx_info {
            let index = fi_addr as usize;
            if objects.tx.len() <= index {
                objects.tx.resize_with(index + 1, || None);
            }
            if objects.watches.len() <= index {
                objects.watches.resize_with(index + 1, || None);
            }
            if objects.watches[index].is_none() {
                objects.watches[index] = shm::PeerWatch::for_address(address);
            }
            if objects.tx[index].is_none() {
                // SAFETY: the copy is of the entry the domain was opened from.
                let ep = unsafe { open_endpoint(&objects.domain, info.0, &objects.cq, &objects.av) }?;
                objects.tx[index] = Some(ep);
            }
        }
        Ok(fi_addr)
    }

    fn start_round(&mut self) {
        self.objects.round += 1;
    }

    unsafe fn post(&mut self, op: &Op) -> Result<Posted> {
        let round = self.objects.round;
        if let Some(Some(watch)) = self.objects.watches.get_mut(op.peer as usize) {
            match watch.check(round) {
                shm::PeerState::Running => {}
                shm::PeerState::Exited => {
                    return Err(Error::PeerUnreachable(format!(
                        "the shm peer's process ({}) has exited; nothing is posted to it",
                        watch.pid()
                    )))
                }
                // Posting could spin on a lock the stopped peer holds:
                // wait, as for a full queue; its requests expire if it
                // stays stopped.
                shm::PeerState::Stopped => return Ok(Posted::Busy),
            }
        }
        let Some(context) = self.slots.take(op.token, false) else {
            return Ok(Posted::Busy);
        };
        let ep = match self.tx.get(op.peer as usize) {
            Some(Some(tx)) => tx.as_ptr(),
            _ => self.ep.as_ptr(),
        };
        let iov = sys::iovec { iov_base: op.local.cast(), iov_len: op.len as usize };
        let mut desc = op.local_desc;
        let iov_count = usize::from(op.len > 0);
        let rc = match op.kind {
            OpKind::Write | OpKind::Read => {
                // Runs (`Op::rows`, at most MAX_ROWS: the engine keeps to
                // max_rows): one remote range each; locally one iovec when
                // they lie back to back, else one each.
                let rows = (op.rows.count.max(1) as usize).min(MAX_ROWS);
                let packed = rows == 1 || op.rows.src_stride == op.len;
                let mut iovs = [sys::iovec { iov_base: ptr::null_mut(), iov_len: 0 }; MAX_ROWS];
                let mut descs = [desc; MAX_ROWS];
                let mut rmas = [sys::fi_rma_iov { addr: 0, len: 0, key: 0 }; MAX_ROWS];
                for r in 0..rows {
                    let step = r as u64;
                    rmas[r] = sys::fi_rma_iov {
                        addr: op.remote_addr + step * op.rows.dst_stride,
                        len: op.len as usize,
                        key: op.key,
                    };
                    // Pointer arithmetic only: the runs lie in the op's
                    // registered range (the engine's plan checked them).
                    let base = op.local.wrapping_add((step * op.rows.src_stride) as usize);
                    iovs[r] = sys::iovec { iov_base: base.cast(), iov_len: op.len as usize };
                }
                let local_count = if packed {
                    iovs[0].iov_len = op.len as usize * rows;
                    iov_count
                } else {
                    rows
                };
                let msg = sys::fi_msg_rma {
                    msg_iov: iovs.as_ptr(),
                    desc: descs.as_mut_ptr(),
                    iov_count: local_count,
                    addr: op.peer,
                    rma_iov: rmas.as_ptr(),
                    rma_iov_count: rows,
                    context,
                    data: op.imm.unwrap_or(0) as u64,
                };
                let mut flags = sys::FI_COMPLETION as u64;
                // Zero-length writes (an immediate only) carry no data to
                // wait for, and libfabric 1.17's shm mishandles them with
                // FI_DELIVERY_COMPLETE (lost completions, then a crash).
                if op.imm.is_some() {
                    flags |= sys::FI_REMOTE_CQ_DATA as u64;
                }
                if op.delivery_complete && self.delivery_complete && op.len > 0 {
                    flags |= sys::FI_DELIVERY_COMPLETE as u64;
                }
                if op.kind == OpKind::Write {
                    // SAFETY: endpoint live; msg and what it points to live
                    // for the call; buffers valid until completion (caller).
                    unsafe { fi::fi_writemsg(ep, &msg, flags) }
                } else {
                    // SAFETY: as above.
                    unsafe { fi::fi_readmsg(ep, &msg, sys::FI_COMPLETION as u64) }
                }
            }
            OpKind::Send => {
                let mut iov = iov;
                if self.stage_sends && op.len > 0 {
                    if !op.host_memory {
                        self.slots.give_back(context);
                        return Err(Error::InvalidRequest(
                            "a send from device memory on EFA (sends are copied into host staging buffers by the \
                             CPU): not supported yet"
                                .into(),
                        ));
                    }
                    // SAFETY: the engine keeps op.local valid for op.len bytes.
                    match unsafe { self.stage_send(op.local, op.len as usize) } {
                        Ok(Some((buffer, at, staged_desc))) => {
                            self.slots.stage(context, buffer);
                            iov.iov_base = at.cast();
                            desc = staged_desc;
                        }
                        Ok(None) => {
                            self.slots.give_back(context);
                            return Ok(Posted::Busy);
                        }
                        Err(e) => {
                            self.slots.give_back(context);
                            return Err(e);
                        }
                    }
                }
                let data = op.imm.unwrap_or(0) as u64;
                let msg = sys::fi_msg { msg_iov: &iov, desc: &mut desc, iov_count, addr: op.peer, context, data };
                let mut flags = sys::FI_COMPLETION as u64;
                if op.imm.is_some() {
                    flags |= sys::FI_REMOTE_CQ_DATA as u64;
                }
                // SAFETY: as above.
                unsafe { fi::fi_sendmsg(ep, &msg, flags) }
            }
        };
        if rc == 0 {
            return Ok(Posted::Accepted);
        }
        self.release(context);
        if rc == -(sys::FI_EAGAIN as isize) {
            return Ok(Posted::Busy);
        }
        if rc == -(sys::FI_EBADFLAGS as isize) && op.delivery_complete && self.delivery_complete {
            // The provider has no FI_DELIVERY_COMPLETE; its completions then
            // already mean delivery for the reliable endpoints we open.
            tracing::warn!("provider rejects FI_DELIVERY_COMPLETE; relying on its default completion semantics");
            self.delivery_complete = false;
            // SAFETY: same operation, same guarantees from the caller.
            return unsafe { self.post(op) };
        }
        Err(fabric_error(
            match op.kind {
                OpKind::Write => "fi_writemsg",
                OpKind::Read => "fi_readmsg",
                OpKind::Send => "fi_sendmsg",
            },
            rc as i32,
        ))
    }

    unsafe fn post_recv(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, token: u64) -> Result<Posted> {
        let Some(context) = self.slots.take(token, true) else {
            return Ok(Posted::Busy);
        };
        let iov = sys::iovec { iov_base: buf.cast(), iov_len: len };
        let mut desc = desc;
        let msg =
            sys::fi_msg { msg_iov: &iov, desc: &mut desc, iov_count: 1, addr: sys::FI_ADDR_UNSPEC, context, data: 0 };
        // SAFETY: endpoint live; buffer valid until completion (caller).
        let rc = unsafe { fi::fi_recvmsg(self.ep.as_ptr(), &msg, sys::FI_COMPLETION as u64) };
        match rc {
            0 => Ok(Posted::Accepted),
            rc => {
                self.slots.give_back(context);
                if rc == -(sys::FI_EAGAIN as isize) {
                    Ok(Posted::Busy)
                } else {
                    Err(fabric_error("fi_recvmsg", rc as i32))
                }
            }
        }
    }

    /// libfabric 1.17: tcp drops the connection on a rejected key (the
    /// rejection itself may or may not reach the initiator first) and shm
    /// never answers the operation. EFA's efa-direct passes the device's
    /// completion status through: a bad or revoked key is `prov_errno` 7
    /// (`REMOTE_ERROR_BAD_ADDRESS`, see `completion_error`), so no key query
    /// is needed. The `efa` fabric reports the same where the device does
    /// the write, but its emulated protocols (devices without RDMA write)
    /// were not verified to: it keeps the query.
    fn reports_rejected_keys(&self) -> bool {
        self.objects.efa_direct
    }

    /// Closes the endpoints, so that the receive pool and the other
    /// regions can be deregistered with nothing posted on them: fi_efa(7)
    /// calls closing a registration with a posted receive undefined. shm
    /// keeps its endpoints (no registration of its is local, so none has a
    /// posted receive; and a NIC peered with another of this process stays
    /// open for it: see `shm::retire`), and so do providers whose
    /// registrations are bound to the endpoint (`FI_MR_ENDPOINT`).
    fn close_endpoints(&mut self) {
        let objects = &mut *self.objects;
        // FI_MR_ENDPOINT registrations are bound to the endpoint: those
        // close first, as before.
        if objects.tx_info.is_some() || objects.ep_closed || objects.mr_mode & sys::FI_MR_ENDPOINT != 0 {
            return;
        }
        objects.tx.clear();
        objects.retired.clear();
        objects.ep_closed = true;
        // SAFETY: dropped once (ep_closed is now set); the NIC is not used
        // for operations after this (the engine is shutting down).
        unsafe { ManuallyDrop::drop(&mut objects.ep) };
    }

    /// efa-direct (see [`Nic::needs_introduction`]), or when asked for.
    fn needs_introduction(&self) -> bool {
        self.objects.introduce
    }

    /// shm: every operation to a peer goes through that peer's own transmit
    /// endpoint, and is either done at once by the initiator (a write of
    /// one range without remote CQ data, by `process_vm_writev`) or queued
    /// in the target endpoint's command queue, which the target reads in
    /// order. tcp would qualify too (one connection per path, applied in
    /// stream order) but gains nothing measurable: its cost is per
    /// operation, with or without the acknowledgement. EFA (SRD) delivers
    /// out of order.
    fn in_order_delivery(&self) -> bool {
        self.objects.in_order
    }

    /// The provider's remote and local iovec limits (tcp and shm: 4; EFA:
    /// 1), at most [`MAX_ROWS`].
    fn max_rows(&self) -> u32 {
        self.objects.max_rows
    }

    /// tcp carries RMA in software, system calls and wake-ups on both
    /// sides per operation: measured on this project's 2-core VM
    /// (`strait-bench loopback --workloads write`), about 70 k writes per
    /// second whatever their size up to 32 KiB, while a memory copy costs
    /// about 0.1 µs per KiB. Packing runs below 64 KiB measured faster
    /// there (KV: NHD TP 2:1's 1 KiB rows 3-4x, vLLM's 32 KiB blocks about
    /// 1.2x; 64 KiB runs no better). shm: never (its operations are cheap
    /// enough: packing made the same KV transfers slower). EFA and verbs
    /// are hardware RDMA: never.
    fn pack_runs_below(&self) -> u64 {
        match (self.objects.efa, self.objects.in_order) {
            (false, false) => PACK_BELOW_TCP,
            _ => 0,
        }
    }

    /// The largest RMA: `FI_OPT_MAX_RMA_SIZE` where the provider answers
    /// it (libfabric 2.0+), else the endpoint's `max_msg_size` (EFA: its
    /// largest RDMA; a user `ShardConfig::max_piece` above it would fail on
    /// the device).
    fn max_piece(&self) -> u64 {
        self.objects.max_msg
    }

    /// The largest send: `FI_OPT_MAX_MSG_SIZE` where the provider answers it
    /// (efa-direct: the device's MTU, about 8 KiB), else `max_msg_size`;
    /// with staged sends (EFA), at most a staging buffer.
    fn max_message(&self) -> u64 {
        let o = &self.objects;
        if o.stage_sends {
            o.max_send.min(o.staging_size as u64)
        } else {
            o.max_send
        }
    }

    /// shm: libfabric 1.17's shm completes a transmit endpoint's operations
    /// in order, and never completes an RMA its target rejected (a revoked
    /// or forged key: the target drops the command without answering). Every
    /// later operation on that endpoint would wait behind it forever, so the
    /// peer's endpoint is replaced by a new one (a new name, which the
    /// target maps as a new peer). The old one stays open and bound to the
    /// CQ: if its operations complete after all (a stalled peer resumed),
    /// their slots come back as usual. Other providers recover by themselves
    /// (tcp reconnects), so this does nothing for them.
    fn reset_peer(&mut self, peer: u64) {
        let objects = &mut *self.objects;
        let Some(info) = &objects.tx_info else { return };
        let Some(slot @ Some(_)) = objects.tx.get_mut(peer as usize) else { return };
        if objects.retired.len() >= MAX_RETIRED {
            tracing::warn!(peer, "shm: not replacing the endpoint to a stuck peer: {MAX_RETIRED} already replaced");
            return;
        }
        // SAFETY: the copy is of the entry the domain was opened from.
        match unsafe { open_endpoint(&objects.domain, info.0, &objects.cq, &objects.av) } {
            Ok(ep) => {
                let old = slot.replace(ep).expect("checked above");
                objects.retired.push(old);
                tracing::info!(peer, "shm: replaced the transmit endpoint to a peer whose requests expired");
            }
            Err(e) => tracing::warn!(peer, error = %e, "shm: could not replace the endpoint to a stuck peer"),
        }
    }

    fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        let before = events.len();
        loop {
            // SAFETY: the CQ is live; entries has room for CQ_BATCH entries
            // of the DATA format the CQ was opened with.
            let rc = unsafe { fi::fi_cq_read(self.cq.as_ptr(), self.entries.as_mut_ptr().cast(), CQ_BATCH) };
            if rc == -(sys::FI_EAVAIL as isize) {
                if self.read_error(events) {
                    continue;
                }
                break;
            }
            if rc < 0 && rc != -(sys::FI_EAGAIN as isize) {
                tracing::warn!(rc, "fi_cq_read failed");
            }
            if rc <= 0 {
                break;
            }
            for i in 0..rc as usize {
                let e = self.entries[i];
                let imm = (e.flags & sys::FI_REMOTE_CQ_DATA as u64 != 0).then_some(e.data as u32);
                match self.slots.lookup(e.op_context) {
                    Some((token, true)) => {
                        self.slots.give_back(e.op_context);
                        let message = e.flags & sys::FI_MSG as u64 != 0 || imm.is_none();
                        events.push(Event::Received { token, len: e.len, message, imm });
                    }
                    Some((token, false)) => {
                        self.release(e.op_context);
                        events.push(Event::Done { token });
                    }
                    None => match imm {
                        Some(value) => events.push(Event::Imm { value }),
                        None => tracing::trace!(flags = e.flags, "completion with no context ignored"),
                    },
                }
            }
            if (rc as usize) < CQ_BATCH {
                break;
            }
        }
        events.len() - before
    }

    fn wait_fd(&self) -> Option<RawFd> {
        self.wait_fd
    }

    fn ready_to_sleep(&mut self) -> bool {
        if self.wait_fd.is_none() {
            // Nothing to arm: the worker naps briefly and polls again.
            return true;
        }
        let mut fid = self.cq.fid();
        // SAFETY: the fabric and CQ are live; fids points at one fid.
        unsafe { fi::fi_trywait(self.fabric.as_ptr(), &mut fid, 1) == 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(err: u32, prov_errno: i32, flags: u64) -> sys::fi_cq_err_entry {
        // SAFETY: zeroed is a valid fi_cq_err_entry.
        let mut e: sys::fi_cq_err_entry = unsafe { std::mem::zeroed() };
        e.err = err as i32;
        e.prov_errno = prov_errno;
        e.flags = flags;
        e
    }

    /// Each kind of region asks for what it is used for: on EFA no user
    /// region gets `FI_SEND` (which the provider turns into remote read),
    /// the receive pool only `FI_RECV`, remote bits only as granted.
    #[test]
    fn registrations_ask_for_the_access_their_use_needs() {
        let local = (sys::FI_READ | sys::FI_WRITE) as u64;
        let send = sys::FI_SEND as u64;
        let (rw, rr) = (sys::FI_REMOTE_WRITE as u64, sys::FI_REMOTE_READ as u64);
        assert_eq!(mr_access(Access::LOCAL, false, true), local);
        assert_eq!(mr_access(Access::REMOTE_WRITE, false, true), local | rw);
        assert_eq!(mr_access(Access::REMOTE_READ, false, true), local | rr);
        assert_eq!(mr_access(Access::REMOTE_READ_WRITE, false, true), local | rw | rr);
        assert_eq!(mr_access(Access::LOCAL, false, false), local | send);
        assert_eq!(mr_access(Access::REMOTE_WRITE, false, false), local | send | rw);
        for efa in [true, false] {
            assert_eq!(mr_access(Access::LOCAL, true, efa), sys::FI_RECV as u64);
        }
    }

    /// The errno table, including EFA's codes (`efa_errno.h`).
    #[test]
    fn completion_errors_map_by_kind() {
        let map = |err, prov, efa| completion_error(&entry(err, prov, 0), String::new(), efa);
        for code in [
            sys::FI_ECONNREFUSED,
            sys::FI_ECONNRESET,
            sys::FI_ECONNABORTED,
            sys::FI_ENOTCONN,
            sys::FI_EHOSTUNREACH,
            sys::FI_ETIMEDOUT,
        ] {
            assert!(matches!(map(code, 0, false), Error::PeerUnreachable(_)), "{code}");
            assert!(matches!(map(code, 8, true), Error::PeerUnreachable(_)), "{code} on efa");
        }
        assert!(matches!(map(sys::FI_EINVAL, 7, true), Error::RemoteAccess(_)), "EFA's bad key");
        assert!(matches!(map(sys::FI_EINVAL, 7, false), Error::Transport { .. }), "EINVAL elsewhere is not a key");
        assert!(matches!(map(sys::FI_EINVAL, 3, true), Error::Transport { .. }));
        assert!(matches!(map(sys::FI_EACCES, 0, false), Error::RemoteAccess(_)));
        assert!(
            matches!(map(libc::ECANCELED as u32, libc::ENOENT, false), Error::RemoteAccess(_)),
            "tcp's revoked key"
        );
        assert!(matches!(map(libc::EPIPE as u32, 0, false), Error::PeerUnreachable(_)));
        let read = completion_error(&entry(sys::FI_EIO, 0, sys::FI_READ as u64), "boom".into(), false);
        assert!(matches!(read, Error::Transport { op: "read", .. }), "{read:?}");
    }
}
