//! CUDA, reached through the driver API at run time.
//!
//! strait links no CUDA library: [cudarc]'s driver bindings load
//! `libcuda.so` the first time they are needed (its `dynamic-loading`
//! feature). Building, testing and running strait needs no toolkit, no
//! driver and no `nvcc`; a machine without a driver gets
//! [`CudaUnavailable`] from [`probe`], a normal condition like a verbs
//! backend without devices, and every CUDA test skips with that reason.
//!
//! What strait uses: the device's primary context (the one the CUDA
//! runtime, PyTorch and CuPy share, so pointers from them are valid in it),
//! device allocations ([`TransferEngine::alloc_device`]), page-locking of
//! the engine's staging buffers, asynchronous copies on streams of its own
//! (the copy engines), pointer attributes (to check that a registered
//! pointer is device memory of the right GPU), and the stream memory
//! operations behind [`ImmCounter::wait_on_stream`] and [`StreamTrigger`].
//!
//! The bindings are CUDA 12.8's; the calls strait makes exist in every
//! driver from CUDA 12.0 on (stream memory operations need a GPU that
//! reports `CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS`, every data-centre
//! GPU since Volta with a recent driver).
//!
//! [cudarc]: https://docs.rs/cudarc
//! [`TransferEngine::alloc_device`]: crate::TransferEngine::alloc_device
//! [`ImmCounter::wait_on_stream`]: crate::ImmCounter::wait_on_stream
//! [`StreamTrigger`]: crate::StreamTrigger

use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use cudarc::driver::sys;

use crate::error::{Error, Result};

/// Why CUDA cannot be used on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaUnavailable(pub String);

impl fmt::Display for CudaUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no CUDA: {}", self.0)
    }
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA's device ordinal.
    pub ordinal: u32,
    /// The device's name, e.g. "NVIDIA H200".
    pub name: String,
    /// Global memory in bytes.
    pub memory: u64,
    /// PCI address, e.g. "0000:18:00.0" (matches
    /// [`topology::Gpu`](crate::topology::Gpu)'s).
    pub pci: String,
}

/// The driver and its GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaInfo {
    /// `cuDriverGetVersion`: 1000 x major + 10 x minor (13000 is CUDA 13.0).
    pub driver_version: u32,
    /// Every device, in CUDA's order.
    pub gpus: Vec<GpuInfo>,
}

impl CudaInfo {
    /// The driver's CUDA version as "major.minor".
    pub fn driver_version_string(&self) -> String {
        format!("{}.{}", self.driver_version / 1000, self.driver_version % 1000 / 10)
    }
}

fn check(what: &str, rc: sys::CUresult) -> Result<()> {
    if rc == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or
    // leaves it null for an unknown code).
    let known = unsafe { sys::cuGetErrorString(rc, &mut text) } == sys::CUresult::CUDA_SUCCESS && !text.is_null();
    let reason = if known {
        // SAFETY: a NUL-terminated static string from the driver.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    } else {
        format!("{rc:?}")
    };
    Err(Error::Cuda(format!("{what}: {reason}")))
}

/// Loads the driver and initialises it, once per process.
fn init() -> std::result::Result<(), CudaUnavailable> {
    static INIT: OnceLock<std::result::Result<(), CudaUnavailable>> = OnceLock::new();
    INIT.get_or_init(|| {
        if std::env::var_os("STRAIT_NO_CUDA").is_some() {
            return Err(CudaUnavailable("STRAIT_NO_CUDA is set".into()));
        }
        // SAFETY: only tries to dlopen the library names.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaUnavailable("the NVIDIA driver library (libcuda.so) is not installed".into()));
        }
        // SAFETY: cuInit takes flags 0 and may be called more than once.
        check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| CudaUnavailable(e.to_string()))?;
        let mut count = 0;
        // SAFETY: writes the count.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })
            .map_err(|e| CudaUnavailable(e.to_string()))?;
        if count <= 0 {
            return Err(CudaUnavailable("the driver sees no GPU".into()));
        }
        Ok(())
    })
    .clone()
}

/// The driver's version and GPUs, or why CUDA is unavailable.
pub fn probe() -> std::result::Result<CudaInfo, CudaUnavailable> {
    init()?;
    let unavailable = |e: Error| CudaUnavailable(e.to_string());
    let mut version = 0;
    // SAFETY: writes the version.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) }).map_err(unavailable)?;
    let mut count = 0;
    // SAFETY: writes the count.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) }).map_err(unavailable)?;
    let gpus = (0..count.max(0) as u32).map(gpu_info).collect::<Result<Vec<_>>>().map_err(unavailable)?;
    Ok(CudaInfo { driver_version: version.max(0) as u32, gpus })
}

/// True when the driver loads and sees at least one GPU.
pub fn available() -> bool {
    init().is_ok()
}

fn device(ordinal: u32) -> Result<sys::CUdevice> {
    init().map_err(|e| Error::Cuda(e.to_string()))?;
    let mut dev = 0;
    // SAFETY: writes the handle; the ordinal is checked by the driver.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) })?;
    Ok(dev)
}

fn gpu_info(ordinal: u32) -> Result<GpuInfo> {
    let dev = device(ordinal)?;
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the driver writes at most len bytes, NUL-terminated.
    check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) })?;
    let mut memory = 0usize;
    // SAFETY: writes the size.
    check("cuDeviceTotalMem", unsafe { sys::cuDeviceTotalMem_v2(&mut memory, dev) })?;
    let mut pci = [0 as std::ffi::c_char; 32];
    // SAFETY: as for the name.
    check("cuDeviceGetPCIBusId", unsafe { sys::cuDeviceGetPCIBusId(pci.as_mut_ptr(), pci.len() as i32, dev) })?;
    // SAFETY: both buffers are NUL-terminated by the driver (and zeroed).
    let (name, pci) = unsafe { (CStr::from_ptr(name.as_ptr()), CStr::from_ptr(pci.as_ptr())) };
    Ok(GpuInfo {
        ordinal,
        name: name.to_string_lossy().into_owned(),
        memory: memory as u64,
        pci: pci.to_string_lossy().to_lowercase(),
    })
}

/// A device's primary context, retained for as long as the value lives.
pub(crate) struct Context {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
}

// SAFETY: a CUDA context handle may be used from any thread (made current
// there first, as `bind` does).
unsafe impl Send for Context {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Context {}

impl Context {
    pub(crate) fn primary(ordinal: u32) -> Result<Context> {
        let dev = device(ordinal)?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes the context; released in Drop.
        check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
        Ok(Context { ctx, dev })
    }

    /// Makes the context current on this thread, for good: only on the
    /// engine's own threads (the stager's).
    pub(crate) fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// Makes the context current until the guard drops, then restores the
    /// caller's (`cuCtxPushCurrent`/`cuCtxPopCurrent`): what calls on user
    /// threads use, so that registering GPU 1's memory does not change the
    /// device a PyTorch thread works on.
    pub(crate) fn scope(&self) -> Result<Scope> {
        // SAFETY: the context is retained; popped by the guard.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.ctx) })?;
        Ok(Scope(()))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: retained in `primary`, released once.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

/// The caller's context restored when dropped (see [`Context::scope`]).
pub(crate) struct Scope(());

impl Drop for Scope {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops the context `scope` pushed on this thread.
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// Frees and unpinnings, done on a thread of their own: `cuMemFree` and
/// its kin may wait for the device to go idle, and the engine's threads
/// must never wait on a GPU whose streams may be waiting on them (a stream
/// blocked in `wait_on_stream` until the worker delivers an immediate).
enum Release {
    Device(u64),
    /// Unpinned, then the memory's owner dropped (never freed first: the
    /// address could be reused, and pinned by someone else, meanwhile).
    Unpin(usize, Box<dyn Send>),
    Host(usize),
}

fn release_later(ctx: std::sync::Arc<Context>, what: Release) {
    type Job = (std::sync::Arc<Context>, Release);
    static RELEASER: OnceLock<std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>> = OnceLock::new();
    let sender = RELEASER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("strait-cuda-free".into()).spawn(move || {
            for (ctx, what) in rx {
                if ctx.bind().is_err() {
                    continue;
                }
                // SAFETY: each pointer came from the matching allocation or
                // registration and is released once, after its last use.
                unsafe {
                    match what {
                        Release::Device(ptr) => sys::cuMemFree_v2(ptr),
                        Release::Unpin(ptr, owner) => {
                            let rc = sys::cuMemHostUnregister(ptr as *mut c_void);
                            drop(owner);
                            rc
                        }
                        Release::Host(ptr) => sys::cuMemFreeHost(ptr as *mut c_void),
                    };
                }
            }
        });
        std::sync::Mutex::new(spawned.ok().map(|_| tx))
    });
    let sent = sender.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|tx| tx.send((ctx, what)));
    if !matches!(sent, Some(Ok(()))) {
        tracing::warn!("the CUDA release thread is not running: memory left allocated");
    }
}

/// Which GPU `ptr` points into, if it is device memory (as opposed to host
/// memory, pinned or not, or an address CUDA does not know).
pub(crate) fn device_of(ptr: u64) -> Option<u32> {
    init().ok()?;
    let mut kind: u32 = 0;
    // SAFETY: CU_POINTER_ATTRIBUTE_MEMORY_TYPE writes a CUmemorytype (u32).
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            std::ptr::from_mut(&mut kind).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return None;
    }
    let mut ordinal: i32 = -1;
    // SAFETY: CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL writes an int.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            std::ptr::from_mut(&mut ordinal).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    (rc == sys::CUresult::CUDA_SUCCESS && ordinal >= 0).then_some(ordinal as u32)
}

/// The dma-buf of the device memory `ptr..ptr+len`
/// (`cuMemGetHandleForAddressRange`), as the file descriptor and the
/// offset of `ptr` in it; `None` where the driver or GPU exports none
/// (CUDA before 11.7, proprietary kernel modules before r535, or
/// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` false). The range is widened
/// to whole host pages, as the call requires.
pub(crate) fn dmabuf_of(ptr: u64, len: u64) -> Option<(std::os::fd::OwnedFd, u64)> {
    init().ok()?;
    let page = 4096u64;
    let base = ptr & !(page - 1);
    let end = (ptr + len).div_ceil(page) * page;
    let mut fd: i32 = -1;
    // SAFETY: writes an int file descriptor for the range (or fails).
    let rc = unsafe {
        sys::cuMemGetHandleForAddressRange(
            std::ptr::from_mut(&mut fd).cast(),
            base,
            (end - base) as usize,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS || fd < 0 {
        tracing::debug!(?rc, "no dma-buf for device memory; plain registration (nvidia-peermem) instead");
        return None;
    }
    // SAFETY: a new descriptor the driver handed to us.
    Some((unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }, ptr - base))
}

/// Device memory from `cuMemAlloc`, freed when dropped.
pub(crate) struct DeviceAlloc {
    pub(crate) ptr: u64,
    ctx: std::sync::Arc<Context>,
}

impl DeviceAlloc {
    pub(crate) fn zeroed(ctx: std::sync::Arc<Context>, len: u64) -> Result<DeviceAlloc> {
        let _scope = ctx.scope()?;
        let mut ptr = 0;
        // SAFETY: writes the pointer; freed in Drop.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) })?;
        let alloc = DeviceAlloc { ptr, ctx: ctx.clone() };
        // SAFETY: the allocation is len bytes. The memset is asynchronous
        // to the host and on the legacy stream, which the stager's streams
        // do not wait for: done before the memory is handed out.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, len as usize) })?;
        // SAFETY: the null stream is the context's legacy stream.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })?;
        Ok(alloc)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // No transfer uses it any more (the engine drops owners after
        // deregistration); freed off this thread (see `release_later`).
        release_later(self.ctx.clone(), Release::Device(self.ptr));
    }
}

/// Host memory page-locked for the device (`cuMemHostRegister`), with the
/// value that owns it: when dropped, the memory is unlocked and then its
/// owner dropped, on the release thread.
pub(crate) struct HostPin {
    ptr: *mut c_void,
    ctx: std::sync::Arc<Context>,
    owner: Option<Box<dyn Send>>,
}

// SAFETY: only the address is kept, to unregister it.
unsafe impl Send for HostPin {}

impl HostPin {
    /// # Safety
    /// `ptr..ptr+len` must be host memory that `owner` keeps valid.
    pub(crate) unsafe fn new(
        ctx: std::sync::Arc<Context>,
        ptr: *mut u8,
        len: u64,
        owner: Box<dyn Send>,
    ) -> Result<HostPin> {
        let _scope = ctx.scope()?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: valid memory (caller); unregistered in Drop.
        check("cuMemHostRegister", unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len as usize, flags) })?;
        Ok(HostPin { ptr: ptr.cast(), ctx, owner: Some(owner) })
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        // Unpinned off this thread (see `release_later`), then freed.
        let owner = self.owner.take().unwrap_or_else(|| Box::new(()));
        release_later(self.ctx.clone(), Release::Unpin(self.ptr as usize, owner));
    }
}

/// `N` 32-bit words of page-locked host memory mapped into every GPU's
/// address space (`cuMemHostAlloc`, portable and device-mapped): the CPU
/// stores into them and streams wait on them (`cuStreamWaitValue32`), or
/// streams store and the CPU watches. In tests (no CUDA) the words are
/// plain host memory with the same CPU side.
pub(crate) struct MappedWords<const N: usize> {
    ptr: *mut u32,
    /// `None`: plain host memory (the stand-in).
    ctx: Option<std::sync::Arc<Context>>,
}

// SAFETY: the words are only accessed atomically.
unsafe impl<const N: usize> Send for MappedWords<N> {}
// SAFETY: as above.
unsafe impl<const N: usize> Sync for MappedWords<N> {}

impl<const N: usize> MappedWords<N> {
    /// Words mapped for the GPUs, on the calling thread's current context
    /// (else GPU 0's primary context).
    pub(crate) fn mapped() -> Result<Self> {
        let ctx = std::sync::Arc::new(Context::primary(current_device()?.unwrap_or(0))?);
        let _scope = ctx.scope()?;
        let mut ptr = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: writes the pointer; freed in Drop.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut ptr, 4 * N, flags) })?;
        let words = MappedWords { ptr: ptr.cast(), ctx: Some(ctx) };
        for i in 0..N {
            words.word(i).store(0, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(words)
    }

    /// Plain host words (tests, and CPU-only triggers).
    pub(crate) fn host() -> Self {
        let words: Box<[std::sync::atomic::AtomicU32; N]> = Box::new(std::array::from_fn(|_| Default::default()));
        MappedWords { ptr: Box::into_raw(words).cast(), ctx: None }
    }

    pub(crate) fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < N);
        // SAFETY: N aligned u32s live as long as self; accessed atomically
        // by the CPU (and by GPUs through their own mapping).
        unsafe { &*self.ptr.add(i).cast::<std::sync::atomic::AtomicU32>() }
    }

    /// The address streams use for word `i` (unified addressing: the host
    /// address itself).
    pub(crate) fn address(&self, i: usize) -> u64 {
        assert!(i < N);
        // SAFETY: inside the allocation.
        unsafe { self.ptr.add(i) as u64 }
    }

    pub(crate) fn on_gpu(&self) -> bool {
        self.ctx.is_some()
    }

    /// The words' context for a stream call, unless the caller has one
    /// current (the stream's, normally).
    fn scope_for_stream(&self) -> Result<Option<Scope>> {
        match (&self.ctx, current_device()?) {
            (Some(ctx), None) => Ok(Some(ctx.scope()?)),
            _ => Ok(None),
        }
    }

    /// Enqueues on `stream` a wait until word `i` >= `value` (32-bit
    /// wrap-around comparison). Capturable into a CUDA graph.
    pub(crate) fn stream_wait(&self, stream: u64, i: usize, value: u32) -> Result<()> {
        self.require_gpu()?;
        let _scope = self.scope_for_stream()?;
        let flags = sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32;
        let addr = self.address(i);
        // SAFETY: the word is device-mapped memory that outlives the value
        // (the caller keeps it alive while the stream may wait on it).
        guarded("cuStreamWaitValue32", || unsafe {
            sys::cuStreamWaitValue32_v2(stream as sys::CUstream, addr, value, flags)
        })
    }

    /// Enqueues on `stream` a store of `value` into word `i`, ordered after
    /// the stream's earlier work. Capturable into a CUDA graph.
    pub(crate) fn stream_write(&self, stream: u64, i: usize, value: u32) -> Result<()> {
        self.require_gpu()?;
        let _scope = self.scope_for_stream()?;
        let flags = sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
        let addr = self.address(i);
        // SAFETY: as for stream_wait.
        guarded("cuStreamWriteValue32", || unsafe {
            sys::cuStreamWriteValue32_v2(stream as sys::CUstream, addr, value, flags)
        })
    }

    fn require_gpu(&self) -> Result<()> {
        if self.ctx.is_none() {
            return Err(Error::Cuda("these words are plain host memory (no CUDA): streams cannot use them".into()));
        }
        Ok(())
    }
}

impl<const N: usize> Drop for MappedWords<N> {
    fn drop(&mut self) {
        match &self.ctx {
            // From cuMemHostAlloc; no stream may still use it (documented
            // by the owners); freed off this thread (see `release_later`).
            Some(ctx) => release_later(ctx.clone(), Release::Host(self.ptr as usize)),
            // SAFETY: from Box::into_raw in `host`, freed once.
            None => drop(unsafe { Box::from_raw(self.ptr.cast::<[std::sync::atomic::AtomicU32; N]>()) }),
        }
    }
}

/// CUDA's ordinal of the GPU at PCI address `pci` (`0000:18:00.0`), if
/// CUDA sees it.
pub(crate) fn ordinal_of_pci(pci: &str) -> Option<u32> {
    init().ok()?;
    let id = std::ffi::CString::new(pci).ok()?;
    let mut dev = 0;
    // SAFETY: a NUL-terminated bus id; writes the device.
    let rc = unsafe { sys::cuDeviceGetByPCIBusId(&mut dev, id.as_ptr()) };
    (rc == sys::CUresult::CUDA_SUCCESS).then_some(dev as u32)
}

/// The device of the calling thread's current context (PyTorch's current
/// device), if it has one.
pub(crate) fn current_ordinal() -> Option<u32> {
    current_device().ok().flatten()
}

/// The device of the calling thread's current context, if any.
fn current_device() -> Result<Option<u32>> {
    init().map_err(|e| Error::Cuda(e.to_string()))?;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: writes the current context (null when none).
    check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut ctx) })?;
    if ctx.is_null() {
        return Ok(None);
    }
    let mut dev = 0;
    // SAFETY: writes the device of the current context.
    check("cuCtxGetDevice", unsafe { sys::cuCtxGetDevice(&mut dev) })?;
    Ok(Some(dev as u32))
}

/// A synchronous copy between any two addresses CUDA knows (unified
/// addressing: host or device), on the context of `ctx`.
pub(crate) fn copy_sync(ctx: &Context, dst: u64, src: u64, len: usize) -> Result<()> {
    let _scope = ctx.scope()?;
    // SAFETY: the caller guarantees both ranges are valid for len bytes.
    check("cuMemcpy", unsafe { sys::cuMemcpy(dst, src, len) })?;
    // From pageable host memory cuMemcpy may return before the DMA into
    // the device has finished: wait for it, so that a transfer submitted
    // next (on the stager's streams, or by a NIC) sees the bytes.
    // SAFETY: the null stream is the context's legacy stream.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })
}

/// Runs a driver call whose symbol may be missing from an older driver
/// (cudarc panics when it cannot load one): the panic becomes an error.
fn guarded(what: &str, call: impl FnOnce() -> sys::CUresult + std::panic::UnwindSafe) -> Result<()> {
    match std::panic::catch_unwind(call) {
        Ok(rc) => check(what, rc),
        Err(_) => Err(Error::Cuda(format!("{what}: the driver does not have it (too old)"))),
    }
}

/// Asynchronous copies on two streams of their own (copies toward the
/// device on one, toward the host on the other, so that the copy engines
/// run both directions at once), each completion an event polled in order.
pub(crate) struct CudaCopies {
    ctx: std::sync::Arc<Context>,
    streams: [sys::CUstream; 2],
    /// Per stream: (ticket, event) in submission order.
    pending: [VecDeque<(u64, sys::CUevent)>; 2],
    /// Spare events.
    events: Vec<sys::CUevent>,
}

// SAFETY: streams and events are used from the stager thread, which binds
// the context first; moving the handles between threads is allowed.
unsafe impl Send for CudaCopies {}

impl CudaCopies {
    pub(crate) fn new(ctx: std::sync::Arc<Context>) -> Result<CudaCopies> {
        ctx.bind()?;
        let mut streams = [std::ptr::null_mut(); 2];
        for s in &mut streams {
            // SAFETY: writes the stream; destroyed in Drop.
            check("cuStreamCreate", unsafe {
                sys::cuStreamCreate(s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            })?;
        }
        Ok(CudaCopies { ctx, streams, pending: [VecDeque::new(), VecDeque::new()], events: Vec::new() })
    }

    fn event(&mut self) -> Result<sys::CUevent> {
        if let Some(e) = self.events.pop() {
            return Ok(e);
        }
        let mut e = std::ptr::null_mut();
        // SAFETY: writes the event; destroyed in Drop.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(e)
    }
}

impl super::engine::staging::CopyEngine for CudaCopies {
    fn start(&mut self, ticket: u64, dst: u64, src: u64, len: usize, to_device: bool) -> Result<()> {
        self.ctx.bind()?;
        let s = usize::from(!to_device);
        let event = self.event()?;
        // SAFETY: the stager passes ranges inside registered memory that
        // lives until the copy's ticket is reported done.
        if let Err(e) = check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(dst, src, len, self.streams[s]) }) {
            self.events.push(event);
            return Err(e);
        }
        // SAFETY: event and stream are live.
        if let Err(e) = check("cuEventRecord", unsafe { sys::cuEventRecord(event, self.streams[s]) }) {
            // The copy is queued: the caller may reuse its buffers only
            // once it has run.
            // SAFETY: a live stream.
            unsafe { sys::cuStreamSynchronize(self.streams[s]) };
            self.events.push(event);
            return Err(e);
        }
        self.pending[s].push_back((ticket, event));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u64, Result<()>)>) {
        if self.pending.iter().all(VecDeque::is_empty) {
            return;
        }
        let _ = self.ctx.bind();
        for s in 0..2 {
            while let Some(&(ticket, event)) = self.pending[s].front() {
                // SAFETY: a live event.
                let rc = unsafe { sys::cuEventQuery(event) };
                if rc == sys::CUresult::CUDA_ERROR_NOT_READY {
                    break;
                }
                self.pending[s].pop_front();
                self.events.push(event);
                done.push((ticket, check("copy", rc)));
            }
        }
    }

    fn busy(&self) -> bool {
        self.pending.iter().any(|p| !p.is_empty())
    }
}

impl Drop for CudaCopies {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        for s in self.streams {
            // SAFETY: waits for the stream's copies, then destroys it once.
            unsafe {
                sys::cuStreamSynchronize(s);
                sys::cuStreamDestroy_v2(s);
            }
        }
        for e in self.events.drain(..).chain(self.pending.iter_mut().flat_map(|p| p.drain(..).map(|(_, e)| e))) {
            // SAFETY: each event destroyed once.
            unsafe { sys::cuEventDestroy_v2(e) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_a_reason_or_gpus() {
        match probe() {
            Ok(info) => {
                assert!(!info.gpus.is_empty());
                assert!(info.driver_version >= 1000, "{info:?}");
            }
            Err(e) => {
                assert!(!e.0.is_empty());
                println!("CUDA tests skipped: {e}");
            }
        }
    }

    #[test]
    fn versions_read_as_major_minor() {
        let info = CudaInfo { driver_version: 13000, gpus: Vec::new() };
        assert_eq!(info.driver_version_string(), "13.0");
        let info = CudaInfo { driver_version: 12080, gpus: Vec::new() };
        assert_eq!(info.driver_version_string(), "12.8");
    }
}
