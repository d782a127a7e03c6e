//! The engine: builder, memory, descriptors, one-sided and two-sided
//! requests, completions and immediate counters.

use std::ffi::{c_char, c_void};
use std::sync::Mutex;
use std::time::Duration;

use strait_rs::{
    Access, CopyList, EngineAddress, EngineBuilder, ImmCounter, ImmSlot, ImmSpace, MemoryRegion, MessagePool, MrDesc,
    PagedLayout, PollMode, Provider, ProviderKind, ScatterTarget, Service, ShardConfig, Strided, Transfer,
    TransferEngine,
};

use crate::{
    bytes_out, call, call_status, clear_out, fail, get, get_mut, handle, message_of, new_handle, outcome_status, put,
    slice, string, take, timeout_of, CResult, Fail, UserData,
};
use crate::{strait_status, strait_status as S};

// ---- Constants -----------------------------------------------------------

/// Which transport an engine uses (`strait_builder_set_provider`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum strait_provider {
    /// The best available: EFA, then verbs (ConnectX), then tcp.
    Auto = 0,
    /// AWS EFA through libfabric `efa`.
    Efa = 1,
    /// libfabric `tcp;ofi_rxm`: any Ethernet, and loopback.
    Tcp = 2,
    /// libfabric `shm`: processes on one host.
    Shm = 3,
    /// NVIDIA ConnectX through libibverbs (RC queue pairs).
    Verbs = 4,
}

/// Peers may write into the region (and deliver immediates through it).
/// Local use (source of writes and sends, destination of reads) is always
/// allowed; `0` is local only.
pub const STRAIT_ACCESS_REMOTE_WRITE: u32 = 1;
/// Peers may read the region.
pub const STRAIT_ACCESS_REMOTE_READ: u32 = 2;

fn access_of(flags: u32) -> CResult<Access> {
    if flags & !(STRAIT_ACCESS_REMOTE_WRITE | STRAIT_ACCESS_REMOTE_READ) != 0 {
        return Err(fail(S::InvalidRequest, format!("unknown access flags {flags:#x}")));
    }
    Ok(Access {
        remote_write: flags & STRAIT_ACCESS_REMOTE_WRITE != 0,
        remote_read: flags & STRAIT_ACCESS_REMOTE_READ != 0,
    })
}

fn provider_code(kind: ProviderKind) -> u32 {
    match kind {
        ProviderKind::Efa => strait_provider::Efa as u32,
        ProviderKind::Tcp => strait_provider::Tcp as u32,
        ProviderKind::Shm => strait_provider::Shm as u32,
        ProviderKind::Verbs => strait_provider::Verbs as u32,
        _ => strait_provider::Auto as u32,
    }
}

/// An optional immediate argument: NULL is none.
///
/// # Safety
/// `imm` is NULL or readable.
unsafe fn imm_arg(imm: *const u32) -> Option<u32> {
    // SAFETY: NULL or readable by the caller's contract.
    unsafe { imm.as_ref().copied() }
}

// ---- Callback types ------------------------------------------------------

/// A request's completion: its status, the error message (NULL on success;
/// valid during the call only) and the caller's `user_data`. Runs on the
/// engine's thread (or at once on the caller's, if the request had already
/// ended): keep it short, do not block, and do not call strait functions
/// that wait on the engine (register, stats, waits).
pub type strait_done_fn =
    Option<unsafe extern "C" fn(status: strait_status, message: *const c_char, user_data: *mut c_void)>;

/// A two-sided message (`strait_builder_set_on_message`, services): its
/// bytes, valid during the call only. Runs on the engine's thread.
pub type strait_message_fn = Option<unsafe extern "C" fn(data: *const u8, len: usize, user_data: *mut c_void)>;

/// An immediate (a counter reaching its count, or an unclaimed immediate).
/// Runs on the engine's thread.
pub type strait_imm_fn = Option<unsafe extern "C" fn(imm: u32, user_data: *mut c_void)>;

/// Runs `cb` with an outcome.
pub(crate) fn report(
    cb: unsafe extern "C" fn(strait_status, *const c_char, *mut c_void),
    user: UserData,
    r: &strait_rs::Result<()>,
) {
    let message = message_of(r);
    let status = match r {
        Ok(()) => S::Ok,
        Err(e) => crate::status_of(e),
    };
    // SAFETY: the caller registered `cb` with this `user_data`; the message
    // lives across the call.
    unsafe { cb(status, message.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()), user.get()) };
}

// ---- Builder -------------------------------------------------------------

/// Options of an engine to be created. Not thread-safe: configure it from
/// one thread. Reusable: `strait_engine_create` does not consume it.
#[derive(Debug)]
pub struct strait_builder {
    _opaque: [u8; 0],
}

#[derive(Clone, Default)]
pub(crate) struct BuilderState {
    provider: Option<Provider>,
    nics: Option<usize>,
    interface: Option<String>,
    efa_fabric: Option<strait_rs::EfaFabric>,
    gpu: Option<usize>,
    packing: Option<u64>,
    poll: Option<PollMode>,
    cpu: Option<usize>,
    timeout: Option<Option<Duration>>,
    receive: Option<(usize, usize)>,
    shard: Option<ShardConfig>,
    imm_queue: bool,
    on_message: Option<(unsafe extern "C" fn(*const u8, usize, *mut c_void), UserData)>,
    on_unclaimed: Option<(unsafe extern "C" fn(u32, *mut c_void), UserData)>,
}
handle!(strait_builder, BuilderState, 0x5354_4255_494c_4431);

impl BuilderState {
    fn builder(&self) -> EngineBuilder {
        let mut b = TransferEngine::builder();
        if let Some(p) = self.provider {
            b = b.provider(p);
        }
        if let Some(n) = self.nics {
            b = b.nics(n);
        }
        if let Some(i) = &self.interface {
            b = b.interface(i.clone());
        }
        if let Some(f) = self.efa_fabric {
            b = b.efa_fabric(f);
        }
        if let Some(g) = self.gpu {
            b = b.for_gpu(g);
        }
        if let Some(p) = self.packing {
            b = b.packing(p);
        }
        if let Some(p) = self.poll {
            b = b.poll_mode(p);
        }
        if let Some(cpu) = self.cpu {
            b = b.pin_worker(cpu);
        }
        if let Some(t) = self.timeout {
            b = b.request_timeout(t);
        }
        if let Some((count, size)) = self.receive {
            b = b.receive_buffers(count, size);
        }
        if let Some(s) = self.shard {
            b = b.shard_config(s);
        }
        if self.imm_queue {
            b = b.unclaimed_imm_queue();
        }
        if let Some((cb, user)) = self.on_message {
            // SAFETY: the caller registered `cb` with `user`; the bytes live
            // across the call.
            b = b.on_message(move |m| unsafe { cb(m.as_ptr(), m.len(), user.get()) });
        }
        if let Some((cb, user)) = self.on_unclaimed {
            // SAFETY: as above.
            b = b.on_unclaimed_imm(move |imm| unsafe { cb(imm, user.get()) });
        }
        b
    }
}

/// A builder with every option at its default (provider auto, 1 NIC,
/// adaptive polling, the default request timeout, 64 receive buffers of
/// 64 KiB, messages queued for `strait_recv`, unclaimed immediates kept for
/// a later `strait_expect_imm`).
#[no_mangle]
pub unsafe extern "C" fn strait_builder_create(out: *mut *mut strait_builder) -> strait_status {
    // SAFETY: `out` is NULL or writable (header contract).
    call(|| unsafe { put(out, new_handle::<strait_builder>(BuilderState::default()), "out") })
}

/// Frees a builder (NULL: nothing). Engines created from it are unaffected.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_destroy(builder: *mut strait_builder) -> strait_status {
    // SAFETY: NULL or a handle (header contract).
    call(|| unsafe { take::<strait_builder>(builder, "builder") }.map(drop))
}

/// Runs `f` on the builder's state.
///
/// # Safety
/// `b` is NULL or a handle used by this thread only.
unsafe fn with_builder(b: *mut strait_builder, f: impl FnOnce(&mut BuilderState) -> CResult) -> strait_status {
    // SAFETY: as the caller's contract says.
    call(|| f(unsafe { get_mut::<strait_builder>(b, "builder")? }))
}

/// The provider: a `strait_provider` value.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_provider(builder: *mut strait_builder, provider: u32) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.provider = Some(match provider {
                0 => Provider::Auto,
                1 => Provider::Efa,
                2 => Provider::Tcp,
                3 => Provider::Shm,
                4 => Provider::Verbs,
                p => return Err(fail(S::InvalidRequest, format!("unknown provider {p}"))),
            });
            Ok(())
        })
    }
}

/// NICs in the engine's group (1 to 8; default 1). Large requests are
/// split across them.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_nics(builder: *mut strait_builder, nics: u32) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.nics = Some(nics as usize);
            Ok(())
        })
    }
}

/// The network interface (tcp: e.g. `"lo"`; NULL: the provider's choice).
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_interface(
    builder: *mut strait_builder,
    interface: *const c_char,
) -> strait_status {
    // SAFETY: header contract; `interface` is NULL or NUL-terminated.
    unsafe {
        with_builder(builder, |b| {
            b.interface = if interface.is_null() { None } else { Some(string(interface, "interface")?.to_owned()) };
            Ok(())
        })
    }
}

/// EFA only: the fabric to open, `"efa"` (the default: the provider's RDM
/// protocol) or `"efa-direct"` (libfabric 2.1+: device-direct; an engine
/// introduces itself before its first write or read to a peer, and sends
/// are limited to the device's MTU). Every engine of a job must open the
/// same one.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_efa_fabric(
    builder: *mut strait_builder,
    fabric: *const c_char,
) -> strait_status {
    // SAFETY: header contract; `fabric` is NUL-terminated.
    unsafe {
        with_builder(builder, |b| {
            b.efa_fabric = Some(string(fabric, "fabric")?.parse()?);
            Ok(())
        })
    }
}

/// Use the RDMA NICs nearest to GPU `gpu` (PCI address order), read from
/// sysfs when the engine is created: those behind its PCIe switch, else on
/// its NUMA node. Creating the engine fails with `INVALID_REQUEST` when the
/// machine has no such GPU.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_gpu(builder: *mut strait_builder, gpu: u32) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.gpu = Some(gpu as usize);
            Ok(())
        })
    }
}

/// Packs strided copies and paged writes whose runs average fewer than
/// `runs_below` bytes (0: never): their runs are gathered and moved in
/// chunks of 2 MiB, and the target copies them into place before it
/// answers. Without this call, the provider's figure: 64 KiB on tcp
/// (whose cost is per operation), never elsewhere.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_packing(builder: *mut strait_builder, runs_below: u64) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.packing = Some(runs_below);
            Ok(())
        })
    }
}

/// Busy polling: the worker never sleeps (lowest latency, one core).
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_poll_busy(builder: *mut strait_builder) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.poll = Some(PollMode::Busy);
            Ok(())
        })
    }
}

/// Adaptive polling (the default): spin `spin_us` microseconds after the
/// last work, then sleep until a completion or a request arrives.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_poll_adaptive(builder: *mut strait_builder, spin_us: u64) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.poll = Some(PollMode::Adaptive { spin: Duration::from_micros(spin_us) });
            Ok(())
        })
    }
}

/// Pins the engine's worker thread to CPU `cpu` (negative: not pinned).
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_pin_worker(builder: *mut strait_builder, cpu: i32) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.cpu = usize::try_from(cpu).ok();
            Ok(())
        })
    }
}

/// How long a request may wait while its peer completes none of this
/// engine's operations before it fails with `PEER_UNREACHABLE`; 0 or
/// `STRAIT_WAIT_FOREVER`: no limit. Default 10 s (see the Rust
/// `EngineBuilder::request_timeout`).
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_request_timeout_ms(
    builder: *mut strait_builder,
    timeout_ms: u64,
) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.timeout = Some(timeout_of(timeout_ms).filter(|t| !t.is_zero()));
            Ok(())
        })
    }
}

/// Receive buffers for two-sided messages: `count` of `size` bytes each
/// (default 64 of 64 KiB). A peer's message must fit in one.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_receive_buffers(
    builder: *mut strait_builder,
    count: usize,
    size: usize,
) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.receive = Some((count, size));
            Ok(())
        })
    }
}

/// How requests are cut into pieces: no piece shorter than `min_piece`
/// (unless the request is), none longer than `max_piece`, boundaries at
/// multiples of `align` (a power of two). Defaults 256 KiB, 4 MiB, 4 KiB.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_shard(
    builder: *mut strait_builder,
    min_piece: u64,
    max_piece: u64,
    align: u64,
) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            if align == 0 || !align.is_power_of_two() || min_piece == 0 || max_piece < min_piece {
                return Err(fail(
                    S::InvalidRequest,
                    format!("shard sizes min {min_piece}, max {max_piece}, align {align}"),
                ));
            }
            b.shard = Some(ShardConfig { min_piece, max_piece, align });
            Ok(())
        })
    }
}

/// Queues immediates no counter claims, for `strait_next_imm`, instead of
/// keeping them for a later `strait_expect_imm`.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_unclaimed_imm_queue(builder: *mut strait_builder) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.imm_queue = true;
            b.on_unclaimed = None;
            Ok(())
        })
    }
}

/// Delivers immediates no counter claims to `callback` (on the engine's
/// thread) instead of keeping them. NULL restores the default.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_on_unclaimed_imm(
    builder: *mut strait_builder,
    callback: strait_imm_fn,
    user_data: *mut c_void,
) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.on_unclaimed = callback.map(|cb| (cb, UserData(user_data)));
            if b.on_unclaimed.is_some() {
                b.imm_queue = false;
            }
            Ok(())
        })
    }
}

/// Delivers two-sided messages to `callback` (on the engine's thread)
/// instead of the queue `strait_recv` reads. NULL restores the queue.
#[no_mangle]
pub unsafe extern "C" fn strait_builder_set_on_message(
    builder: *mut strait_builder,
    callback: strait_message_fn,
    user_data: *mut c_void,
) -> strait_status {
    // SAFETY: header contract.
    unsafe {
        with_builder(builder, |b| {
            b.on_message = callback.map(|cb| (cb, UserData(user_data)));
            Ok(())
        })
    }
}

// ---- Engine --------------------------------------------------------------

/// An engine: its NICs and its worker thread. Thread-safe: every function
/// taking an engine may be called from any thread at once.
#[derive(Debug)]
pub struct strait_engine {
    _opaque: [u8; 0],
}

pub(crate) struct EngineState {
    pub(crate) engine: TransferEngine,
    /// A received message that did not fit the caller's buffer, returned
    /// by the next `strait_recv`.
    held: Mutex<Option<Vec<u8>>>,
}
handle!(strait_engine, EngineState, 0x5354_454e_4749_4e45);

/// What an engine runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_engine_info {
    /// A `strait_provider` (never `AUTO`).
    pub provider: u32,
    /// NICs in its group.
    pub nics: u32,
}

/// The engine behind a handle.
///
/// # Safety
/// `e` is NULL or a handle.
pub(crate) unsafe fn engine_of<'a>(e: *const strait_engine) -> CResult<&'a TransferEngine> {
    // SAFETY: as the caller's contract says.
    Ok(unsafe { &get::<strait_engine>(e, "engine")?.engine })
}

/// Opens the NICs and starts the worker. On failure (e.g.
/// `BACKEND_UNAVAILABLE`) `*out` is NULL and the message says what was
/// tried.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_create(
    builder: *const strait_builder,
    out: *mut *mut strait_engine,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for both pointers.
        unsafe { clear_out(out, "out")? };
        // SAFETY: as above.
        let b = unsafe { get::<strait_builder>(builder, "builder")? };
        let engine = b.builder().build()?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_engine>(EngineState { engine, held: Mutex::new(None) }), "out") }
    })
}

/// Shuts the engine down and frees the handle (NULL: nothing). As the Rust
/// drop: every request in flight ends with `SHUTDOWN` (callbacks run),
/// waits on them return. Regions, descriptors, transfers and counters made
/// from it stay valid to query and must still be destroyed; new requests
/// on them fail with `SHUTDOWN`. Must not be called from a callback.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_destroy(engine: *mut strait_engine) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        if let Some(state) = unsafe { take::<strait_engine>(engine, "engine")? } {
            state.engine.shutdown();
        }
        Ok(())
    })
}

/// Ends every request with `SHUTDOWN` and stops the worker; the handle
/// stays to be destroyed. Idempotent.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_shutdown(engine: *const strait_engine) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { engine_of(engine) }.map(|e| e.shutdown()))
}

/// The engine's address as bytes, for peers (`strait_address_from_bytes`).
#[no_mangle]
pub unsafe extern "C" fn strait_engine_address(
    engine: *const strait_engine,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&engine_of(engine)?.address().to_bytes(), buf, cap, len) })
}

/// The provider the engine runs on and its NIC count.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_get_info(
    engine: *const strait_engine,
    out: *mut strait_engine_info,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let e = unsafe { engine_of(engine)? };
        let info = strait_engine_info { provider: provider_code(e.provider()), nics: e.nic_count() as u32 };
        // SAFETY: header contract.
        unsafe { put(out, info, "out") }
    })
}

/// Names a peer in the engine's stats (`strait_stats_*`).
#[no_mangle]
pub unsafe extern "C" fn strait_engine_label_peer(
    engine: *const strait_engine,
    peer: *const strait_address,
    label: *const c_char,
) -> strait_status {
    call(|| {
        // SAFETY: header contract for all three.
        let (e, p, l) = unsafe { (engine_of(engine)?, address_of(peer)?, string(label, "label")?) };
        e.label_peer(p, l);
        Ok(())
    })
}

// ---- Addresses and descriptors ------------------------------------------

/// A peer engine's address, decoded and validated. Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_address {
    _opaque: [u8; 0],
}
handle!(strait_address, EngineAddress, 0x5354_4144_4452_4553);

unsafe fn address_of<'a>(a: *const strait_address) -> CResult<&'a EngineAddress> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_address>(a, "address") }
}

/// Decodes an engine address (from `strait_engine_address` on the peer).
/// Bad bytes give `INVALID_DESCRIPTOR`.
#[no_mangle]
pub unsafe extern "C" fn strait_address_from_bytes(
    bytes: *const u8,
    len: usize,
    out: *mut *mut strait_address,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let a = EngineAddress::from_bytes(unsafe { slice(bytes, len, "bytes")? })?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_address>(a), "out") }
    })
}

/// The address's bytes.
#[no_mangle]
pub unsafe extern "C" fn strait_address_to_bytes(
    address: *const strait_address,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&address_of(address)?.to_bytes(), buf, cap, len) })
}

/// Frees an address (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_address_destroy(address: *mut strait_address) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_address>(address, "address") }.map(drop))
}

/// A peer's memory region as this engine sees it: owner, length, access
/// and keys. Immutable, thread-safe. Holding one grants what its access
/// says until the owner destroys the region.
#[derive(Debug)]
pub struct strait_desc {
    _opaque: [u8; 0],
}
handle!(strait_desc, MrDesc, 0x5354_4d52_4445_5343);

pub(crate) unsafe fn desc_of<'a>(d: *const strait_desc) -> CResult<&'a MrDesc> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_desc>(d, "descriptor") }
}

/// Decodes a memory descriptor (from `strait_mr_descriptor` on the peer),
/// validating everything. Bad bytes give `INVALID_DESCRIPTOR`.
#[no_mangle]
pub unsafe extern "C" fn strait_desc_from_bytes(
    bytes: *const u8,
    len: usize,
    out: *mut *mut strait_desc,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let d = MrDesc::from_bytes(unsafe { slice(bytes, len, "bytes")? })?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_desc>(d), "out") }
    })
}

/// The descriptor's bytes.
#[no_mangle]
pub unsafe extern "C" fn strait_desc_to_bytes(
    desc: *const strait_desc,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&desc_of(desc)?.to_bytes(), buf, cap, len) })
}

/// The region's length in bytes.
#[no_mangle]
pub unsafe extern "C" fn strait_desc_len(desc: *const strait_desc, len: *mut u64) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(len, desc_of(desc)?.len(), "len") })
}

/// The address of the region's owner (for `strait_send` to it).
#[no_mangle]
pub unsafe extern "C" fn strait_desc_owner(desc: *const strait_desc, out: *mut *mut strait_address) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let owner = unsafe { desc_of(desc)? }.owner().clone();
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_address>(owner), "out") }
    })
}

/// Frees a descriptor (NULL: nothing). Requests already submitted with it
/// are unaffected.
#[no_mangle]
pub unsafe extern "C" fn strait_desc_destroy(desc: *mut strait_desc) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_desc>(desc, "descriptor") }.map(drop))
}

// ---- Memory regions ------------------------------------------------------

/// Memory registered with every NIC of an engine. Thread-safe. Destroying
/// it deregisters once every request using it has ended (requests hold it).
#[derive(Debug)]
pub struct strait_mr {
    _opaque: [u8; 0],
}
handle!(strait_mr, MemoryRegion, 0x5354_4d52_4547_494f);

pub(crate) unsafe fn mr_of<'a>(m: *const strait_mr) -> CResult<&'a MemoryRegion> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_mr>(m, "memory region") }
}

pub(crate) fn mr_handle(mr: MemoryRegion) -> *mut strait_mr {
    new_handle::<strait_mr>(mr)
}

/// Allocates `len` zeroed, page-aligned bytes and registers them with
/// `access` (`STRAIT_ACCESS_*` flags). The engine frees the memory after
/// deregistration.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_alloc(
    engine: *const strait_engine,
    len: u64,
    access: u32,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let mr = unsafe { engine_of(engine)? }.alloc(len, access_of(access)?)?;
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(mr), "out") }
    })
}

/// Registers `len` bytes at `ptr`, which the caller owns. They must stay
/// valid and in place until the region is destroyed and every request
/// using it has ended (wait for them before freeing the memory). Unmapped
/// memory gives `REGISTER_MEMORY`.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_register(
    engine: *const strait_engine,
    ptr: *mut c_void,
    len: u64,
    access: u32,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let e = unsafe { engine_of(engine)? };
        // SAFETY: the caller keeps the memory valid (header contract); the
        // engine checks it is mapped.
        let mr = unsafe { e.register_raw(ptr.cast(), len, access_of(access)?)? };
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(mr), "out") }
    })
}

/// Registers `len` bytes of CUDA device memory at device address `ptr` on
/// GPU `gpu` (CUDA's ordinal). On transports without GPUDirect (libfabric
/// tcp and shm) the memory is staged through pinned host buffers with the
/// semantics of host memory (see the README's "GPU memory"). The memory
/// must stay allocated until the region is destroyed and every request
/// using it has ended. `CUDA` without a driver, or when `ptr..ptr+len` is
/// not device memory of that GPU.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_register_device(
    engine: *const strait_engine,
    ptr: u64,
    len: u64,
    gpu: u32,
    access: u32,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let e = unsafe { engine_of(engine)? };
        // SAFETY: the caller keeps the device memory allocated (header
        // contract); the engine checks with CUDA that it is device memory.
        let mr = unsafe { e.register_device(ptr, len, gpu, access_of(access)?)? };
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(mr), "out") }
    })
}

/// Allocates `len` zeroed bytes of device memory on GPU `gpu` and registers
/// them as `strait_engine_register_device` does; the engine frees them
/// after deregistration. `CUDA` without a driver.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_alloc_device(
    engine: *const strait_engine,
    len: u64,
    gpu: u32,
    access: u32,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let mr = unsafe { engine_of(engine)? }.alloc_device(len, gpu, access_of(access)?)?;
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(mr), "out") }
    })
}

/// Called once registered memory is no longer used by strait (the region
/// destroyed and every request using it ended), with the pointer and
/// length given to `strait_engine_register_owned`: free it there. Runs on
/// the engine's thread or the thread that destroys the region; must not
/// block.
pub type strait_release_fn = Option<unsafe extern "C" fn(ptr: *mut c_void, len: u64, user_data: *mut c_void)>;

/// Calls the release callback when dropped.
struct Release {
    callback: unsafe extern "C" fn(*mut c_void, u64, *mut c_void),
    ptr: UserData,
    len: u64,
    user: UserData,
}

impl Drop for Release {
    fn drop(&mut self) {
        // SAFETY: the caller registered `callback` for this memory.
        unsafe { (self.callback)(self.ptr.get(), self.len, self.user.get()) };
    }
}

/// As `strait_engine_register`, but the memory passes to strait:
/// `release(ptr, len, user_data)` is called exactly once, when strait no
/// longer uses it (the region destroyed and every request using it ended),
/// or before this call returns if it fails (with any status but
/// `NULL_ARGUMENT` for a NULL `release`). The caller frees the memory
/// there, without waiting for its requests.
#[no_mangle]
pub unsafe extern "C" fn strait_engine_register_owned(
    engine: *const strait_engine,
    ptr: *mut c_void,
    len: u64,
    access: u32,
    release: strait_release_fn,
    user_data: *mut c_void,
    out: *mut *mut strait_mr,
) -> strait_status {
    call(|| {
        let callback = release.ok_or_else(|| fail(S::NullArgument, "release is NULL"))?;
        // From here on every path drops `owner` (releasing the memory) or
        // hands it to the region.
        let owner = Release { callback, ptr: UserData(ptr), len, user: UserData(user_data) };
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let e = unsafe { engine_of(engine)? };
        let access = access_of(access)?;
        // SAFETY: the memory stays valid until `release` runs (header
        // contract); the engine checks it is mapped.
        let mr = unsafe { e.register_owned(ptr.cast(), len, access, owner)? };
        // SAFETY: checked above.
        unsafe { put(out, mr_handle(mr), "out") }
    })
}

/// The region's memory and length.
#[no_mangle]
pub unsafe extern "C" fn strait_mr_get(mr: *const strait_mr, ptr: *mut *mut c_void, len: *mut u64) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let m = unsafe { mr_of(mr)? };
        // SAFETY: header contract.
        unsafe {
            put(ptr, m.as_ptr().cast(), "ptr")?;
            put(len, m.len(), "len")
        }
    })
}

/// The region's descriptor as bytes, for peers (`strait_desc_from_bytes`).
#[no_mangle]
pub unsafe extern "C" fn strait_mr_descriptor(
    mr: *const strait_mr,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { bytes_out(&mr_of(mr)?.descriptor().to_bytes(), buf, cap, len) })
}

/// The region's descriptor as a handle (what a peer decodes; this engine
/// may write to its own regions too).
#[no_mangle]
pub unsafe extern "C" fn strait_mr_desc(mr: *const strait_mr, out: *mut *mut strait_desc) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let d = unsafe { mr_of(mr)? }.descriptor().clone();
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_desc>(d), "out") }
    })
}

/// Drops the caller's hold on the region (NULL: nothing); it is
/// deregistered once no request uses it.
#[no_mangle]
pub unsafe extern "C" fn strait_mr_destroy(mr: *mut strait_mr) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_mr>(mr, "memory region") }.map(drop))
}

// ---- Transfers -----------------------------------------------------------

/// One request's outcome: exactly one, whatever happens (success, an
/// error, `SHUTDOWN`). Thread-safe: wait, poll and callbacks may be used
/// from several threads. Destroying it does not cancel the request.
#[derive(Debug)]
pub struct strait_transfer {
    _opaque: [u8; 0],
}
handle!(strait_transfer, Transfer, 0x5354_5452_414e_5346);

unsafe fn transfer_of<'a>(t: *const strait_transfer) -> CResult<&'a Transfer> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_transfer>(t, "transfer") }
}

/// Submits a request built by `make` and hands out its transfer.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn submit(out: *mut *mut strait_transfer, make: impl FnOnce() -> CResult<Transfer>) -> strait_status {
    call(|| {
        // SAFETY: as the caller's contract says.
        unsafe { clear_out(out, "out")? };
        let t = make()?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_transfer>(t), "out") }
    })
}

/// Waits for the outcome up to `timeout_ms` (`STRAIT_WAIT_FOREVER`: no
/// limit) and returns it; `TIMEOUT` if it has not ended (the request
/// carries on). Must not be called from a callback.
#[no_mangle]
pub unsafe extern "C" fn strait_transfer_wait(transfer: *const strait_transfer, timeout_ms: u64) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let t = unsafe { transfer_of(transfer)? };
        match timeout_of(timeout_ms) {
            None => t.wait()?,
            Some(d) => t.wait_timeout(d)?,
        }
        Ok(())
    })
}

/// `PENDING` while the request runs, then its outcome. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn strait_transfer_poll(transfer: *const strait_transfer) -> strait_status {
    call_status(|| {
        // SAFETY: header contract.
        Ok(match unsafe { transfer_of(transfer)? }.result() {
            None => S::Pending,
            Some(r) => outcome_status(&r),
        })
    })
}

/// Runs `callback(status, message, user_data)` once with the outcome: on
/// the engine's thread when the request ends, or at once on this thread if
/// it has already ended. Several callbacks may be added.
#[no_mangle]
pub unsafe extern "C" fn strait_transfer_on_complete(
    transfer: *const strait_transfer,
    callback: strait_done_fn,
    user_data: *mut c_void,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let t = unsafe { transfer_of(transfer)? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        t.on_complete(move |r| report(cb, user, r));
        Ok(())
    })
}

/// Frees the handle (NULL: nothing). The request carries on; callbacks
/// still run.
#[no_mangle]
pub unsafe extern "C" fn strait_transfer_destroy(transfer: *mut strait_transfer) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_transfer>(transfer, "transfer") }.map(drop))
}

// ---- Requests ------------------------------------------------------------

/// Writes `len` bytes of `src` at `src_offset` into the peer's region `dst`
/// at `dst_offset`. With `imm` (NULL: none) the peer receives that
/// immediate exactly once, after every byte has landed. Offsets outside
/// either region give `OUT_OF_BOUNDS` and nothing is posted.
#[no_mangle]
pub unsafe extern "C" fn strait_write(
    engine: *const strait_engine,
    src: *const strait_mr,
    src_offset: u64,
    dst: *const strait_desc,
    dst_offset: u64,
    len: u64,
    imm: *const u32,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        submit(out, || {
            Ok(engine_of(engine)?.write(mr_of(src)?, src_offset, desc_of(dst)?, dst_offset, len, imm_arg(imm))?)
        })
    }
}

/// Delivers immediate `imm` to the owner of `dst` (a zero-length write; the
/// region must allow remote writes).
#[no_mangle]
pub unsafe extern "C" fn strait_write_imm(
    engine: *const strait_engine,
    dst: *const strait_desc,
    imm: u32,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract.
    unsafe { submit(out, || Ok(engine_of(engine)?.write_imm(desc_of(dst)?, imm)?)) }
}

/// Where pages lie in a paged write's source and destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_paged_layout {
    /// Bytes copied per page.
    pub page_len: u64,
    /// Distance between consecutive source pages (at least `page_len`).
    pub src_stride: u64,
    /// Distance between consecutive destination pages (at least
    /// `page_len`).
    pub dst_stride: u64,
    /// Offset of source page 0 in the source region.
    pub src_offset: u64,
    /// Offset of destination page 0 in the destination region.
    pub dst_offset: u64,
}

impl From<strait_paged_layout> for PagedLayout {
    fn from(l: strait_paged_layout) -> Self {
        PagedLayout {
            page_len: l.page_len,
            src_stride: l.src_stride,
            dst_stride: l.dst_stride,
            src_offset: l.src_offset,
            dst_offset: l.dst_offset,
        }
    }
}

/// Writes page `src_pages[i]` of `src` to page `dst_pages[i]` of `dst` for
/// `i < count`, with the geometry of `layout`, as one request (runs of
/// pages consecutive on both sides are coalesced); with `imm` (NULL: none),
/// one immediate after every page has landed.
#[no_mangle]
pub unsafe extern "C" fn strait_write_paged(
    engine: *const strait_engine,
    src: *const strait_mr,
    dst: *const strait_desc,
    layout: *const strait_paged_layout,
    src_pages: *const u32,
    dst_pages: *const u32,
    count: usize,
    imm: *const u32,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        submit(out, || {
            let layout = *layout.as_ref().ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?;
            let s = slice(src_pages, count, "src_pages")?.to_vec();
            let d = slice(dst_pages, count, "dst_pages")?.to_vec();
            Ok(engine_of(engine)?.write_paged(mr_of(src)?, desc_of(dst)?, layout.into(), s, d, imm_arg(imm))?)
        })
    }
}

/// `rows` runs of `row_len` bytes, `src_stride` apart in the source and
/// `dst_stride` apart in the destination (a strided copy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strait_strided {
    /// Offset of the first row in the source.
    pub src_offset: u64,
    /// Offset of the first row in the destination.
    pub dst_offset: u64,
    /// Rows (at least 1).
    pub rows: u64,
    /// Bytes per row (at least 1).
    pub row_len: u64,
    /// Distance between source rows (at least `row_len` if `rows > 1`).
    pub src_stride: u64,
    /// Distance between destination rows (at least `row_len` if
    /// `rows > 1`).
    pub dst_stride: u64,
}

/// A checked list of strided copies, replayed at any base offsets by
/// `strait_write_copies` / `strait_read_copies` (e.g. one list per KV head
/// slice, replayed per layer). Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_copy_list {
    _opaque: [u8; 0],
}
handle!(strait_copy_list, CopyList, 0x5354_434f_5049_4553);

/// Checks `count` copies (no two destinations overlap, no overflow) and
/// makes a list of them.
#[no_mangle]
pub unsafe extern "C" fn strait_copy_list_create(
    copies: *const strait_strided,
    count: usize,
    out: *mut *mut strait_copy_list,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let c = unsafe { slice(copies, count, "copies")? };
        let list = CopyList::new(c.iter().map(|c| Strided {
            src_offset: c.src_offset,
            dst_offset: c.dst_offset,
            rows: c.rows,
            row_len: c.row_len,
            src_stride: c.src_stride,
            dst_stride: c.dst_stride,
        }))?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_copy_list>(list), "out") }
    })
}

/// Frees a copy list (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_copy_list_destroy(list: *mut strait_copy_list) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_copy_list>(list, "copy list") }.map(drop))
}

unsafe fn list_of<'a>(l: *const strait_copy_list) -> CResult<&'a CopyList> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_copy_list>(l, "copy list") }
}

/// Writes the copies of `list` from `src` (offsets from `src_base`) into
/// `dst` (offsets from `dst_base`) as one request; with `imm` (NULL: none),
/// one immediate after every byte of every copy has landed.
#[no_mangle]
pub unsafe extern "C" fn strait_write_copies(
    engine: *const strait_engine,
    src: *const strait_mr,
    src_base: u64,
    dst: *const strait_desc,
    dst_base: u64,
    list: *const strait_copy_list,
    imm: *const u32,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        submit(out, || {
            Ok(engine_of(engine)?.write_copies(
                mr_of(src)?,
                src_base,
                desc_of(dst)?,
                dst_base,
                list_of(list)?,
                imm_arg(imm),
            )?)
        })
    }
}

/// Reads the copies of `list` from the peer's region `src` (offsets from
/// `src_base`; the list's source side) into `dst` (offsets from `dst_base`)
/// as one request.
#[no_mangle]
pub unsafe extern "C" fn strait_read_copies(
    engine: *const strait_engine,
    dst: *const strait_mr,
    dst_base: u64,
    src: *const strait_desc,
    src_base: u64,
    list: *const strait_copy_list,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        submit(out, || {
            Ok(engine_of(engine)?.read_copies(mr_of(dst)?, dst_base, desc_of(src)?, src_base, list_of(list)?)?)
        })
    }
}

/// One destination of `strait_scatter`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strait_scatter_target {
    /// The peer's region.
    pub dst: *const strait_desc,
    /// Offset in the local source region.
    pub src_offset: u64,
    /// Offset in the peer's region.
    pub dst_offset: u64,
    /// Bytes to write.
    pub len: u64,
    /// Immediate for this peer once its bytes have landed, if `has_imm`.
    pub imm: u32,
    /// Nonzero: deliver `imm`.
    pub has_imm: u8,
}

unsafe fn scatter_targets(targets: *const strait_scatter_target, count: usize) -> CResult<Vec<ScatterTarget>> {
    // SAFETY: as the caller's contract says.
    let t = unsafe { slice(targets, count, "targets")? };
    t.iter()
        .map(|t| {
            Ok(ScatterTarget {
                // SAFETY: each `dst` is NULL or a handle (header contract).
                dst: unsafe { desc_of(t.dst)? }.clone(),
                src_offset: t.src_offset,
                dst_offset: t.dst_offset,
                len: t.len,
                imm: (t.has_imm != 0).then_some(t.imm),
            })
        })
        .collect()
}

/// Writes a range of `src` to each target as one request (one outcome; each
/// target's immediate after its own bytes). Destinations in one region
/// must not overlap.
#[no_mangle]
pub unsafe extern "C" fn strait_scatter(
    engine: *const strait_engine,
    src: *const strait_mr,
    targets: *const strait_scatter_target,
    count: usize,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { submit(out, || Ok(engine_of(engine)?.scatter(mr_of(src)?, &scatter_targets(targets, count)?)?)) }
}

unsafe fn descs(peers: *const *const strait_desc, count: usize) -> CResult<Vec<MrDesc>> {
    // SAFETY: as the caller's contract says.
    let p = unsafe { slice(peers, count, "peers")? };
    // SAFETY: each is NULL or a handle.
    p.iter().map(|&d| unsafe { desc_of(d) }.cloned()).collect()
}

/// Delivers immediate `imm` to each peer (the owner of each descriptor) as
/// one request: it completes once every peer has it.
#[no_mangle]
pub unsafe extern "C" fn strait_barrier(
    engine: *const strait_engine,
    peers: *const *const strait_desc,
    count: usize,
    imm: u32,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { submit(out, || Ok(engine_of(engine)?.barrier(&descs(peers, count)?, imm)?)) }
}

/// Reads `len` bytes of the peer's region `src` at `src_offset` into `dst`
/// at `dst_offset` (one-sided; `src` must allow remote reads).
#[no_mangle]
pub unsafe extern "C" fn strait_read(
    engine: *const strait_engine,
    dst: *const strait_mr,
    dst_offset: u64,
    src: *const strait_desc,
    src_offset: u64,
    len: u64,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { submit(out, || Ok(engine_of(engine)?.read(mr_of(dst)?, dst_offset, desc_of(src)?, src_offset, len)?)) }
}

/// Sends `len` bytes of `src` at `offset` as one message to `peer`
/// (two-sided; it must fit one of the peer's receive buffers).
#[no_mangle]
pub unsafe extern "C" fn strait_send(
    engine: *const strait_engine,
    peer: *const strait_address,
    src: *const strait_mr,
    offset: u64,
    len: u64,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { submit(out, || Ok(engine_of(engine)?.send(address_of(peer)?, mr_of(src)?, offset, len)?)) }
}

/// Zero-length write with a reserved immediate the peer's engine absorbs:
/// fails if the peer is gone (a liveness check).
#[no_mangle]
pub unsafe extern "C" fn strait_ping(
    engine: *const strait_engine,
    peer: *const strait_desc,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract.
    unsafe { submit(out, || Ok(engine_of(engine)?.ping(desc_of(peer)?)?)) }
}

/// The wait of a queue read: the Rust calls take a timeout, so
/// `STRAIT_WAIT_FOREVER` is a very long one (136 years).
fn blocking_timeout(timeout_ms: u64) -> Duration {
    timeout_of(timeout_ms).unwrap_or(Duration::from_secs(u64::from(u32::MAX)))
}

/// Takes the next two-sided message, waiting up to `timeout_ms`
/// (`TIMEOUT` if none). Its bytes go to `buf`; `*len` is its length. If it
/// does not fit (`BUFFER_TOO_SMALL`, `*len` the size needed), it is kept
/// and returned by the next call. Not available when messages go to an
/// `on_message` callback (`INVALID_REQUEST`).
#[no_mangle]
pub unsafe extern "C" fn strait_recv(
    engine: *const strait_engine,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let state = unsafe { get::<strait_engine>(engine, "engine")? };
        if len.is_null() {
            return Err(fail(S::NullArgument, "len is NULL"));
        }
        let mut held = state.held.lock().unwrap_or_else(|e| e.into_inner());
        let message = match held.take() {
            Some(m) => m,
            None => state.engine.recv_timeout(blocking_timeout(timeout_ms))?,
        };
        // SAFETY: header contract.
        match unsafe { bytes_out(&message, buf, cap, len) } {
            Err(Fail(S::BufferTooSmall)) => {
                *held = Some(message);
                Err(fail(S::BufferTooSmall, "the message does not fit the buffer: *len is its size; it is kept"))
            }
            r => r,
        }
    })
}

/// Takes the next immediate no counter claimed, waiting up to `timeout_ms`
/// (needs `strait_builder_set_unclaimed_imm_queue`).
#[no_mangle]
pub unsafe extern "C" fn strait_next_imm(
    engine: *const strait_engine,
    timeout_ms: u64,
    imm: *mut u32,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let e = unsafe { engine_of(engine)? };
        let value = e.next_imm(blocking_timeout(timeout_ms))?;
        // SAFETY: header contract.
        unsafe { put(imm, value, "imm") }
    })
}

// ---- Immediate counters --------------------------------------------------

/// Counts arrivals of one immediate value (immediates that arrived before
/// it was armed count too). Thread-safe. Destroying it disarms it.
#[derive(Debug)]
pub struct strait_imm_counter {
    _opaque: [u8; 0],
}
handle!(strait_imm_counter, ImmCounter, 0x5354_494d_4d43_4e54);

unsafe fn counter_of<'a>(c: *const strait_imm_counter) -> CResult<&'a ImmCounter> {
    // SAFETY: as the caller's contract says.
    unsafe { get::<strait_imm_counter>(c, "counter") }
}

pub(crate) fn counter_handle(c: ImmCounter) -> *mut strait_imm_counter {
    new_handle::<strait_imm_counter>(c)
}

/// Arms a counter that is reached when `value` has arrived `count` times.
/// Values from `STRAIT_RESERVED_IMM_BASE` up are the primitives' own
/// (`INVALID_REQUEST`); use `strait_imm_slot_*` for those.
#[no_mangle]
pub unsafe extern "C" fn strait_expect_imm(
    engine: *const strait_engine,
    value: u32,
    count: u64,
    out: *mut *mut strait_imm_counter,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let c = unsafe { engine_of(engine)? }.expect_imm(value, count)?;
        // SAFETY: checked above.
        unsafe { put(out, counter_handle(c), "out") }
    })
}

/// Immediates from this value up are reserved for the primitives.
pub const STRAIT_RESERVED_IMM_BASE: u32 = 0xF000_0000;
const _: () = assert!(STRAIT_RESERVED_IMM_BASE == strait_rs::RESERVED_IMM_BASE);

/// Waits until the count is reached, up to `timeout_ms`
/// (`STRAIT_WAIT_FOREVER`: no limit): `OK`, `TIMEOUT` (still armed),
/// `CANCELLED`, or `SHUTDOWN`.
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_wait(counter: *const strait_imm_counter, timeout_ms: u64) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let c = unsafe { counter_of(counter)? };
        match timeout_of(timeout_ms) {
            None => c.wait()?,
            Some(d) => c.wait_timeout(d)?,
        }
        Ok(())
    })
}

/// `OK` once reached, `PENDING` before. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_poll(counter: *const strait_imm_counter) -> strait_status {
    call_status(|| {
        // SAFETY: header contract.
        let c = unsafe { counter_of(counter)? };
        Ok(if c.is_reached() {
            S::Ok
        } else {
            match c.wait_timeout(Duration::ZERO) {
                Ok(()) => S::Ok,
                Err(strait_rs::Error::Timeout(_)) => S::Pending,
                Err(e) => return Err(e.into()),
            }
        })
    })
}

/// Arrivals so far (since the last re-arm).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_seen(counter: *const strait_imm_counter, seen: *mut u64) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(seen, counter_of(counter)?.seen(), "seen") })
}

/// Cancels: waiters return `CANCELLED`.
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_cancel(counter: *const strait_imm_counter) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { counter_of(counter) }.map(|c| c.cancel()))
}

/// Re-arms for `count` more arrivals (e.g. the next step of a loop).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_rearm(counter: *const strait_imm_counter, count: u64) -> strait_status {
    // SAFETY: header contract.
    call(|| Ok(unsafe { counter_of(counter)? }.rearm(count)?))
}

/// Runs `callback(value, user_data)` on the engine's thread each time the
/// count is reached (at once if it is already).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_on_reached(
    counter: *const strait_imm_counter,
    callback: strait_imm_fn,
    user_data: *mut c_void,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let c = unsafe { counter_of(counter)? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        // SAFETY: the caller registered `cb` with `user`.
        c.on_reached(move |v| unsafe { cb(v, user.get()) });
        Ok(())
    })
}

/// Enqueues on CUDA stream `stream` (a `CUstream`) a wait for the
/// counter, with no CPU round trip: work queued after it runs once the
/// counter's current round has reached its count. With `clear`, the wait
/// consumes the reach (one reach releases one wait), which a captured CUDA
/// graph replayed round after round needs. Destroying or cancelling the
/// counter releases waiting streams. `CUDA` without a driver.
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_wait_on_stream(
    counter: *const strait_imm_counter,
    stream: u64,
    clear: bool,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        let c = unsafe { counter_of(counter)? };
        if clear {
            c.wait_on_stream_and_clear(stream)?;
        } else {
            c.wait_on_stream(stream)?;
        }
        Ok(())
    })
}

/// A slot that CUDA streams store into (`strait_trigger_fire_on_stream`)
/// or kernels write (`strait_trigger_address`), watched by a thread that
/// calls the callback with every value after the last one it saw, in
/// order: submit the prepared transfers from it (non-blocking), never wait
/// on them there. Thread-safe.
#[derive(Debug)]
pub struct strait_trigger {
    _opaque: [u8; 0],
}
handle!(strait_trigger, strait_rs::StreamTrigger, 0x5354_5452_4947_4752);

/// Creates a trigger; `callback(value, user_data)` runs on its watcher
/// thread. `host`: fired from the CPU only (`strait_trigger_fire`), no CUDA
/// needed. `spin`: the watcher spins on a core (lowest latency) instead of
/// spinning 2 ms after each fire and then napping 50 us.
#[no_mangle]
pub unsafe extern "C" fn strait_trigger_create(
    callback: strait_imm_fn,
    user_data: *mut c_void,
    host: bool,
    spin: bool,
    out: *mut *mut strait_trigger,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        // SAFETY: the caller registered `cb` with `user`.
        let on_fire = move |v| unsafe { cb(v, user.get()) };
        let poll = if spin { strait_rs::TriggerPoll::Spin } else { strait_rs::TriggerPoll::default() };
        let t = if host {
            strait_rs::StreamTrigger::on_host(poll, on_fire)?
        } else {
            strait_rs::StreamTrigger::new(poll, on_fire)?
        };
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_trigger>(t), "out") }
    })
}

/// Enqueues on CUDA stream `stream` a store of `value` into the trigger's
/// slot, after the work queued before it (capturable in a CUDA graph).
#[no_mangle]
pub unsafe extern "C" fn strait_trigger_fire_on_stream(
    trigger: *const strait_trigger,
    stream: u64,
    value: u32,
) -> strait_status {
    // SAFETY: header contract.
    call(|| Ok(unsafe { get::<strait_trigger>(trigger, "trigger")? }.fire_on_stream(stream, value)?))
}

/// Stores `value` from the CPU.
#[no_mangle]
pub unsafe extern "C" fn strait_trigger_fire(trigger: *const strait_trigger, value: u32) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { get::<strait_trigger>(trigger, "trigger") }.map(|t| t.fire(value)))
}

/// The slot's address, for a kernel to store into (valid on every GPU and
/// on the host).
#[no_mangle]
pub unsafe extern "C" fn strait_trigger_address(trigger: *const strait_trigger, address: *mut u64) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(address, get::<strait_trigger>(trigger, "trigger")?.address(), "address") })
}

/// Stops the watcher and frees the trigger (NULL: nothing). No stream may
/// still hold a store into it.
#[no_mangle]
pub unsafe extern "C" fn strait_trigger_destroy(trigger: *mut strait_trigger) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_trigger>(trigger, "trigger") }.map(drop))
}

/// Disarms and frees a counter (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_counter_destroy(counter: *mut strait_imm_counter) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_imm_counter>(counter, "counter") }.map(drop))
}

// ---- Reserved immediates and service messages ---------------------------

/// 256 reserved immediates of a user space, unique on this engine while
/// held: for an application's own protocol beside the primitives.
/// Immutable, thread-safe.
#[derive(Debug)]
pub struct strait_imm_slot {
    _opaque: [u8; 0],
}
handle!(strait_imm_slot, ImmSlot, 0x5354_534c_4f54_2020);

/// Takes a slot in user space `space` (1 to 11).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_slot_create(
    engine: *const strait_engine,
    space: u8,
    out: *mut *mut strait_imm_slot,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let s = unsafe { engine_of(engine)? }.imm_slot(ImmSpace::User(space))?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_imm_slot>(s), "out") }
    })
}

/// The immediate value of sub-value `sub` of the slot (what a peer writes).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_slot_value(
    slot: *const strait_imm_slot,
    sub: u8,
    value: *mut u32,
) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(value, get::<strait_imm_slot>(slot, "slot")?.value(sub), "value") })
}

/// A counter of the slot's sub-value `sub`.
#[no_mangle]
pub unsafe extern "C" fn strait_imm_slot_expect(
    slot: *const strait_imm_slot,
    sub: u8,
    count: u64,
    out: *mut *mut strait_imm_counter,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let c = unsafe { get::<strait_imm_slot>(slot, "slot")? }.expect(sub, count)?;
        // SAFETY: checked above.
        unsafe { put(out, counter_handle(c), "out") }
    })
}

/// Gives the slot back (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_imm_slot_destroy(slot: *mut strait_imm_slot) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_imm_slot>(slot, "slot") }.map(drop))
}

/// A handler of service messages (two-sided messages to a service id,
/// sent with `strait_message_pool_send`), beside the engine's own queue.
/// Thread-safe; its callback runs on the engine's thread.
#[derive(Debug)]
pub struct strait_service {
    _opaque: [u8; 0],
}
handle!(strait_service, Service, 0x5354_5345_5256_4943);

/// Registers `callback` for service messages; it runs on the engine's
/// thread with each message's payload. `strait_service_id` names it.
#[no_mangle]
pub unsafe extern "C" fn strait_serve(
    engine: *const strait_engine,
    callback: strait_message_fn,
    user_data: *mut c_void,
    out: *mut *mut strait_service,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        let cb = callback.ok_or_else(|| fail(S::NullArgument, "callback is NULL"))?;
        let user = UserData(user_data);
        // SAFETY: header contract; the caller registered `cb` with `user`.
        let s = unsafe { engine_of(engine)? }.serve(move |m| unsafe { cb(m.as_ptr(), m.len(), user.get()) })?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_service>(s), "out") }
    })
}

/// The service's id (what senders address).
#[no_mangle]
pub unsafe extern "C" fn strait_service_id(service: *const strait_service, id: *mut u16) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(id, get::<strait_service>(service, "service")?.id(), "id") })
}

/// Unregisters and frees the service (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_service_destroy(service: *mut strait_service) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_service>(service, "service") }.map(drop))
}

/// Registered buffers for sending service messages, reused as sends
/// complete. Thread-safe.
#[derive(Debug)]
pub struct strait_message_pool {
    _opaque: [u8; 0],
}
handle!(strait_message_pool, MessagePool, 0x5354_4d53_4750_4f4c);

/// `slots` buffers of `slot_size` bytes each.
#[no_mangle]
pub unsafe extern "C" fn strait_message_pool_create(
    engine: *const strait_engine,
    slots: usize,
    slot_size: usize,
    out: *mut *mut strait_message_pool,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let p = MessagePool::new(unsafe { engine_of(engine)? }, slots, slot_size)?;
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_message_pool>(p), "out") }
    })
}

/// Sends `len` bytes to service `service` of `peer`.
#[no_mangle]
pub unsafe extern "C" fn strait_message_pool_send(
    pool: *const strait_message_pool,
    peer: *const strait_address,
    service: u16,
    payload: *const u8,
    len: usize,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        submit(out, || {
            let p = get::<strait_message_pool>(pool, "pool")?;
            Ok(p.send(address_of(peer)?, service, slice(payload, len, "payload")?)?)
        })
    }
}

/// Frees the pool (NULL: nothing) once its sends have completed.
#[no_mangle]
pub unsafe extern "C" fn strait_message_pool_destroy(pool: *mut strait_message_pool) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_message_pool>(pool, "pool") }.map(drop))
}

// ---- Batches -------------------------------------------------------------

/// Requests collected, then submitted in one message to the engine's
/// worker (`strait_batch_submit`): the small-message path. Not
/// thread-safe: fill it from one thread. Each add checks its request and
/// fails without adding anything.
#[derive(Debug)]
pub struct strait_batch {
    _opaque: [u8; 0],
}

pub(crate) struct BatchState {
    engine: TransferEngine,
    ops: Vec<BatchOp>,
    /// Requests the ops make (`Writes` makes several).
    requests: usize,
}
handle!(strait_batch, BatchState, 0x5354_4241_5443_4820);

enum BatchOp {
    Writes {
        src: MemoryRegion,
        dst: MrDesc,
        ranges: Vec<(u64, u64, u64)>,
        imm: Option<u32>,
    },
    Write {
        src: MemoryRegion,
        src_offset: u64,
        dst: MrDesc,
        dst_offset: u64,
        len: u64,
        imm: Option<u32>,
    },
    Imm {
        dst: MrDesc,
        imm: u32,
    },
    Paged {
        src: MemoryRegion,
        dst: MrDesc,
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        imm: Option<u32>,
    },
    Copies {
        src: MemoryRegion,
        src_base: u64,
        dst: MrDesc,
        dst_base: u64,
        list: CopyList,
        imm: Option<u32>,
    },
    Scatter {
        src: MemoryRegion,
        targets: Vec<ScatterTarget>,
    },
    Barrier {
        peers: Vec<MrDesc>,
        imm: u32,
    },
}

impl BatchState {
    /// Adds every op to a Rust batch of the engine.
    fn build(&self) -> strait_rs::Result<strait_rs::Batch<'_>> {
        let mut b = self.engine.batch();
        for op in &self.ops {
            match op {
                BatchOp::Write { src, src_offset, dst, dst_offset, len, imm } => {
                    b.write(src, *src_offset, dst, *dst_offset, *len, *imm)?;
                }
                BatchOp::Writes { src, dst, ranges, imm } => {
                    b.writes(src, dst, ranges.iter().copied(), *imm)?;
                }
                BatchOp::Imm { dst, imm } => {
                    b.write_imm(dst, *imm)?;
                }
                BatchOp::Paged { src, dst, layout, src_pages, dst_pages, imm } => {
                    b.write_paged(src, dst, *layout, src_pages.clone(), dst_pages.clone(), *imm)?;
                }
                BatchOp::Copies { src, src_base, dst, dst_base, list, imm } => {
                    b.write_copies(src, *src_base, dst, *dst_base, list, *imm)?;
                }
                BatchOp::Scatter { src, targets } => {
                    b.scatter(src, targets)?;
                }
                BatchOp::Barrier { peers, imm } => {
                    b.barrier(peers, *imm)?;
                }
            }
        }
        Ok(b)
    }

    /// Adds `op` if it passes the engine's checks alone.
    ///
    /// Each op is checked by building it alone (its plan is made again at
    /// submit: a C batch costs one extra planning per request, against one
    /// crossing of the boundary and one hand-off to the worker for all).
    fn add(&mut self, op: BatchOp) -> CResult {
        let requests = match &op {
            BatchOp::Writes { ranges, .. } => ranges.len(),
            _ => 1,
        };
        let probe = BatchState { engine: self.engine.clone(), ops: vec![op], requests };
        probe.build()?;
        self.ops.extend(probe.ops);
        self.requests += requests;
        Ok(())
    }
}

/// An empty batch for `engine`.
#[no_mangle]
pub unsafe extern "C" fn strait_batch_create(
    engine: *const strait_engine,
    out: *mut *mut strait_batch,
) -> strait_status {
    call(|| {
        // SAFETY: header contract.
        unsafe { clear_out(out, "out")? };
        // SAFETY: header contract.
        let engine = unsafe { engine_of(engine)? }.clone();
        // SAFETY: checked above.
        unsafe { put(out, new_handle::<strait_batch>(BatchState { engine, ops: Vec::new(), requests: 0 }), "out") }
    })
}

/// Runs `f` on the batch.
///
/// # Safety
/// `b` is NULL or a batch used by this thread only.
unsafe fn with_batch(b: *mut strait_batch, f: impl FnOnce(&mut BatchState) -> CResult) -> strait_status {
    // SAFETY: as the caller's contract says.
    call(|| f(unsafe { get_mut::<strait_batch>(b, "batch")? }))
}

/// Adds a write (as `strait_write`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_write(
    batch: *mut strait_batch,
    src: *const strait_mr,
    src_offset: u64,
    dst: *const strait_desc,
    dst_offset: u64,
    len: u64,
    imm: *const u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            let (src, dst) = (mr_of(src)?.clone(), desc_of(dst)?.clone());
            b.add(BatchOp::Write { src, src_offset, dst, dst_offset, len, imm: imm_arg(imm) })
        })
    }
}

/// Adds `count` writes from `src` into `dst`, write i taking
/// `lens[i]` bytes at `src_offsets[i]` to `dst_offsets[i]`, each with `imm`
/// (NULL: none) so that the peer counts one per write. The peer and the
/// regions are checked once; if any range is out of bounds, none is added.
#[no_mangle]
pub unsafe extern "C" fn strait_batch_writes(
    batch: *mut strait_batch,
    src: *const strait_mr,
    dst: *const strait_desc,
    src_offsets: *const u64,
    dst_offsets: *const u64,
    lens: *const u64,
    count: usize,
    imm: *const u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            let s = slice(src_offsets, count, "src_offsets")?;
            let d = slice(dst_offsets, count, "dst_offsets")?;
            let l = slice(lens, count, "lens")?;
            let ranges = s.iter().zip(d).zip(l).map(|((&s, &d), &l)| (s, d, l)).collect();
            b.add(BatchOp::Writes { src: mr_of(src)?.clone(), dst: desc_of(dst)?.clone(), ranges, imm: imm_arg(imm) })
        })
    }
}

/// Adds an immediate-only write (as `strait_write_imm`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_write_imm(
    batch: *mut strait_batch,
    dst: *const strait_desc,
    imm: u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { with_batch(batch, |b| b.add(BatchOp::Imm { dst: desc_of(dst)?.clone(), imm })) }
}

/// Adds a paged write (as `strait_write_paged`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_write_paged(
    batch: *mut strait_batch,
    src: *const strait_mr,
    dst: *const strait_desc,
    layout: *const strait_paged_layout,
    src_pages: *const u32,
    dst_pages: *const u32,
    count: usize,
    imm: *const u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            let layout = *layout.as_ref().ok_or_else(|| fail(S::NullArgument, "layout is NULL"))?;
            b.add(BatchOp::Paged {
                src: mr_of(src)?.clone(),
                dst: desc_of(dst)?.clone(),
                layout: layout.into(),
                src_pages: slice(src_pages, count, "src_pages")?.to_vec(),
                dst_pages: slice(dst_pages, count, "dst_pages")?.to_vec(),
                imm: imm_arg(imm),
            })
        })
    }
}

/// Adds a strided write (as `strait_write_copies`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_write_copies(
    batch: *mut strait_batch,
    src: *const strait_mr,
    src_base: u64,
    dst: *const strait_desc,
    dst_base: u64,
    list: *const strait_copy_list,
    imm: *const u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            b.add(BatchOp::Copies {
                src: mr_of(src)?.clone(),
                src_base,
                dst: desc_of(dst)?.clone(),
                dst_base,
                list: list_of(list)?.clone(),
                imm: imm_arg(imm),
            })
        })
    }
}

/// Adds a scatter (as `strait_scatter`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_scatter(
    batch: *mut strait_batch,
    src: *const strait_mr,
    targets: *const strait_scatter_target,
    count: usize,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            b.add(BatchOp::Scatter { src: mr_of(src)?.clone(), targets: scatter_targets(targets, count)? })
        })
    }
}

/// Adds a barrier (as `strait_barrier`).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_barrier(
    batch: *mut strait_batch,
    peers: *const *const strait_desc,
    count: usize,
    imm: u32,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe { with_batch(batch, |b| b.add(BatchOp::Barrier { peers: descs(peers, count)?, imm })) }
}

/// Requests in the batch.
#[no_mangle]
pub unsafe extern "C" fn strait_batch_len(batch: *const strait_batch, len: *mut usize) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { put(len, get::<strait_batch>(batch, "batch")?.requests, "len") })
}

/// Submits every request, one transfer each in `out[0..len)` in the order
/// added (`cap` must be at least the batch's length: `BUFFER_TOO_SMALL`
/// otherwise, nothing submitted), and empties the batch.
#[no_mangle]
pub unsafe extern "C" fn strait_batch_submit(
    batch: *mut strait_batch,
    out: *mut *mut strait_transfer,
    cap: usize,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            let n = b.requests;
            if cap < n || (out.is_null() && n > 0) {
                return Err(fail(S::BufferTooSmall, format!("{n} transfers do not fit an array of {cap}")));
            }
            let transfers = b.build()?.submit()?;
            b.ops.clear();
            b.requests = 0;
            for (i, t) in transfers.into_iter().enumerate() {
                out.add(i).write(new_handle::<strait_transfer>(t));
            }
            Ok(())
        })
    }
}

/// Submits every request as one (one outcome for all) and empties the
/// batch.
#[no_mangle]
pub unsafe extern "C" fn strait_batch_submit_joined(
    batch: *mut strait_batch,
    out: *mut *mut strait_transfer,
) -> strait_status {
    // SAFETY: header contract for every pointer.
    unsafe {
        with_batch(batch, |b| {
            clear_out(out, "out")?;
            let t = b.build()?.submit_joined()?;
            b.ops.clear();
            b.requests = 0;
            put(out, new_handle::<strait_transfer>(t), "out")
        })
    }
}

/// Frees the batch and whatever it holds, submitting nothing (NULL:
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn strait_batch_destroy(batch: *mut strait_batch) -> strait_status {
    // SAFETY: header contract.
    call(|| unsafe { take::<strait_batch>(batch, "batch") }.map(drop))
}
