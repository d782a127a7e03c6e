//! `TransferEngine`: the handle users hold, and its builder.

pub(crate) mod access;
mod completion;
#[cfg(test)]
mod efa_tests;
#[cfg(test)]
mod fault_tests;
mod imm;
mod link;
mod mailbox;
mod memory;
#[cfg(test)]
mod packing_tests;
mod progress;
mod reserved;
pub(crate) mod staging;
#[cfg(test)]
mod staging_tests;
pub mod stats;
mod trigger;
mod worker;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use self::completion::Transfer;
pub use self::imm::ImmCounter;
pub use self::memory::{MemoryRegion, PAGE_SIZE};
pub use self::reserved::{
    reserved_imm, ImmSlot, ImmSpace, MessagePool, Service, PING_IMM, RESERVED_IMM_BASE, SERVICE_HEADER, SERVICE_MAGIC,
};
pub use self::staging::StagingConfig;
pub use self::trigger::{StreamTrigger, TriggerPoll};
pub use self::worker::PollMode;

use self::completion::{Completion, PartGuard};
use self::imm::{ImmTable, UnclaimedImm};
use self::link::Link;
use self::mailbox::Mailbox;
pub(crate) use self::memory::AlignedBuf;
use self::memory::{DeviceMemory, MrInner};
use self::staging::{StagedOp, StagerConfig, MAX_CHUNK};
use self::worker::{Command, MessageCallback, MessageSink, RecvConfig, RequestOp, Submission, Worker, WorkerConfig};
use crate::address::EngineAddress;
use crate::backend::fabric::{self, FabricOptions};
use crate::backend::verbs::{self, VerbsConfig, VerbsOptions};
use crate::backend::Nic;
use crate::descriptor::{check_range, Access, MrDesc};
use crate::error::{Error, Result};
use crate::plan::{CopyList, PagedLayout, PagedPlan, ShardConfig, ShardPlan, Strided, StridedPlan};
use crate::provider::{EfaFabric, Provider, ProviderKind};

/// Default of [`EngineBuilder::request_timeout`]: a request fails once its
/// peer has completed none of the engine's operations for this long.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and starts a [`TransferEngine`].
///
/// ```no_run
/// # fn main() -> strait::Result<()> {
/// use strait::{PollMode, Provider, TransferEngine};
/// let engine = TransferEngine::builder()
///     .provider(Provider::Tcp)
///     .interface("lo")
///     .nics(2)
///     .poll_mode(PollMode::Busy)
///     .build()?;
/// # Ok(()) }
/// ```
pub struct EngineBuilder {
    provider: Provider,
    nics: usize,
    /// `nics` was set (else it follows the interface list).
    nics_set: bool,
    poll_mode: PollMode,
    cpu: Option<usize>,
    interface: Option<String>,
    shard: ShardConfig,
    recv: RecvConfig,
    request_timeout: Option<Duration>,
    verbs: VerbsConfig,
    efa_fabric: EfaFabric,
    gpu: Option<usize>,
    /// The PCI address of `for_gpu`'s GPU (set when placing): how the
    /// stager finds its CUDA ordinal, which `CUDA_VISIBLE_DEVICES` and
    /// CUDA's device order may number differently.
    gpu_pci: Option<String>,
    /// EFA: the domains to open (set by `for_gpu`); empty: all.
    efa_domains: Vec<String>,
    messages: Option<MessageCallback>,
    unclaimed_imm: Option<UnclaimedImm>,
    imm_queue: Option<Arc<Mailbox<u32>>>,
    staging: StagingConfig,
    /// `packing`: runs shorter than this (on average) are packed; `None`:
    /// the NICs' `pack_runs_below`.
    pack_below: Option<u64>,
    packing: StagingConfig,
    /// Tests only: device regions of host memory, copied by memcpy (the
    /// stand-in of a GPU's copy engine); never a default.
    host_device_stand_in: bool,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("provider", &self.provider)
            .field("nics", &self.nics)
            .field("poll_mode", &self.poll_mode)
            .field("cpu", &self.cpu)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            provider: Provider::Auto,
            nics: 1,
            nics_set: false,
            poll_mode: PollMode::default(),
            cpu: None,
            interface: None,
            shard: ShardConfig::default(),
            recv: RecvConfig { count: 64, size: 64 << 10 },
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            verbs: VerbsConfig::default(),
            efa_fabric: EfaFabric::default(),
            gpu: None,
            gpu_pci: None,
            efa_domains: Vec::new(),
            messages: None,
            unclaimed_imm: None,
            imm_queue: None,
            staging: StagingConfig::default(),
            pack_below: None,
            packing: DEFAULT_PACKING,
            host_device_stand_in: false,
        }
    }
}

impl EngineBuilder {
    /// Which provider to use (default [`Provider::Auto`]: efa, then verbs,
    /// then tcp).
    pub fn provider(mut self, provider: Provider) -> Self {
        self.provider = provider;
        self
    }

    /// NICs in the group (default 1, or as many as
    /// [`interface`](Self::interface) names; at most 16). On EFA each is a
    /// device, taken in the order libfabric lists them; on tcp each is its
    /// own endpoint on an interface (NIC `i` on the `i`-th interface named,
    /// cycling; all on one interface when one is named), and on shm its own
    /// endpoint, standing in for a NIC.
    pub fn nics(mut self, nics: usize) -> Self {
        self.nics = nics;
        self.nics_set = true;
        self
    }

    /// How the worker waits (default: [`PollMode::Adaptive`] with a 50 µs spin).
    pub fn poll_mode(mut self, mode: PollMode) -> Self {
        self.poll_mode = mode;
        self
    }

    /// Pins the worker thread to this CPU.
    pub fn pin_worker(mut self, cpu: usize) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Settings of the ConnectX (verbs) backend: devices, port, GID index,
    /// MTU, timeouts and retries. Used when the engine runs on
    /// [`Provider::Verbs`] (or `Auto` picks it).
    pub fn verbs(mut self, config: VerbsConfig) -> Self {
        self.verbs = config;
        self
    }

    /// EFA only: which of the efa provider's fabrics to open (default
    /// [`EfaFabric::Efa`]; see [`EfaFabric`] for what each implies).
    pub fn efa_fabric(mut self, fabric: EfaFabric) -> Self {
        self.efa_fabric = fabric;
        self
    }

    /// Uses the RDMA NICs nearest to GPU `gpu` (PCI address order, as
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID` numbers them), read from sysfs when
    /// the engine is built: those behind the GPU's PCIe switch, else on its
    /// NUMA node (see [`topology`](crate::topology)). On EFA they are the
    /// devices opened (domains `<device>-rdm`), on verbs the devices
    /// (unless [`VerbsConfig::devices`] names some), and the group has one
    /// NIC per device unless [`nics`](Self::nics) says otherwise. tcp and
    /// shm are not placed by it. [`build`](Self::build) fails with
    /// [`Error::InvalidRequest`] when the machine has no such GPU.
    pub fn for_gpu(mut self, gpu: usize) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// tcp only: the interface (libfabric domain) to use, e.g. `lo`, or
    /// several, comma-separated (`"eth0,eth1"`): NIC `i` of the group then
    /// opens on the `i`-th (cycling), and the group has as many NICs as
    /// interfaces unless [`nics`](Self::nics) says otherwise. Each NIC's
    /// endpoint binds its sockets to its interface's address, so with one
    /// subnet per interface (or source-address routing) its traffic leaves
    /// through that interface. Without it libfabric picks the first
    /// interface it lists (often `eth0`).
    pub fn interface(mut self, name: impl Into<String>) -> Self {
        self.interface = Some(name.into());
        self
    }

    /// How contiguous transfers are split across NICs.
    pub fn shard_config(mut self, config: ShardConfig) -> Self {
        self.shard = config;
        self
    }

    /// Receive buffers posted per NIC for two-sided messages (default 64 of
    /// 64 KiB). A peer's message must fit in one buffer.
    pub fn receive_buffers(mut self, count: usize, size: usize) -> Self {
        self.recv = RecvConfig { count: count.max(1), size: size.max(64) };
        self
    }

    /// Delivers two-sided messages to `callback` on the worker thread instead
    /// of the queue read by [`TransferEngine::recv_timeout`].
    pub fn on_message(mut self, callback: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        self.messages = Some(Box::new(callback));
        self
    }

    /// Delivers immediates that no armed counter claims to `callback` (worker
    /// thread) instead of keeping them for a later
    /// [`expect_imm`](TransferEngine::expect_imm).
    pub fn on_unclaimed_imm(mut self, callback: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.unclaimed_imm = Some(UnclaimedImm::Callback(Box::new(callback)));
        self
    }

    /// Queues immediates that no armed counter claims, for
    /// [`TransferEngine::next_imm`], instead of keeping them for a later
    /// [`expect_imm`](TransferEngine::expect_imm).
    pub fn unclaimed_imm_queue(mut self) -> Self {
        let (tx, rx) = Mailbox::new();
        self.unclaimed_imm = Some(UnclaimedImm::Queue(tx));
        self.imm_queue = Some(rx);
        self
    }

    fn check_nics(&mut self) -> Result<()> {
        if !self.nics_set {
            self.nics = fabric::interface_list(self.interface.as_deref()).len().max(1);
        }
        if self.nics == 0 || self.nics > crate::wire::MAX_NICS {
            return Err(Error::InvalidRequest(format!("nics must be in 1..={}", crate::wire::MAX_NICS)));
        }
        Ok(())
    }

    /// How long a request may wait while its peer completes none of this
    /// engine's operations (default [`DEFAULT_REQUEST_TIMEOUT`]; `None`: no
    /// limit). When it passes, the request ends with
    /// [`Error::PeerUnreachable`].
    ///
    /// The clock is the peer's progress, not the request's age: a large
    /// write, or one queued behind others, does not expire as long as
    /// operations to that peer keep completing. It catches what the
    /// transport does not report: a peer that was killed on `shm` (which
    /// never reports dead peers), a peer that stopped polling or was
    /// stopped (`SIGSTOP`), a network that drops everything. Expiry is
    /// checked every `timeout / 8` (between 1 and 100 ms), so a request
    /// ends at most that much after its deadline.
    ///
    /// An expired request's bytes, and its immediate, may or may not have
    /// reached the peer, as after any transport error. Its memory stays
    /// registered (and owned memory alive) until the operations it had
    /// posted complete or the engine shuts down.
    pub fn request_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.request_timeout = timeout.into().filter(|t| !t.is_zero());
        self
    }

    /// Opens the NICs and starts the worker.
    ///
    /// `Auto` tries libfabric `efa`, then verbs, then libfabric `tcp`, and
    /// takes the first that opens; when none does, the error lists why each
    /// was unavailable.
    pub fn build(mut self) -> Result<TransferEngine> {
        self.place_for_gpu()?;
        self.check_nics()?;
        match self.provider {
            Provider::Verbs => {
                let nics = verbs::open_group(&self.verbs_options(), self.nics)?;
                self.start(ProviderKind::Verbs, nics)
            }
            Provider::Auto => {
                let mut reasons = Vec::new();
                match fabric::open_group(&self.fabric_options(Provider::Efa), self.nics) {
                    Ok((kind, nics)) => return self.start(kind, nics),
                    Err(e) => reasons.push(e.to_string()),
                }
                match verbs::open_group(&self.verbs_options(), self.nics) {
                    Ok(nics) => return self.start(ProviderKind::Verbs, nics),
                    Err(e @ Error::BackendUnavailable { .. }) => reasons.push(e.to_string()),
                    Err(e) => return Err(e),
                }
                match fabric::open_group(&self.fabric_options(Provider::Tcp), self.nics) {
                    Ok((kind, nics)) => self.start(kind, nics),
                    Err(e) => {
                        reasons.push(e.to_string());
                        Err(Error::BackendUnavailable { backend: "auto", reason: reasons.join("; ") })
                    }
                }
            }
            provider => {
                let (kind, nics) = fabric::open_group(&self.fabric_options(provider), self.nics)?;
                self.start(kind, nics)
            }
        }
    }

    /// Sizes the staging buffers through which device memory moves on
    /// transports without GPUDirect (see [`TransferEngine::register_device`]):
    /// `slots` slots of `slot_size` bytes for this engine's requests and as
    /// many for its peers', page-locked, allocated when the engine first
    /// needs them. The default is 4 + 4 slots of 4 MiB (32 MiB). A staged
    /// request moves in chunks of a slot, as many at once as there are
    /// slots; a send from device memory must fit one slot.
    pub fn staging(mut self, slots: usize, slot_size: u64) -> Self {
        self.staging = StagingConfig { slots: slots.max(1), slot_size: slot_size.clamp(PAGE_SIZE as u64, MAX_CHUNK) };
        self
    }

    /// Packs strided copies and paged writes between host regions whose
    /// runs average fewer than `runs_below` bytes (0: never). The default
    /// is the NICs' own figure: 64 KiB on libfabric tcp, whose cost is per
    /// operation (about 14 µs each on a 2-core VM, whatever the size up to
    /// 32 KiB); never on shm, verbs and EFA.
    ///
    /// A packed request moves in chunks of up to 2 MiB: the engine's
    /// packer gathers each chunk's runs (or writes straight from the
    /// source, when its runs are back to back there) into a slot the
    /// target's packer lent it, tells the target, which copies the runs
    /// into place and answers; the immediate is delivered after the last
    /// chunk's copy. The semantics are a direct transfer's: the request
    /// completes once every byte is in the target region. An NHD KV head
    /// slice (1 KiB per token, TP 2:1) goes from about 0.4 to about 2 GB/s
    /// on tcp (see the README).
    ///
    /// Requests of fewer than 16 runs always go direct. A target takes
    /// packed requests into the regions it registered with remote access
    /// while its own packing was on ([`MrDesc::is_packed`]); requests to
    /// other regions, batches, and requests made on the engine's own
    /// thread before its packer started go direct. The packer's pool is
    /// [`packing_pool`](Self::packing_pool); its counters are
    /// [`stats`](TransferEngine::stats)' `packed`.
    pub fn packing(mut self, runs_below: u64) -> Self {
        self.pack_below = Some(runs_below);
        self
    }

    /// Sizes the packer's pool (see [`packing`](Self::packing)): `slots`
    /// slots of 2 MiB for gathering this engine's packed chunks and as
    /// many to lend to its peers, allocated (not touched) when the engine
    /// first packs or first registers a region with remote access. The
    /// default is 4 + 4 (16 MiB). A peer holds at most 4 of this engine's
    /// slots at once; a lent slot goes back when its holder has no chunk
    /// waiting for it, or when another peer waits for a slot.
    pub fn packing_pool(mut self, slots: usize) -> Self {
        self.packing = StagingConfig { slots: slots.max(1), slot_size: staging::PACK_SLOT };
        self
    }

    /// Tests and benchmarks only (the `test-backend` feature): device
    /// regions may be host memory, copied with memcpy (the host stand-in
    /// of the copy engine), so that the staging protocol runs without a
    /// GPU. Never use it for real transfers.
    #[cfg(any(test, feature = "test-backend"))]
    pub fn host_device_stand_in(mut self) -> Self {
        self.host_device_stand_in = true;
        self
    }

    /// Applies [`for_gpu`](Self::for_gpu): the NICs nearest the GPU.
    fn place_for_gpu(&mut self) -> Result<()> {
        let Some(gpu) = self.gpu else { return Ok(()) };
        let topology = crate::topology::Topology::discover()
            .map_err(|e| Error::InvalidRequest(format!("placing the engine for GPU {gpu}: {e}")))?;
        if gpu >= topology.gpus.len() {
            return Err(Error::InvalidRequest(format!(
                "GPU {gpu} not found: sysfs lists {} NVIDIA GPU(s) (PCI vendor 0x10de, display class)",
                topology.gpus.len()
            )));
        }
        // Each backend opens its own kind of device: EFA's (vendor 0x1d0f)
        // on efa, the others (ConnectX) on verbs; tcp and shm are not
        // placed.
        let names = |efa: bool| -> Vec<String> {
            topology
                .nics_for_gpu_where(gpu, |n| n.is_efa() == efa)
                .map(|(nics, nearness)| {
                    tracing::info!(gpu, efa, nics = ?nics.iter().map(|n| &n.name).collect::<Vec<_>>(), ?nearness,
                        "RDMA NICs nearest the engine's GPU");
                    nics.iter().map(|n| n.name.clone()).collect()
                })
                .unwrap_or_default()
        };
        let (efa, others) = (names(true), names(false));
        let count = match self.provider {
            Provider::Efa => efa.len(),
            Provider::Verbs => others.len(),
            Provider::Auto if !efa.is_empty() => efa.len(),
            Provider::Auto => others.len(),
            _ => 0,
        };
        if count > 0 && !self.nics_set {
            self.nics = count;
            self.nics_set = true;
        }
        if self.verbs.devices.is_empty() {
            self.verbs.devices = others;
        }
        self.efa_domains = efa.iter().map(|n| format!("{n}-rdm")).collect();
        self.gpu_pci = Some(topology.gpus[gpu].pci.address.clone());
        Ok(())
    }

    fn fabric_options(&self, provider: Provider) -> FabricOptions {
        let wait_fd = matches!(self.poll_mode, PollMode::Adaptive { .. });
        let mut options = FabricOptions::new(provider, self.interface.as_deref(), wait_fd, self.recv.count);
        options.info.efa_fabric = self.efa_fabric;
        // GPUDirect where the provider has it: EFA, when this machine has
        // CUDA (a provider without CUDA support answers without FI_HMEM).
        options.info.hmem = provider == Provider::Efa && crate::cuda::available();
        options.rx_size = self.recv.size;
        options.efa_domains = self.efa_domains.clone();
        options
    }

    fn verbs_options(&self) -> VerbsOptions {
        VerbsOptions {
            config: self.verbs.clone(),
            wait_fd: matches!(self.poll_mode, PollMode::Adaptive { .. }),
            rx_slots: self.recv.count,
        }
    }

    /// Starts an engine on the null test backend: its NICs complete every
    /// operation at once without moving bytes, so that benchmarks see the
    /// engine's own cost per request and per work item. Regions and
    /// descriptors work as usual; writes to the engine's own descriptors
    /// deliver their immediates to it. Only with the `test-backend` feature;
    /// never use it for real transfers.
    #[cfg(feature = "test-backend")]
    pub fn build_null_backend(mut self) -> Result<TransferEngine> {
        self.check_nics()?;
        let nics = (0..self.nics).map(|_| crate::backend::null::NullNic::new()).collect();
        self.start(ProviderKind::Tcp, nics)
    }

    fn start<N: Nic + 'static>(self, kind: ProviderKind, nics: Vec<N>) -> Result<TransferEngine> {
        let address = EngineAddress::new(kind, nics.iter().map(|n| n.address().into()).collect());
        let virtual_addresses = nics[0].virtual_addresses();
        let max_rows = nics.iter().map(|n| n.max_rows()).min().unwrap_or(1).max(1);
        // Pieces never longer than the smallest NIC takes (the transport's
        // own limit, e.g. EFA's largest RDMA), whatever ShardConfig says.
        let max_piece = nics.iter().map(|n| n.max_piece()).min().unwrap_or(u64::MAX).max(1);
        let max_send = nics.iter().map(|n| n.max_message()).min().unwrap_or(u64::MAX);
        let direct_device = nics.iter().all(|n| n.device_memory());
        let pack_below = self.pack_below.unwrap_or_else(|| nics.iter().map(|n| n.pack_runs_below()).min().unwrap_or(0));
        if nics.iter().any(|n| n.needs_introduction()) && self.recv.size < access::MAX_QUERY {
            // A peer's hello must fit this engine's receive buffers.
            return Err(Error::InvalidRequest(format!(
                "receive buffers of {} bytes are too small for efa-direct's introductions: at least {} bytes",
                self.recv.size,
                access::MAX_QUERY
            )));
        }
        let mut shard = self.shard;
        shard.max_piece = shard.max_piece.min(max_piece);
        shard.min_piece = shard.min_piece.min(shard.max_piece);
        let nic_count = nics.len();
        let (link, commands) = Link::new()?;
        let link = Arc::new(link);
        let imm = ImmTable::new(self.unclaimed_imm.unwrap_or(UnclaimedImm::Tally));
        let (message_queue, messages) = match self.messages {
            Some(cb) => (None, MessageSink::Callback(cb)),
            None => {
                let (tx, rx) = Mailbox::new();
                (Some(rx), MessageSink::Queue(tx))
            }
        };
        let config = WorkerConfig {
            poll_mode: self.poll_mode,
            recv: self.recv,
            request_timeout: self.request_timeout,
            address: address.clone(),
        };
        let services = Arc::new(reserved::Services::default());
        let mut worker = Worker::new(nics, commands, link.clone(), imm.clone(), messages, services.clone(), config);
        // Before any thread can drive it: receive buffers are posted first.
        let pollfds = worker.start();
        let core = progress::Core::new(worker);
        let cpu = self.cpu;
        let (thread_core, thread_link) = (core.clone(), link.clone());
        let thread = std::thread::Builder::new()
            .name("strait-worker".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_current_thread(cpu);
                }
                progress::run(thread_core, thread_link, pollfds)
            })
            .map_err(|e| Error::InvalidRequest(format!("spawning the worker: {e}")))?;
        link.set_worker(thread.thread().clone());
        link.set_progress(core);
        imm.set_link(link.clone());
        tracing::info!(provider = %kind, nics = nic_count, address = %address, "engine started");
        Ok(TransferEngine {
            shared: Arc::new(Shared {
                link,
                address,
                kind,
                nic_count,
                virtual_addresses,
                max_rows,
                max_send,
                imm,
                shard,
                rotation: AtomicUsize::new(0),
                messages: message_queue,
                imm_queue: self.imm_queue,
                slots: Arc::new(reserved::SlotPool::default()),
                services,
                labels: Mutex::new(HashMap::new()),
                thread: Mutex::new(Some(thread)),
                stager: OnceLock::new(),
                packer: OnceLock::new(),
                stager_init: Mutex::new(()),
                staging: self.staging,
                pack_below,
                packing: self.packing,
                packed: Arc::default(),
                host_device_stand_in: self.host_device_stand_in,
                request_timeout: self.request_timeout,
                gpu_pci: self.gpu_pci,
                device_keys: AtomicU64::new(1),
                direct_device,
            }),
        })
    }
}

/// Waits on one of the engine's delivery queues, if it has that queue,
/// driving the engine meanwhile (see `progress`).
fn receive<T>(link: &Link, queue: Option<&Arc<Mailbox<T>>>, timeout: Duration, missing: &str) -> Result<T> {
    let queue = queue.ok_or_else(|| Error::InvalidRequest(missing.into()))?;
    if let Some(item) = queue.try_pop() {
        return Ok(item);
    }
    let deadline = Instant::now() + timeout;
    link.drive(&|| queue.has_items(), Some(deadline));
    queue.pop_timeout(deadline.saturating_duration_since(Instant::now())).map_err(|e| match e {
        Error::Timeout(_) => Error::Timeout(timeout),
        e => e,
    })
}

/// Scatter targets writing into the same region must not overlap: their
/// pieces land in no defined order, so the bytes written twice would be
/// either source's.
fn check_disjoint(targets: &[ScatterTarget]) -> Result<()> {
    let mut order: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].len > 0).collect();
    let region = |t: &ScatterTarget| (t.dst.key(0), t.dst.remote_addr(0));
    order.sort_unstable_by_key(|&i| (region(&targets[i]), targets[i].dst_offset));
    for pair in order.windows(2) {
        let (a, b) = (&targets[pair[0]], &targets[pair[1]]);
        let same = region(a) == region(b) && a.dst.owner() == b.dst.owner();
        if same && a.dst_offset.saturating_add(a.len) > b.dst_offset {
            return Err(Error::InvalidRequest(format!(
                "scatter targets {} and {} overlap in the same destination region ({}+{} and {}+{})",
                pair[0], pair[1], a.dst_offset, a.len, b.dst_offset, b.len
            )));
        }
    }
    Ok(())
}

/// Fails unless every page of `ptr..ptr+len` is mapped in this process.
///
/// Providers that do not pin memory (libfabric tcp and shm) accept any
/// address at registration and would fault later, inside the worker, when a
/// peer's write lands; `mincore` finds unmapped pages first (`ENOMEM`). The
/// check walks page tables only; it does not touch or fault in the memory.
fn check_mapped(ptr: *mut u8, len: u64) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = ptr as usize & !(page - 1);
    let end = (ptr as usize).saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    const CHUNK_PAGES: usize = 1 << 16;
    let mut residency = vec![0u8; CHUNK_PAGES.min((end - start).div_ceil(page))];
    let mut at = start;
    while at < end {
        let chunk = (end - at).min(CHUNK_PAGES * page);
        // SAFETY: `at` is page-aligned; mincore writes one byte per page of
        // `chunk` (at most CHUNK_PAGES, the vector's length) and does not
        // access the range itself.
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, chunk, residency.as_mut_ptr()) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::RegisterMemory {
                addr: ptr as usize,
                len,
                reason: if err.raw_os_error() == Some(libc::ENOMEM) {
                    format!("the range is not mapped in this process (page at {at:#x} or after)")
                } else {
                    format!("checking the range: {err}")
                },
            });
        }
        at += chunk;
    }
    Ok(())
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "pinning the worker failed");
        }
    }
}

struct Shared {
    link: Arc<Link>,
    address: EngineAddress,
    kind: ProviderKind,
    nic_count: usize,
    virtual_addresses: bool,
    /// Runs one work item may carry (the NICs' `max_rows`).
    max_rows: u32,
    /// The longest send the NICs take (efa-direct: the MTU).
    max_send: u64,
    imm: Arc<ImmTable>,
    shard: ShardConfig,
    rotation: AtomicUsize,
    messages: Option<Arc<Mailbox<Vec<u8>>>>,
    imm_queue: Option<Arc<Mailbox<u32>>>,
    slots: Arc<reserved::SlotPool>,
    services: Arc<reserved::Services>,
    /// Peers' names in `stats()`.
    labels: Mutex<HashMap<EngineAddress, String>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The stager, started by the first device region or staged request.
    stager: OnceLock<StagerHandle>,
    /// The host packer, started by the first packed request or the first
    /// region served packed.
    packer: OnceLock<StagerHandle>,
    stager_init: Mutex<()>,
    staging: StagingConfig,
    /// Runs shorter than this on average are packed (0: never).
    pack_below: u64,
    packing: StagingConfig,
    packed: Arc<staging::PackedCounters>,
    host_device_stand_in: bool,
    request_timeout: Option<Duration>,
    /// `for_gpu`'s GPU, by PCI address.
    gpu_pci: Option<String>,
    /// Keys of device regions (the stager's, not the NICs').
    device_keys: AtomicU64,
    /// Every NIC reaches device memory (`Nic::device_memory`): device
    /// regions are registered with them, not staged.
    direct_device: bool,
}

/// The running stager (see [`staging`]).
struct StagerHandle {
    tx: crossbeam_channel::Sender<staging::Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The GPU it stages for, and its context (`None`: no CUDA; only host
    /// memory, or the tests' stand-in).
    gpu: u32,
    context: Option<Arc<crate::cuda::Context>>,
}

impl Shared {
    fn shutdown(&self) {
        // The stagers first: their pools are deregistered through the worker.
        for stager in [self.stager.get(), self.packer.get()].into_iter().flatten() {
            let _ = stager.tx.send(staging::Msg::Stop);
            let thread = stager.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(thread) = thread {
                if thread.thread().id() != std::thread::current().id() {
                    let _ = thread.join();
                }
            }
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = self.link.send(Command::Shutdown);
            self.link.wake();
            // On the worker, or on a thread that drives it (a callback that
            // dropped the last handle), joining would wait for this thread.
            if !self.link.on_worker() {
                join_bounded(thread);
            }
        }
    }
}

/// How long shutdown waits for the worker to stop.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);
/// The packer's default pool: 4 + 4 slots of 2 MiB (a packed chunk is at
/// most a slot).
const DEFAULT_PACKING: StagingConfig = StagingConfig { slots: 4, slot_size: staging::PACK_SLOT };
/// Requests of fewer runs go direct whatever their size: packing costs a
/// control message each way per chunk, and the target's copy.
const MIN_PACKED_RUNS: u64 = 16;

/// Joins the worker, unless it has not stopped within [`SHUTDOWN_LIMIT`]:
/// then it is wedged inside a provider call that never returns (libfabric
/// 1.17's shm spinning on the lock of a peer that died holding it), and is
/// left running, logged, rather than hang the caller forever.
fn join_bounded(thread: JoinHandle<()>) {
    let start = Instant::now();
    let mut nap = Duration::from_micros(50);
    while !thread.is_finished() {
        if start.elapsed() >= SHUTDOWN_LIMIT {
            tracing::error!(
                limit = ?SHUTDOWN_LIMIT,
                "the engine's worker did not stop: it is stuck inside the provider (a dead shm peer's lock?); \
                 leaving it"
            );
            return;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(5));
    }
    let _ = thread.join();
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A group of NICs and the worker thread that drives them: the entry point
/// of strait.
///
/// Cheap to clone (`Arc` inside), `Send + Sync`. The worker stops when the
/// last clone is dropped or [`shutdown`](Self::shutdown) is called: requests
/// still in flight then end with [`Error::Shutdown`], and drop returns once
/// the worker has released every NIC (or, if the worker is stuck inside a
/// provider call that never returns, after 10 s, leaving it: logged as an
/// error).
///
/// Every submit method checks its arguments (ranges against regions and
/// descriptors, provider and NIC counts) before anything is posted, returning
/// the error directly; after that the request's outcome comes through the
/// returned [`Transfer`].
#[derive(Clone)]
pub struct TransferEngine {
    shared: Arc<Shared>,
}

impl fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferEngine").field("address", &self.shared.address).finish()
    }
}

/// One destination of [`TransferEngine::scatter`].
#[derive(Clone, Debug)]
pub struct ScatterTarget {
    /// The peer's region.
    pub dst: MrDesc,
    /// Offset in the local source region.
    pub src_offset: u64,
    /// Offset in the peer's region.
    pub dst_offset: u64,
    /// Bytes to write.
    pub len: u64,
    /// Immediate delivered to this peer once its bytes have landed.
    pub imm: Option<u32>,
}

impl TransferEngine {
    /// A builder with the defaults.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The addresses of this engine's NICs, to give to peers.
    pub fn address(&self) -> &EngineAddress {
        &self.shared.address
    }

    /// The provider the engine runs on.
    pub fn provider(&self) -> ProviderKind {
        self.shared.kind
    }

    /// NICs in the group.
    pub fn nic_count(&self) -> usize {
        self.shared.nic_count
    }

    /// Allocates `len` zeroed, page-aligned bytes and registers them with
    /// every NIC. The engine frees the memory after deregistration.
    pub fn alloc(&self, len: u64, access: Access) -> Result<MemoryRegion> {
        let buf = AlignedBuf::zeroed(len)?;
        let ptr = buf.as_ptr();
        self.register_inner(ptr, len, access, Some(Box::new(buf)), true)
    }

    /// Registers memory you own with every NIC.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid host memory (the engine treats every
    /// region registered here as host memory: on verbs, payloads of up to
    /// the queue pair's inline limit are copied from it by the CPU at post
    /// time; GPU memory needs the device registration of the GPU work,
    /// which marks it as such) and stay valid until
    /// the returned region and every request using it have ended, which is
    /// after the region is dropped and [`Transfer`]s using it have completed.
    /// (If the engine's drop logged that its worker did not stop, the worker
    /// still holds the registrations: such memory must not be freed.)
    pub unsafe fn register_raw(&self, ptr: *mut u8, len: u64, access: Access) -> Result<MemoryRegion> {
        self.register_inner(ptr, len, access, None, true)
    }

    /// Registers memory that `owner` keeps valid, and holds `owner` until the
    /// memory is deregistered: after the region is dropped and every request
    /// using it has ended. `owner` is then dropped on the engine's worker
    /// thread (or on the thread that drops the region), so its `Drop` must
    /// not block. This is how the Python bindings keep a registered array
    /// alive for as long as a transfer may touch it.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid memory (as for
    /// [`register_raw`](Self::register_raw)) for as long as `owner` lives,
    /// and must not move while it does.
    pub unsafe fn register_owned(
        &self,
        ptr: *mut u8,
        len: u64,
        access: Access,
        owner: impl Send + 'static,
    ) -> Result<MemoryRegion> {
        self.register_inner(ptr, len, access, Some(Box::new(owner)), true)
    }

    /// Registers device memory: `len` bytes at device address `ptr` on
    /// GPU `gpu` (CUDA's ordinal), e.g. a CUDA tensor's `data_ptr()`.
    ///
    /// The region has the API and guarantees of host memory. Where every
    /// NIC reaches device memory (GPUDirect RDMA: EFA when its provider
    /// offers `FI_HMEM`, registered with `FI_HMEM_CUDA`; verbs through the
    /// range's dma-buf, `ibv_reg_dmabuf_mr` on the descriptor of
    /// `cuMemGetHandleForAddressRange`, else plain `ibv_reg_mr` with
    /// nvidia-peermem) it is registered with them and used as host memory
    /// is (sends from it still go through staging). These direct paths
    /// have not run on hardware: neither machine this project is tested on
    /// has an RDMA NIC. On transports without GPUDirect (libfabric tcp and
    /// shm, built without CUDA) the memory is staged: no NIC registers it,
    /// its descriptor says so ([`MrDesc::is_staged`]), and the engine's
    /// stager moves its bytes through page-locked host buffers
    /// ([`EngineBuilder::staging`]), keeping every semantic of a direct
    /// transfer: a write into a peer's device region completes only once
    /// the bytes are in the peer's GPU memory, and the peer's immediate is
    /// delivered only after that. Staged memory takes every request
    /// ([`send`](Self::send) of at most a slot; `Batch::scatter` and
    /// `Batch::barrier` excepted);
    /// strided copy lists and paged writes have their rows packed into
    /// the staging slots (see `engine::staging`).
    ///
    /// An engine stages for one GPU: the one of [`EngineBuilder::for_gpu`],
    /// else that of its first device region (or, when its first staged
    /// request came before any, the calling thread's current device).
    ///
    /// Ordering with your streams: the engine's copies and its NICs'
    /// accesses are not ordered after work queued on your CUDA streams.
    /// Synchronize the stream that produced the bytes (or wait for an
    /// event recorded on it) before submitting a write from device memory,
    /// or let the stream start it ([`StreamTrigger`](crate::StreamTrigger)),
    /// and consume received bytes once the counter says they have landed
    /// ([`ImmCounter::wait_on_stream`](crate::ImmCounter::wait_on_stream)).
    ///
    /// Dropping a staged region refuses peers' later requests at once;
    /// chunks of theirs being served at that moment finish first (they
    /// hold the memory until they end).
    ///
    /// # Errors
    /// Without CUDA ([`crate::cuda::probe`] says why), when `ptr..ptr+len`
    /// is not device memory of GPU `gpu`, or when the engine stages for
    /// another GPU.
    ///
    /// # Safety
    /// The memory must stay allocated until the region and every request
    /// using it have ended (as for [`register_raw`](Self::register_raw)).
    pub unsafe fn register_device(&self, ptr: u64, len: u64, gpu: u32, access: Access) -> Result<MemoryRegion> {
        self.register_device_inner(ptr, len, gpu, access, None)
    }

    /// As [`register_device`](Self::register_device), holding `owner` until
    /// the memory is deregistered (as
    /// [`register_owned`](Self::register_owned) does for host memory): how
    /// the Python bindings keep a CUDA tensor alive.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be device memory that `owner` keeps allocated.
    pub unsafe fn register_device_owned(
        &self,
        ptr: u64,
        len: u64,
        gpu: u32,
        access: Access,
        owner: impl Send + 'static,
    ) -> Result<MemoryRegion> {
        self.register_device_inner(ptr, len, gpu, access, Some(Box::new(owner)))
    }

    /// Allocates `len` zeroed bytes of device memory on GPU `gpu`
    /// (`cuMemAlloc`) and registers them as
    /// [`register_device`](Self::register_device) does; the engine frees
    /// the memory after the region and its requests end.
    pub fn alloc_device(&self, len: u64, gpu: u32, access: Access) -> Result<MemoryRegion> {
        if len == 0 {
            return Err(Error::InvalidRequest("cannot allocate 0 bytes".into()));
        }
        let stager = self.stager(Some(gpu))?;
        if self.shared.host_device_stand_in {
            let buf = AlignedBuf::zeroed(len)?;
            let ptr = buf.as_ptr() as u64;
            return self.register_device_inner(ptr, len, gpu, access, Some(Box::new(buf)));
        }
        let ctx = stager.context.clone().ok_or_else(|| self.no_cuda())?;
        let alloc = crate::cuda::DeviceAlloc::zeroed(ctx, len)?;
        let ptr = alloc.ptr;
        self.register_device_inner(ptr, len, gpu, access, Some(Box::new(alloc)))
    }

    fn no_cuda(&self) -> Error {
        match crate::cuda::probe() {
            Err(e) => Error::Cuda(e.to_string()),
            Ok(_) => Error::Cuda("CUDA is present but the engine's stager has no context".into()),
        }
    }

    fn register_device_inner(
        &self,
        ptr: u64,
        len: u64,
        gpu: u32,
        access: Access,
        owned: Option<memory::Owner>,
    ) -> Result<MemoryRegion> {
        if ptr == 0 || len == 0 || ptr.checked_add(len).is_none() {
            return Err(Error::RegisterMemory { addr: ptr as usize, len, reason: "null, empty or wrapping".into() });
        }
        let stager = self.stager(Some(gpu))?;
        if stager.gpu != gpu {
            return Err(Error::InvalidRequest(format!(
                "this engine stages for GPU {} (for_gpu, or its first device region): register GPU {gpu}'s memory \
                 with an engine of its own",
                stager.gpu
            )));
        }
        let context = if self.shared.host_device_stand_in {
            check_mapped(ptr as *mut u8, len)?;
            None
        } else {
            let ctx = stager.context.clone().ok_or_else(|| self.no_cuda())?;
            // Pointer attributes are answered in a context.
            let _scope = ctx.scope()?;
            for (what, at) in [("first", ptr), ("last", ptr + len - 1)] {
                match crate::cuda::device_of(at) {
                    Some(g) if g == gpu => {}
                    found => {
                        return Err(Error::RegisterMemory {
                            addr: ptr as usize,
                            len,
                            reason: format!(
                                "the {what} byte is not device memory of GPU {gpu} (CUDA says: {})",
                                found.map_or("not device memory".into(), |g| format!("GPU {g}"))
                            ),
                        })
                    }
                }
            }
            Some(ctx)
        };
        let mut owned = owned;
        if self.shared.direct_device {
            match self.register_device_direct(ptr, len, gpu, access, context.clone(), &mut owned) {
                Err(e @ Error::RegisterMemory { .. }) => {
                    // The NICs said they reach device memory, but this range
                    // would not register (no dma-buf for it and no
                    // nvidia-peermem, a NIC without dma-buf support): staged.
                    tracing::warn!(error = %e, "GPUDirect registration failed: the region is staged");
                }
                other => return other,
            }
        }
        let key = self.shared.device_keys.fetch_add(1, Ordering::Relaxed);
        let keys = vec![key; self.shared.nic_count];
        let desc = MrDesc::with_staging(self.shared.address.clone(), 0, len, access, keys, true);
        let device = DeviceMemory { gpu, context };
        let link = self.shared.link.clone();
        let inner = Arc::new(MrInner::new_device(key, ptr as *mut u8, len, Box::new([]), desc, device, owned, link));
        stager.tx.send(staging::Msg::AddRegion { key, region: Arc::downgrade(&inner) }).map_err(|_| Error::Shutdown)?;
        Ok(MemoryRegion { inner })
    }

    /// Registers device memory with every NIC (GPUDirect: EFA with
    /// `FI_HMEM`, verbs through its dma-buf or nvidia-peermem); requests
    /// then use it as they use host memory, with no staging.
    fn register_device_direct(
        &self,
        ptr: u64,
        len: u64,
        gpu: u32,
        access: Access,
        context: Option<Arc<crate::cuda::Context>>,
        owned: &mut Option<memory::Owner>,
    ) -> Result<MemoryRegion> {
        if self.shared.link.on_worker() {
            return Err(Error::WouldDeadlock("registering memory"));
        }
        // The range's dma-buf, for verbs; the registrations hold the
        // buffer, so the descriptor is closed once they are made.
        let dmabuf = context.as_ref().and_then(|_| crate::cuda::dmabuf_of(ptr, len));
        let fd = dmabuf.as_ref().map(|(fd, offset)| (std::os::fd::AsRawFd::as_raw_fd(fd), *offset));
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.link.send(Command::Register {
            ptr: ptr as usize,
            len,
            access,
            device: Some((gpu, fd)),
            reply: tx,
        })?;
        let registration = rx.recv().map_err(|_| Error::Shutdown)??;
        drop(dmabuf);
        let base = if self.shared.virtual_addresses { ptr } else { 0 };
        let keys = registration.regions.iter().map(|r| r.key).collect();
        let descs = registration.regions.iter().map(|r| r.desc).collect();
        let desc = MrDesc::new(self.shared.address.clone(), base, len, access, keys);
        let device = DeviceMemory { gpu, context };
        let link = self.shared.link.clone();
        let owned = owned.take();
        let inner = MrInner::new_device(registration.id, ptr as *mut u8, len, descs, desc, device, owned, link);
        Ok(MemoryRegion { inner: Arc::new(inner) })
    }

    /// The stager, started on first use (for GPU `gpu`, unless `for_gpu`
    /// named one).
    fn stager(&self, gpu: Option<u32>) -> Result<&StagerHandle> {
        self.start_once(&self.shared.stager, "starting the stager for device memory", || self.start_stager(gpu))
    }

    /// The handle in `cell`, started by `start` the first time: once, under
    /// the stagers' lock, and never on the worker thread (starting one sends
    /// the worker a command and registers its pool).
    fn start_once<'a>(
        &'a self,
        cell: &'a OnceLock<StagerHandle>,
        what: &'static str,
        start: impl FnOnce() -> Result<StagerHandle>,
    ) -> Result<&'a StagerHandle> {
        if let Some(s) = cell.get() {
            return Ok(s);
        }
        let _init = self.shared.stager_init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cell.get() {
            return Ok(s);
        }
        if self.shared.link.on_worker() {
            return Err(Error::WouldDeadlock(what));
        }
        let handle = start()?;
        Ok(cell.get_or_init(|| handle))
    }

    fn start_stager(&self, gpu: Option<u32>) -> Result<StagerHandle> {
        // for_gpu's GPU (by PCI address: CUDA may number it otherwise),
        // else the first device region's, else the calling thread's current
        // device (PyTorch's), else 0.
        let placed = self.shared.gpu_pci.as_deref().and_then(crate::cuda::ordinal_of_pci);
        let gpu = placed.or(gpu).or_else(crate::cuda::current_ordinal).unwrap_or(0);
        let config = self.shared.staging;
        let (context, copies): (_, Box<dyn staging::CopyEngine>) =
            if self.shared.host_device_stand_in || !crate::cuda::available() {
                (None, Box::new(staging::HostCopies::default()))
            } else {
                let ctx = Arc::new(crate::cuda::Context::primary(gpu)?);
                (Some(ctx.clone()), Box::new(crate::cuda::CudaCopies::new(ctx)?))
            };
        let bytes = config.pool_bytes();
        let buf = AlignedBuf::zeroed(bytes)?;
        let ptr = buf.as_ptr();
        let owner: memory::Owner = match &context {
            // SAFETY: the pin owns the buffer: unpinned before it is freed.
            Some(ctx) => Box::new(unsafe { crate::cuda::HostPin::new(ctx.clone(), ptr, bytes, Box::new(buf))? }),
            None => Box::new(buf),
        };
        let pool = self.register_inner(ptr, bytes, Access::REMOTE_READ_WRITE, Some(owner), false)?;
        let handle = self.spawn_stager(staging::Lane::Device, config, pool, copies, context, gpu)?;
        tracing::info!(gpu, cuda = handle.context.is_some(), pool = bytes, "stager started");
        Ok(handle)
    }

    /// The host packer (see [`EngineBuilder::packing`]), started on first
    /// use: a stager of host memory only, with no CUDA.
    fn packer(&self) -> Result<&StagerHandle> {
        self.start_once(&self.shared.packer, "starting the packer", || self.start_packer())
    }

    fn start_packer(&self) -> Result<StagerHandle> {
        let config = self.shared.packing;
        let bytes = config.pool_bytes();
        let buf = AlignedBuf::zeroed(bytes)?;
        let ptr = buf.as_ptr();
        let pool = self.register_inner(ptr, bytes, Access::REMOTE_READ_WRITE, Some(Box::new(buf)), false)?;
        let copies = Box::new(staging::HostCopies::default());
        let handle = self.spawn_stager(staging::Lane::Host, config, pool, copies, None, 0)?;
        tracing::info!(pool = bytes, runs_below = self.shared.pack_below, "packer started");
        Ok(handle)
    }

    /// Starts a stager of `lane` over its registered `pool`.
    fn spawn_stager(
        &self,
        lane: staging::Lane,
        config: StagingConfig,
        pool: MemoryRegion,
        copies: Box<dyn staging::CopyEngine>,
        context: Option<Arc<crate::cuda::Context>>,
        gpu: u32,
    ) -> Result<StagerHandle> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.shared.link.send(Command::Staging(lane, tx.clone()))?;
        let cfg = StagerConfig {
            link: self.shared.link.clone(),
            address: self.shared.address.clone(),
            nic_count: self.shared.nic_count,
            shard: self.shared.shard,
            timeout: self.shared.request_timeout,
            staging: config,
            pool: pool.inner.clone(),
            lane,
            counters: self.shared.packed.clone(),
        };
        drop(pool);
        let stager = staging::Stager::new(cfg, copies, tx.clone(), rx);
        let bind = context.clone();
        let name = match lane {
            staging::Lane::Device => "strait-stager",
            staging::Lane::Host => "strait-packer",
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Some(ctx) = bind {
                    if let Err(e) = ctx.bind() {
                        tracing::error!(error = %e, "the stager could not bind its CUDA context");
                    }
                }
                stager.run()
            })
            .map_err(|e| Error::InvalidRequest(format!("spawning the {name} thread: {e}")))?;
        Ok(StagerHandle { tx, thread: Mutex::new(Some(thread)), gpu, context })
    }

    /// Whether a request of `bytes` in `runs` runs between the local
    /// `local` and the peer's `remote` goes through the packers (see
    /// [`EngineBuilder::packing`]).
    fn packs(&self, local: &MemoryRegion, remote: &MrDesc, bytes: u64, runs: u64) -> bool {
        remote.is_packed()
            && local.inner.device.is_none()
            && runs >= MIN_PACKED_RUNS
            && bytes < self.shared.pack_below.saturating_mul(runs)
            && (self.shared.packer.get().is_some() || !self.shared.link.on_worker())
    }

    /// Hands a packed request to the packer.
    fn submit_packed(&self, op: StagedOp) -> Result<Transfer> {
        let packer = self.packer()?;
        self.shared.packed.requests.fetch_add(1, Ordering::Relaxed);
        let completion = Completion::new(1);
        let guard = PartGuard::new(completion.clone());
        // A failed send drops the guard: the request ends with Shutdown.
        let _ = packer.tx.send(staging::Msg::Submit(op, guard));
        Ok(Transfer::new(completion))
    }

    /// Hands a staged request to the stager.
    fn submit_staged(&self, op: StagedOp) -> Result<Transfer> {
        let stager = self.stager(None)?;
        let completion = Completion::new(1);
        let guard = PartGuard::new(completion.clone());
        // A failed send drops the guard: the request ends with Shutdown.
        let _ = stager.tx.send(staging::Msg::Submit(op, guard));
        Ok(Transfer::new(completion))
    }

    /// Hands a staged part of a batch to the stager (which may fail to
    /// start: the part then ends with that error).
    fn submit_staged_part(&self, op: StagedOp, guard: PartGuard) {
        match self.stager(None) {
            // A failed send drops the guard: the part ends with Shutdown.
            Ok(stager) => drop(stager.tx.send(staging::Msg::Submit(op, guard))),
            Err(e) => guard.finish(Err(e)),
        }
    }

    /// Registers host memory with every NIC. `serve_packed`: a user's
    /// region, which peers may write packed into or read packed from when
    /// this engine packs and the region has remote access (its packer is
    /// started for it); false for the stagers' own pools.
    fn register_inner(
        &self,
        ptr: *mut u8,
        len: u64,
        access: Access,
        owned: Option<memory::Owner>,
        serve_packed: bool,
    ) -> Result<MemoryRegion> {
        if ptr.is_null() || len == 0 {
            return Err(Error::RegisterMemory { addr: ptr as usize, len, reason: "null or empty".into() });
        }
        if (ptr as u64).checked_add(len).is_none() {
            return Err(Error::RegisterMemory {
                addr: ptr as usize,
                len,
                reason: "range wraps the address space".into(),
            });
        }
        check_mapped(ptr, len)?;
        if self.shared.link.on_worker() {
            return Err(Error::WouldDeadlock("registering memory"));
        }
        let remote = access.remote_write || access.remote_read;
        let packer = match serve_packed && remote && self.shared.pack_below > 0 {
            true => match self.packer() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "the packer did not start: the region takes direct requests only");
                    None
                }
            },
            false => None,
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.link.send(Command::Register { ptr: ptr as usize, len, access, device: None, reply: tx })?;
        let registration = rx.recv().map_err(|_| Error::Shutdown)??;
        let base = if self.shared.virtual_addresses { ptr as u64 } else { 0 };
        let keys = registration.regions.iter().map(|r| r.key).collect();
        let descs = registration.regions.iter().map(|r| r.desc).collect();
        let packed = packer.is_some();
        let desc = MrDesc::with_packing(self.shared.address.clone(), base, len, access, keys, packed);
        let key = desc.key(0);
        let inner = Arc::new(MrInner::new(registration.id, ptr, len, descs, desc, owned, self.shared.link.clone()));
        if let Some(packer) = packer {
            let region = Arc::downgrade(&inner);
            packer.tx.send(staging::Msg::AddRegion { key, region }).map_err(|_| Error::Shutdown)?;
        }
        Ok(MemoryRegion { inner })
    }

    fn check_local(&self, region: &MemoryRegion) -> Result<()> {
        if !Arc::ptr_eq(&region.inner.link, &self.shared.link) {
            return Err(Error::InvalidRequest("the region is registered with another engine".into()));
        }
        Ok(())
    }

    fn check_peer(&self, peer: &EngineAddress) -> Result<()> {
        if peer.provider() != self.shared.kind {
            return Err(Error::InvalidRequest(format!(
                "peer runs on {} but this engine on {} (strait does not mix transports: both engines must use the same provider)",
                peer.provider(),
                self.shared.kind
            )));
        }
        Ok(())
    }

    fn rotation(&self) -> usize {
        self.shared.rotation.fetch_add(1, Ordering::Relaxed)
    }

    fn submit(&self, op: RequestOp) -> Result<Transfer> {
        let completion = Completion::new(1);
        self.submit_part(op, &completion)?;
        Ok(Transfer::driven(completion, self.shared.link.clone()))
    }

    fn submit_part(&self, op: RequestOp, completion: &Arc<Completion>) -> Result<()> {
        self.shared.link.send(Command::Submit(Submission {
            op,
            guard: PartGuard::new(completion.clone()),
            submitted: Instant::now(),
        }))
    }

    fn write_op(
        &self,
        src: Option<&MemoryRegion>,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<RequestOp> {
        self.check_write_target(dst)?;
        if let Some(src) = src {
            self.check_local(src)?;
        }
        // Staged memory reaches here only from a batch's scatter or barrier
        // (every other caller routes it to the stager first).
        if dst.is_staged() || src.is_some_and(|s| s.inner.staged()) {
            return Err(Error::InvalidRequest(
                "a batch's scatter or barrier does not take staged device memory: add each write to the batch".into(),
            ));
        }
        self.checked_write_op(src, src_offset, dst, dst_offset, len, imm)
    }

    /// The checks of a write that depend on its destination only.
    fn check_write_target(&self, dst: &MrDesc) -> Result<()> {
        self.check_peer(dst.owner())?;
        if !dst.access().remote_write {
            return Err(Error::RemoteAccess("the destination region does not allow remote writes".into()));
        }
        Ok(())
    }

    /// The checks of a read that depend on its source only.
    fn check_read_source(&self, src: &MrDesc) -> Result<()> {
        self.check_peer(src.owner())?;
        if !src.access().remote_read {
            return Err(Error::RemoteAccess("the source region does not allow remote reads".into()));
        }
        Ok(())
    }

    /// A write whose destination (`check_write_target`) and source region
    /// (`check_local`) were checked: checks the ranges and plans it.
    fn checked_write_op(
        &self,
        src: Option<&MemoryRegion>,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<RequestOp> {
        if len == 0 && imm.is_none() {
            return Err(Error::InvalidRequest("a zero-length write must carry an immediate".into()));
        }
        if let Some(src) = src {
            check_range("source", src_offset, len, src.len())?;
        }
        dst.check_range(dst_offset, len)?;
        let plan = ShardPlan::new(
            src_offset,
            dst_offset,
            len,
            self.rotation(),
            self.shared.nic_count,
            dst.owner().nic_count(),
            &self.shared.shard,
        );
        Ok(RequestOp::Write { src: src.map(|s| s.inner.clone()), dst: dst.clone(), plan, imm })
    }

    /// Writes `len` bytes from `src` at `src_offset` into the peer's region
    /// `dst` at `dst_offset`. With `imm`, the peer receives that immediate
    /// exactly once, after all bytes have landed (see [`crate::plan`]).
    /// Large writes are split across the NICs of both sides.
    pub fn write(
        &self,
        src: &MemoryRegion,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<Transfer> {
        if dst.is_staged() || src.inner.staged() {
            return self.staged_write(Some(src), src_offset, dst, dst_offset, len, imm);
        }
        let op = self.write_op(Some(src), src_offset, dst, dst_offset, len, imm)?;
        self.submit(op)
    }

    /// Delivers only an immediate to the owner of `dst` (a zero-length write).
    pub fn write_imm(&self, dst: &MrDesc, imm: u32) -> Result<Transfer> {
        if dst.is_staged() {
            return self.staged_write(None, 0, dst, 0, 0, Some(imm));
        }
        let op = self.write_op(None, 0, dst, 0, 0, Some(imm))?;
        self.submit(op)
    }

    fn staged_write(
        &self,
        src: Option<&MemoryRegion>,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<Transfer> {
        let op = self.staged_write_op(src, src_offset, dst, dst_offset, len, imm)?;
        self.submit_staged(op)
    }

    fn staged_write_op(
        &self,
        src: Option<&MemoryRegion>,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<StagedOp> {
        self.check_write_target(dst)?;
        if let Some(src) = src {
            self.check_local(src)?;
            check_range("source", src_offset, len, src.len())?;
        }
        if len == 0 && imm.is_none() {
            return Err(Error::InvalidRequest("a zero-length write must carry an immediate".into()));
        }
        dst.check_range(dst_offset, len)?;
        let src = src.map(|s| s.inner.clone());
        let groups = if len > 0 { vec![Strided::contiguous(src_offset, dst_offset, len)] } else { Vec::new() };
        Ok(StagedOp::Write { src, dst: dst.clone(), groups, imm })
    }

    /// Writes pages: page `src_pages[i]` of `src` to page `dst_pages[i]` of
    /// `dst`, with the geometry of `layout` (the KV-cache shape). Runs of
    /// pages consecutive on both sides are coalesced; pieces are spread across
    /// NICs. With `imm`, one immediate after all pages have landed.
    pub fn write_paged(
        &self,
        src: &MemoryRegion,
        dst: &MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    ) -> Result<Transfer> {
        if dst.is_staged() || src.inner.staged() {
            return self.staged_paged(src, dst, layout, src_pages, dst_pages, imm);
        }
        let short = layout.page_len < self.shared.pack_below && src_pages.len() as u64 >= MIN_PACKED_RUNS;
        if short && dst.is_packed() && src.inner.device.is_none() {
            // Packed if its coalesced runs are short too (the plan is made
            // twice otherwise: only for short pages toward packed regions).
            let op = self.staged_paged_op(src, dst, layout, src_pages.clone(), dst_pages.clone(), imm)?;
            let StagedOp::Write { groups, .. } = &op else { unreachable!("a paged write") };
            if self.packs(src, dst, groups.iter().map(Strided::len).sum(), groups.len() as u64) {
                return self.submit_packed(op);
            }
        }
        let op = self.paged_op(src, dst, layout, src_pages, dst_pages, imm)?;
        self.submit(op)
    }

    /// A paged write from or to staged device memory: the same checks and
    /// coalescing, the runs packed into staging slots (see [`staging`]).
    fn staged_paged(
        &self,
        src: &MemoryRegion,
        dst: &MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    ) -> Result<Transfer> {
        let op = self.staged_paged_op(src, dst, layout, src_pages, dst_pages, imm)?;
        self.submit_staged(op)
    }

    fn staged_paged_op(
        &self,
        src: &MemoryRegion,
        dst: &MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    ) -> Result<StagedOp> {
        self.check_local(src)?;
        self.check_write_target(dst)?;
        let mut plan = PagedPlan::new(layout, src_pages, dst_pages, src.len(), dst.len(), 0, 1, 1, u64::MAX)?;
        let mut groups = Vec::with_capacity(plan.count() as usize); // PagedPlan refuses no pages
        while let Some(p) = plan.next_piece() {
            groups.push(Strided::contiguous(p.src_offset, p.dst_offset, p.len));
        }
        Ok(StagedOp::Write { src: Some(src.inner.clone()), dst: dst.clone(), groups, imm })
    }

    fn paged_op(
        &self,
        src: &MemoryRegion,
        dst: &MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    ) -> Result<RequestOp> {
        self.check_local(src)?;
        self.check_write_target(dst)?;
        let plan = PagedPlan::new(
            layout,
            src_pages,
            dst_pages,
            src.len(),
            dst.len(),
            self.rotation(),
            self.shared.nic_count,
            dst.owner().nic_count(),
            self.shared.shard.max_piece,
        )?;
        Ok(RequestOp::Paged { src: src.inner.clone(), dst: dst.clone(), plan: Box::new(plan), imm })
    }

    /// Writes the strided copies of `list` from `src` (offsets from
    /// `src_base`) into the peer's region `dst` (offsets from `dst_base`),
    /// as one request: with `imm`, one immediate after every byte of every
    /// copy has landed. A head slice of a KV block (one run per token) or
    /// any other gather of many ranges costs one request, not one per
    /// range. The list was checked when it was built; a replay checks only
    /// that both bases keep it inside the regions, so replaying one list at
    /// many bases (one per layer) costs no work per range at submission.
    pub fn write_copies(
        &self,
        src: &MemoryRegion,
        src_base: u64,
        dst: &MrDesc,
        dst_base: u64,
        list: &CopyList,
        imm: Option<u32>,
    ) -> Result<Transfer> {
        if dst.is_staged() || src.inner.staged() {
            let op = self.staged_copies(src, src_base, dst, dst_base, list, imm, false)?;
            return self.submit_staged(op);
        }
        if self.packs(src, dst, list.bytes(), list.rows()) {
            let op = self.staged_copies(src, src_base, dst, dst_base, list, imm, false)?;
            return self.submit_packed(op);
        }
        let op = self.copies_op(src, src_base, dst, dst_base, list, imm, false)?;
        self.submit(op)
    }

    /// Reads the strided copies of `list` from the peer's region `src`
    /// (offsets from `src_base`) into `dst` (offsets from `dst_base`), as
    /// one request (the peer's region needs remote read access).
    pub fn read_copies(
        &self,
        dst: &MemoryRegion,
        dst_base: u64,
        src: &MrDesc,
        src_base: u64,
        list: &CopyList,
    ) -> Result<Transfer> {
        if src.is_staged() || dst.inner.staged() {
            let op = self.staged_copies(dst, dst_base, src, src_base, list, None, true)?;
            return self.submit_staged(op);
        }
        if self.packs(dst, src, list.bytes(), list.rows()) {
            let op = self.staged_copies(dst, dst_base, src, src_base, list, None, true)?;
            return self.submit_packed(op);
        }
        let op = self.copies_op(dst, dst_base, src, src_base, list, None, true)?;
        self.submit(op)
    }

    /// A strided copy list from or to staged device memory, or packed:
    /// checked as `copies_op` checks it, its copies as the stager's groups
    /// (packed into slots between rows).
    #[allow(clippy::too_many_arguments)]
    fn staged_copies(
        &self,
        local: &MemoryRegion,
        local_base: u64,
        remote: &MrDesc,
        remote_base: u64,
        list: &CopyList,
        imm: Option<u32>,
        read: bool,
    ) -> Result<StagedOp> {
        self.check_local(local)?;
        let (src_base, dst_base, src_len, dst_len) = if read {
            self.check_read_source(remote)?;
            (remote_base, local_base, remote.len(), local.len())
        } else {
            self.check_write_target(remote)?;
            (local_base, remote_base, local.len(), remote.len())
        };
        // The plan's checks (extents inside both regions), not its pieces.
        StridedPlan::new(list, src_base, dst_base, src_len, dst_len, 0, 1, 1, u64::MAX, 1)?;
        // One group per copy, at the bases (the stagers walk the rows).
        let at =
            |c: &Strided| Strided { src_offset: src_base + c.src_offset, dst_offset: dst_base + c.dst_offset, ..*c };
        let groups = list.copies().iter().map(at).collect();
        if read {
            // (offsets in the peer's region, offsets in the local one)
            Ok(StagedOp::Read { dst: local.inner.clone(), src: remote.clone(), groups })
        } else {
            Ok(StagedOp::Write { src: Some(local.inner.clone()), dst: remote.clone(), groups, imm })
        }
    }

    /// `local`/`local_base` is the source of a write and the destination of
    /// a read; the list's source side is always where bytes come from.
    #[allow(clippy::too_many_arguments)]
    fn copies_op(
        &self,
        local: &MemoryRegion,
        local_base: u64,
        remote: &MrDesc,
        remote_base: u64,
        list: &CopyList,
        imm: Option<u32>,
        read: bool,
    ) -> Result<RequestOp> {
        self.check_local(local)?;
        let (nics, remote_nics) = (self.shared.nic_count, remote.owner().nic_count());
        let max_piece = self.shared.shard.max_piece;
        // The list's source side is where bytes come from: the remote
        // region for a read, the local one for a write.
        let (src_base, dst_base, src_len, dst_len) = if read {
            self.check_read_source(remote)?;
            (remote_base, local_base, remote.len(), local.len())
        } else {
            self.check_write_target(remote)?;
            (local_base, remote_base, local.len(), remote.len())
        };
        let plan = StridedPlan::new(
            list,
            src_base,
            dst_base,
            src_len,
            dst_len,
            self.rotation(),
            nics,
            remote_nics,
            max_piece,
            self.shared.max_rows,
        )?;
        Ok(RequestOp::Strided { local: local.inner.clone(), remote: remote.clone(), plan: Box::new(plan), imm, read })
    }

    /// Writes parts of `src` to several peers (or several places of one
    /// peer), each with its own range and optional immediate. One handle for
    /// all: it succeeds when every target has, else carries the first error.
    /// Every target is validated before any is posted.
    pub fn scatter(&self, src: &MemoryRegion, targets: &[ScatterTarget]) -> Result<Transfer> {
        if src.inner.staged() || targets.iter().any(|t| t.dst.is_staged()) {
            // Staged memory: the same checks, each target a write of a
            // joined batch (staged ones through the stager).
            if targets.is_empty() {
                return Err(Error::InvalidRequest("scatter with no targets".into()));
            }
            check_disjoint(targets)?;
            let mut batch = self.batch();
            for t in targets {
                batch.write(src, t.src_offset, &t.dst, t.dst_offset, t.len, t.imm)?;
            }
            return batch.submit_joined();
        }
        let ops = self.scatter_ops(src, targets)?;
        self.submit_all(ops)
    }

    fn scatter_ops(&self, src: &MemoryRegion, targets: &[ScatterTarget]) -> Result<Vec<RequestOp>> {
        if targets.is_empty() {
            return Err(Error::InvalidRequest("scatter with no targets".into()));
        }
        check_disjoint(targets)?;
        targets.iter().map(|t| self.write_op(Some(src), t.src_offset, &t.dst, t.dst_offset, t.len, t.imm)).collect()
    }

    /// Delivers immediate `imm` to the owner of each descriptor (one per
    /// peer): a barrier's signal. Succeeds once every peer has it.
    pub fn barrier(&self, peers: &[MrDesc], imm: u32) -> Result<Transfer> {
        if peers.iter().any(MrDesc::is_staged) {
            if peers.is_empty() {
                return Err(Error::InvalidRequest("barrier with no peers".into()));
            }
            let mut batch = self.batch();
            for p in peers {
                batch.write_imm(p, imm)?;
            }
            return batch.submit_joined();
        }
        let ops = self.barrier_ops(peers, imm)?;
        self.submit_all(ops)
    }

    fn barrier_ops(&self, peers: &[MrDesc], imm: u32) -> Result<Vec<RequestOp>> {
        if peers.is_empty() {
            return Err(Error::InvalidRequest("barrier with no peers".into()));
        }
        peers.iter().map(|d| self.write_op(None, 0, d, 0, 0, Some(imm))).collect()
    }

    /// Submits `ops` (at least one) as the parts of one request, in one
    /// message to the worker.
    fn submit_all(&self, ops: Vec<RequestOp>) -> Result<Transfer> {
        let link = &self.shared.link;
        let completion = Completion::new(ops.len() as u32);
        let submissions = {
            let submitted = Instant::now();
            ops.into_iter().map(|op| Submission { op, guard: PartGuard::new(completion.clone()), submitted }).collect()
        };
        // A failed send means the engine is gone: the guards inside the
        // dropped command report Shutdown, so the handle still ends with
        // exactly one outcome.
        let _ = link.send(Command::SubmitBatch(submissions));
        Ok(Transfer::driven(completion, link.clone()))
    }

    /// Reads `len` bytes of the peer's region `src` at `src_offset` into
    /// `dst` at `dst_offset` (one-sided; the peer's region needs remote read
    /// access). Split across NICs like writes.
    pub fn read(
        &self,
        dst: &MemoryRegion,
        dst_offset: u64,
        src: &MrDesc,
        src_offset: u64,
        len: u64,
    ) -> Result<Transfer> {
        self.check_local(dst)?;
        self.check_read_source(src)?;
        if len == 0 {
            return Err(Error::InvalidRequest("zero-length read".into()));
        }
        check_range("destination", dst_offset, len, dst.len())?;
        check_range("source", src_offset, len, src.len())?;
        if src.is_staged() || dst.inner.staged() {
            let (dst, src) = (dst.inner.clone(), src.clone());
            let groups = vec![Strided::contiguous(src_offset, dst_offset, len)];
            return self.submit_staged(StagedOp::Read { dst, src, groups });
        }
        let plan = ShardPlan::new(
            dst_offset,
            src_offset,
            len,
            self.rotation(),
            self.shared.nic_count,
            src.owner().nic_count(),
            &self.shared.shard,
        );
        self.submit(RequestOp::Read { local: dst.inner.clone(), remote: src.clone(), plan })
    }

    /// Sends `len` bytes of `src` at `offset` as one message to `peer`
    /// (two-sided: it lands in one of the peer's receive buffers, so it must
    /// fit in one).
    pub fn send(&self, peer: &EngineAddress, src: &MemoryRegion, offset: u64, len: u64) -> Result<Transfer> {
        self.check_local(src)?;
        self.check_peer(peer)?;
        check_range("source", offset, len, src.len())?;
        if len > self.shared.max_send {
            return Err(Error::InvalidRequest(format!(
                "a send of {len} bytes is longer than this transport's largest message, {} bytes (EFA's \
                 efa-direct fabric: the device's MTU); write larger payloads into a peer's region instead",
                self.shared.max_send
            )));
        }
        // Every send from device memory goes through the stager, direct
        // registrations too: EFA sends from its own host buffers, copied by
        // the CPU.
        if src.inner.device.is_some() {
            let (peer, src) = (peer.clone(), src.inner.clone());
            return self.submit_staged(StagedOp::Send { peer, src, offset, len });
        }
        self.submit(RequestOp::Send {
            peer: peer.clone(),
            src: src.inner.clone(),
            offset,
            len,
            rotation: self.rotation(),
        })
    }

    /// The longest message [`send`](Self::send) takes on this transport:
    /// unlimited (`u64::MAX`) except on EFA, where sends go from staging
    /// buffers of the receive buffers' size (see
    /// [`EngineBuilder::receive_buffers`]), and on its efa-direct fabric at
    /// most the device's MTU (about 8 KiB). A peer's receive buffers bound
    /// it too.
    pub fn max_send_size(&self) -> u64 {
        self.shared.max_send
    }

    /// The next two-sided message received, waiting up to `timeout`.
    /// Unavailable when an [`on_message`](EngineBuilder::on_message) callback
    /// was configured.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Vec<u8>> {
        receive(&self.shared.link, self.shared.messages.as_ref(), timeout, "messages go to the on_message callback")
    }

    /// The next immediate no counter claimed, waiting up to `timeout`; only
    /// with [`EngineBuilder::unclaimed_imm_queue`].
    pub fn next_imm(&self, timeout: Duration) -> Result<u32> {
        receive(&self.shared.link, self.shared.imm_queue.as_ref(), timeout, "no unclaimed-immediate queue configured")
    }

    /// A counter that is reached once `count` immediates of `value` have
    /// arrived (counting those that arrived before this call and were not
    /// yet claimed). One armed counter per value at a time.
    ///
    /// Values from [`RESERVED_IMM_BASE`](crate::RESERVED_IMM_BASE) up are
    /// refused: they are counted through an [`ImmSlot`] (see
    /// [`imm_slot`](Self::imm_slot)).
    pub fn expect_imm(&self, value: u32, count: u64) -> Result<ImmCounter> {
        if value >= reserved::RESERVED_IMM_BASE {
            return Err(Error::InvalidRequest(format!(
                "immediate {value:#x} is reserved (from {:#x} up); count it through an ImmSlot",
                reserved::RESERVED_IMM_BASE
            )));
        }
        self.shared.imm.expect(value, count)
    }

    /// A slot of 256 reserved immediates in `space`, unique on this engine
    /// while held (see [the scheme](crate::RESERVED_IMM_BASE) in
    /// [`ImmSlot`]'s docs and `reserved_imm`).
    pub fn imm_slot(&self, space: ImmSpace) -> Result<ImmSlot> {
        reserved::new_slot(self, space)
    }

    /// Registers `handler` for service messages (see [`MessagePool`]); it
    /// runs on the thread driving the engine, like other callbacks. The
    /// returned [`Service`] names its id and unregisters it when dropped.
    pub fn serve(&self, handler: impl Fn(&[u8]) + Send + Sync + 'static) -> Result<Service> {
        reserved::serve(self, handler)
    }

    /// A snapshot of what this engine has done and has in flight: per NIC
    /// and per peer, operations and bytes posted, completions, errors by
    /// kind, immediates and messages, requests in flight and the oldest's
    /// age, expiries; request completion times by kind (see
    /// [`stats::EngineStats`], and its `table` and `prometheus` renderings).
    /// The counters cost the worker a few integer adds per operation; the
    /// snapshot is a round trip to it.
    pub fn stats(&self) -> Result<stats::EngineStats> {
        if self.shared.link.on_worker() {
            return Err(Error::WouldDeadlock("taking a stats snapshot"));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.link.send(Command::Stats { reply: tx })?;
        let mut s = rx.recv().map_err(|_| Error::Shutdown)?;
        s.packed = self.shared.packed.snapshot();
        let labels = self.shared.labels.lock().unwrap_or_else(|e| e.into_inner());
        for p in &mut s.peers {
            p.label = labels.get(&p.address).cloned();
        }
        Ok(s)
    }

    /// Names `peer` in [`stats`](Self::stats) (e.g. `"decode-3"`).
    pub fn label_peer(&self, peer: &EngineAddress, label: impl Into<String>) {
        self.shared.labels.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.clone(), label.into());
    }

    /// A zero-length write of [`PING_IMM`](crate::PING_IMM) to the owner of
    /// `peer` (a descriptor with remote write access), which counts it
    /// nowhere: it succeeds when the peer's engine is reachable and alive,
    /// and fails like any write when it is not (within the request
    /// timeout).
    pub fn ping(&self, peer: &MrDesc) -> Result<Transfer> {
        if peer.is_staged() {
            return self.staged_write(None, 0, peer, 0, 0, Some(reserved::PING_IMM));
        }
        let op = self.write_op(None, 0, peer, 0, 0, Some(reserved::PING_IMM))?;
        self.submit(op)
    }

    /// An empty [`Batch`]: requests added to it are checked as they are
    /// added and handed to the worker together.
    pub fn batch(&self) -> Batch<'_> {
        Batch { engine: self, ops: Vec::new(), parts: Vec::new(), staged: Vec::new() }
    }

    /// Stops the worker now (clones of the handle then fail with
    /// [`Error::Shutdown`]). In-flight requests end with `Shutdown`.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

/// Requests submitted together: each is checked when it is added (an
/// invalid one is refused there, and nothing of the batch has been posted),
/// and [`submit`](Self::submit) hands them all to the worker in one
/// message, so the whole batch costs one queue operation and at most one
/// wake-up, and the worker posts it in one round (one doorbell per NIC
/// where the backend chains work requests). The semantics of each request
/// are exactly those of the single call of the same name: its own outcome,
/// its own immediate after its own bytes; nothing orders the requests of a
/// batch among themselves.
///
/// ```no_run
/// # fn main() -> strait::Result<()> {
/// # let engine = strait::TransferEngine::builder().build()?;
/// # let src = engine.alloc(1 << 20, strait::Access::LOCAL)?;
/// # let dst: strait::MrDesc = todo!();
/// let mut batch = engine.batch();
/// for layer in 0..32u64 {
///     batch.write(&src, layer * 4096, &dst, layer * 4096, 4096, None)?;
/// }
/// batch.write_imm(&dst, 7)?; // not ordered after the writes: count it at the target
/// let all = batch.submit_joined()?; // one handle: the first error, else success
/// all.wait()?;
/// # Ok(()) }
/// ```
pub struct Batch<'a> {
    engine: &'a TransferEngine,
    ops: Vec<RequestOp>,
    /// Operations per request, in order (a scatter is several).
    parts: Vec<u32>,
    /// Requests that move staged device memory, with their index: they go
    /// to the stager, not to the worker (one part each, none in `ops`).
    staged: Vec<(usize, StagedOp)>,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").field("requests", &self.parts.len()).finish()
    }
}

impl Batch<'_> {
    /// Adds a [`TransferEngine::write`].
    pub fn write(
        &mut self,
        src: &MemoryRegion,
        src_offset: u64,
        dst: &MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<&mut Self> {
        if dst.is_staged() || src.inner.staged() {
            let op = self.engine.staged_write_op(Some(src), src_offset, dst, dst_offset, len, imm)?;
            return Ok(self.push_staged(op));
        }
        let op = self.engine.write_op(Some(src), src_offset, dst, dst_offset, len, imm)?;
        Ok(self.push(std::iter::once(op)))
    }

    /// Adds many [`TransferEngine::write`]s from `src` into `dst`, one per
    /// `(src_offset, dst_offset, len)`, each with `imm` if given (so the
    /// target counts one per write). The peer, the access and the region
    /// are checked once, each range on its own; on a range outside either
    /// region ([`Error::OutOfBounds`]) or a zero-length write without an
    /// immediate (its index in the message), nothing of this call is added.
    pub fn writes(
        &mut self,
        src: &MemoryRegion,
        dst: &MrDesc,
        ranges: impl IntoIterator<Item = (u64, u64, u64)>,
        imm: Option<u32>,
    ) -> Result<&mut Self> {
        let engine = self.engine;
        engine.check_write_target(dst)?;
        engine.check_local(src)?;
        if dst.is_staged() || src.inner.staged() {
            let (staged_before, parts_before) = (self.staged.len(), self.parts.len());
            for (i, (src_offset, dst_offset, len)) in ranges.into_iter().enumerate() {
                match engine.staged_write_op(Some(src), src_offset, dst, dst_offset, len, imm) {
                    Ok(op) => {
                        self.push_staged(op);
                    }
                    Err(e) => {
                        self.staged.truncate(staged_before);
                        self.parts.truncate(parts_before);
                        return Err(match e {
                            Error::InvalidRequest(m) => Error::InvalidRequest(format!("write {i} of the batch: {m}")),
                            e => e,
                        });
                    }
                }
            }
            return Ok(self);
        }
        let (ops_before, parts_before) = (self.ops.len(), self.parts.len());
        for (i, (src_offset, dst_offset, len)) in ranges.into_iter().enumerate() {
            match engine.checked_write_op(Some(src), src_offset, dst, dst_offset, len, imm) {
                Ok(op) => {
                    self.ops.push(op);
                    self.parts.push(1);
                }
                Err(e) => {
                    self.ops.truncate(ops_before);
                    self.parts.truncate(parts_before);
                    return Err(match e {
                        Error::InvalidRequest(m) => Error::InvalidRequest(format!("write {i} of the batch: {m}")),
                        e => e,
                    });
                }
            }
        }
        Ok(self)
    }

    /// Adds a [`TransferEngine::write_imm`].
    pub fn write_imm(&mut self, dst: &MrDesc, imm: u32) -> Result<&mut Self> {
        if dst.is_staged() {
            let op = self.engine.staged_write_op(None, 0, dst, 0, 0, Some(imm))?;
            return Ok(self.push_staged(op));
        }
        let op = self.engine.write_op(None, 0, dst, 0, 0, Some(imm))?;
        Ok(self.push(std::iter::once(op)))
    }

    /// Adds a [`TransferEngine::write_paged`].
    pub fn write_paged(
        &mut self,
        src: &MemoryRegion,
        dst: &MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    ) -> Result<&mut Self> {
        if dst.is_staged() || src.inner.staged() {
            let op = self.engine.staged_paged_op(src, dst, layout, src_pages, dst_pages, imm)?;
            return Ok(self.push_staged(op));
        }
        let op = self.engine.paged_op(src, dst, layout, src_pages, dst_pages, imm)?;
        Ok(self.push(std::iter::once(op)))
    }

    /// Adds a [`TransferEngine::write_copies`].
    pub fn write_copies(
        &mut self,
        src: &MemoryRegion,
        src_base: u64,
        dst: &MrDesc,
        dst_base: u64,
        list: &CopyList,
        imm: Option<u32>,
    ) -> Result<&mut Self> {
        if dst.is_staged() || src.inner.staged() {
            let op = self.engine.staged_copies(src, src_base, dst, dst_base, list, imm, false)?;
            return Ok(self.push_staged(op));
        }
        let op = self.engine.copies_op(src, src_base, dst, dst_base, list, imm, false)?;
        Ok(self.push(std::iter::once(op)))
    }

    /// Adds a [`TransferEngine::scatter`] (one request of several parts).
    pub fn scatter(&mut self, src: &MemoryRegion, targets: &[ScatterTarget]) -> Result<&mut Self> {
        let ops = self.engine.scatter_ops(src, targets)?;
        Ok(self.push(ops))
    }

    /// Adds a [`TransferEngine::barrier`] (one request of a part per peer).
    pub fn barrier(&mut self, peers: &[MrDesc], imm: u32) -> Result<&mut Self> {
        let ops = self.engine.barrier_ops(peers, imm)?;
        Ok(self.push(ops))
    }

    fn push_staged(&mut self, op: StagedOp) -> &mut Self {
        self.staged.push((self.parts.len(), op));
        self.parts.push(1);
        self
    }

    fn push(&mut self, ops: impl IntoIterator<Item = RequestOp>) -> &mut Self {
        let before = self.ops.len();
        self.ops.extend(ops);
        self.parts.push((self.ops.len() - before) as u32);
        self
    }

    /// Requests added so far.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Submits every request; one [`Transfer`] per request, in the order
    /// they were added. An empty batch gives an empty list.
    pub fn submit(self) -> Result<Vec<Transfer>> {
        let link = &self.engine.shared.link;
        let mut transfers = Vec::with_capacity(self.parts.len());
        let mut submissions = Vec::with_capacity(self.ops.len());
        let mut ops = self.ops.into_iter();
        let mut staged = self.staged.into_iter().peekable();
        let submitted = Instant::now();
        for (i, &parts) in self.parts.iter().enumerate() {
            let completion = Completion::new(parts);
            if let Some((_, op)) = staged.next_if(|(r, _)| *r == i) {
                self.engine.submit_staged_part(op, PartGuard::new(completion.clone()));
            } else {
                for op in ops.by_ref().take(parts as usize) {
                    submissions.push(Submission { op, guard: PartGuard::new(completion.clone()), submitted });
                }
            }
            transfers.push(Transfer::driven(completion, link.clone()));
        }
        if !submissions.is_empty() {
            // On failure (shutdown) the dropped guards end every request
            // with Shutdown; the handles still report it.
            let _ = link.send(Command::SubmitBatch(submissions));
        }
        Ok(transfers)
    }

    /// Submits every request with one [`Transfer`] for the whole batch: it
    /// succeeds when every request has, else carries the first error.
    /// Fails with [`Error::InvalidRequest`] on an empty batch.
    pub fn submit_joined(self) -> Result<Transfer> {
        if self.ops.is_empty() && self.staged.is_empty() {
            return Err(Error::InvalidRequest("an empty batch".into()));
        }
        if self.staged.is_empty() {
            return self.engine.submit_all(self.ops);
        }
        let completion = Completion::new((self.ops.len() + self.staged.len()) as u32);
        let submitted = Instant::now();
        let submissions: Vec<Submission> = self
            .ops
            .into_iter()
            .map(|op| Submission { op, guard: PartGuard::new(completion.clone()), submitted })
            .collect();
        for (_, op) in self.staged {
            self.engine.submit_staged_part(op, PartGuard::new(completion.clone()));
        }
        if !submissions.is_empty() {
            let _ = self.engine.shared.link.send(Command::SubmitBatch(submissions));
        }
        Ok(Transfer::driven(completion, self.engine.shared.link.clone()))
    }
}
