//! Registered memory: `MemoryRegion` and its shared state.

use std::alloc::Layout;
use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::link::Link;
use super::worker::Command;
use crate::descriptor::{check_range, MrDesc};
use crate::error::{Error, Result};

/// Page size used by [`TransferEngine::alloc`](crate::TransferEngine::alloc).
pub const PAGE_SIZE: usize = 4096;

/// A zeroed, page-aligned heap allocation.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a plain heap allocation owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn zeroed(len: u64) -> Result<Self> {
        let size =
            usize::try_from(len).map_err(|_| Error::InvalidRequest(format!("{len} bytes do not fit in memory")))?;
        if size == 0 {
            return Err(Error::InvalidRequest("cannot allocate 0 bytes".into()));
        }
        let layout = Layout::from_size_align(size, PAGE_SIZE).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::RegisterMemory { addr: 0, len, reason: "allocation failed".into() });
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Whatever keeps registered memory valid: the engine's own buffer
/// ([`AlignedBuf`]) or the owner given to
/// [`TransferEngine::register_owned`](crate::TransferEngine::register_owned).
/// The worker drops it once the memory is deregistered.
pub(crate) type Owner = Box<dyn Send>;

/// Registration state shared by the user's handle and in-flight requests.
pub(crate) struct MrInner {
    pub(crate) id: u64,
    pub(crate) ptr: *mut u8,
    pub(crate) len: u64,
    /// Per-NIC local descriptors (for FI_MR_LOCAL providers).
    pub(crate) descs: Box<[*mut c_void]>,
    pub(crate) desc: MrDesc,
    /// Host memory: NICs may read it with the CPU (verbs: inline).
    pub(crate) host: bool,
    /// Device memory (registered with `register_device`): staged, no NIC
    /// registration, served by the engine's stager.
    pub(crate) device: Option<DeviceMemory>,
    owned: Option<Owner>,
    pub(crate) link: Arc<Link>,
}

// SAFETY: the raw pointers are addresses of registered memory and provider
// descriptors, only dereferenced by the worker (through the provider) and by
// the byte-copy helpers, whose callers coordinate with transfers as their
// docs say. Moving or sharing the addresses themselves is harmless.
unsafe impl Send for MrInner {}
// SAFETY: as above; MrInner has no interior mutability.
unsafe impl Sync for MrInner {}

impl MrInner {
    pub(crate) fn new(
        id: u64,
        ptr: *mut u8,
        len: u64,
        descs: Box<[*mut c_void]>,
        desc: MrDesc,
        owned: Option<Owner>,
        link: Arc<Link>,
    ) -> Self {
        MrInner { id, ptr, len, descs, desc, host: true, device: None, owned, link }
    }

    /// Device memory: registered with every NIC (`descs`, GPUDirect), or
    /// with none (`descs` empty, a staged descriptor: the stager moves its
    /// bytes).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_device(
        id: u64,
        ptr: *mut u8,
        len: u64,
        descs: Box<[*mut c_void]>,
        desc: MrDesc,
        device: DeviceMemory,
        owned: Option<Owner>,
        link: Arc<Link>,
    ) -> Self {
        MrInner { id, ptr, len, descs, desc, host: false, device: Some(device), owned, link }
    }

    /// Copies `len` bytes from `src` to `dst`, one of them inside this
    /// region (host memory: a memcpy; device memory: through CUDA).
    ///
    /// # Safety
    /// Both ranges must be valid for `len` bytes.
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
        match self.device.as_ref().and_then(|d| d.context.as_ref()) {
            Some(ctx) => crate::cuda::copy_sync(ctx, dst as u64, src as u64, len),
            None => {
                // SAFETY: valid ranges (caller).
                unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
                Ok(())
            }
        }
    }

    fn on_host(&self) -> bool {
        self.device.as_ref().is_none_or(|d| d.context.is_none())
    }

    /// Device memory no NIC registered: the stager moves its bytes.
    pub(crate) fn staged(&self) -> bool {
        self.desc.is_staged()
    }
}

/// Where a device region lives.
pub(crate) struct DeviceMemory {
    /// CUDA's ordinal of the GPU.
    pub(crate) gpu: u32,
    /// The GPU's primary context; `None` for the host-memory stand-in of
    /// the tests (device regions that are host memory).
    pub(crate) context: Option<Arc<crate::cuda::Context>>,
}

impl Drop for MrInner {
    fn drop(&mut self) {
        let owned = self.owned.take();
        if self.staged() {
            // No NIC registered it; the stager serves it through a weak
            // reference, which now fails. Its owner (a device allocation)
            // is freed here: no request holds the region any more.
            drop(owned);
            return;
        }
        if self.link.on_worker() {
            // The last in-flight request using the region just ended on the
            // worker: it deregisters (and frees) on its next turn.
            let _ = self.link.send(Command::Deregister { id: self.id, memory: owned, done: None });
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.link.send(Command::Deregister { id: self.id, memory: owned, done: Some(tx) }).is_ok() {
            // Deregistration is synchronous so that dropping a region revokes
            // peers' access before `drop` returns; bounded in case the worker
            // is wedged inside the provider.
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                tracing::warn!(id = self.id, "deregistration not confirmed within 10 s");
            }
        }
    }
}

/// Memory registered with every NIC of an engine.
///
/// Created by [`TransferEngine::alloc`](crate::TransferEngine::alloc) (the
/// engine owns a zeroed, page-aligned buffer) or
/// [`TransferEngine::register_raw`](crate::TransferEngine::register_raw)
/// (host memory you own).
///
/// Dropping the handle deregisters the memory and revokes remote access, but
/// never while a request that uses the region is in flight: requests hold
/// the registration until they end, and deregistration happens then.
///
/// The contents can be read and written with [`read_at`](Self::read_at) and
/// [`write_at`](Self::write_at) (copies, through CUDA for device memory) or
/// through the raw pointer (a device pointer for device memory). Peers
/// may write into a region with remote access at any time: coordinate with
/// them through immediates before reading.
#[derive(Clone)]
pub struct MemoryRegion {
    pub(crate) inner: Arc<MrInner>,
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion").field("addr", &self.inner.ptr).field("len", &self.inner.len).finish()
    }
}

impl MemoryRegion {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Always false: zero-length regions cannot be registered.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Start address of the memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.ptr
    }

    /// The descriptor to hand to peers so they can write or read here.
    pub fn descriptor(&self) -> &MrDesc {
        &self.inner.desc
    }

    /// Copies `data` into the region at `offset`. Must not race with a
    /// transfer into the same bytes.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range("region", offset, data.len() as u64, self.inner.len)?;
        // SAFETY: the range lies inside the registered memory, which lives as
        // long as self; the caller avoids racing transfers (documented).
        unsafe { self.inner.copy(self.inner.ptr.add(offset as usize), data.as_ptr(), data.len()) }
    }

    /// Copies bytes of the region at `offset` into `out`.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        check_range("region", offset, out.len() as u64, self.inner.len)?;
        // SAFETY: as for write_at.
        unsafe { self.inner.copy(out.as_mut_ptr(), self.inner.ptr.add(offset as usize), out.len()) }
    }

    /// `len` bytes at `offset`, copied out.
    pub fn to_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_range("region", offset, len, self.inner.len)?;
        let mut v = vec![0; len as usize];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }

    /// The GPU the region's memory is on (CUDA's ordinal), for device
    /// regions ([`TransferEngine::register_device`](crate::TransferEngine::register_device)).
    pub fn gpu(&self) -> Option<u32> {
        self.inner.device.as_ref().map(|d| d.gpu)
    }

    /// The region's bytes as a slice.
    ///
    /// # Panics
    /// On device memory (use [`read_at`](Self::read_at), which copies).
    ///
    /// # Safety
    /// No transfer may write into the region while the slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        assert!(self.inner.on_host(), "as_slice on device memory: use read_at");
        // SAFETY: memory is valid for len bytes; no concurrent writes (caller).
        unsafe { std::slice::from_raw_parts(self.inner.ptr, self.inner.len as usize) }
    }

    /// The region's bytes as a mutable slice.
    ///
    /// # Safety
    /// No transfer may read or write the region, and no other reference to
    /// its bytes may exist, while the slice is alive.
    ///
    /// # Panics
    /// On device memory (use [`write_at`](Self::write_at)).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        assert!(self.inner.on_host(), "as_mut_slice on device memory: use write_at");
        // SAFETY: memory is valid for len bytes; exclusive (caller).
        unsafe { std::slice::from_raw_parts_mut(self.inner.ptr, self.inner.len as usize) }
    }
}
