//! `TransferEngine`, `Region`, `Descriptor` and `ScatterTarget`.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors::{raise, to_py, IntoPy};
use crate::export::export;
use crate::handles::{blocking, ImmCounter, Transfer};

fn parse_access(py: Python<'_>, remote: Option<&str>) -> PyResult<strait::Access> {
    Ok(match remote.unwrap_or("none") {
        "none" => strait::Access::LOCAL,
        "write" => strait::Access::REMOTE_WRITE,
        "read" => strait::Access::REMOTE_READ,
        "read_write" | "rw" => strait::Access::REMOTE_READ_WRITE,
        other => {
            return Err(raise(
                py,
                "InvalidRequestError",
                format!("remote must be None, \"write\", \"read\" or \"read_write\", not {other:?}"),
            ))
        }
    })
}

fn access_name(access: strait::Access) -> &'static str {
    match (access.remote_write, access.remote_read) {
        (false, false) => "none",
        (true, false) => "write",
        (false, true) => "read",
        (true, true) => "read_write",
    }
}

/// A decoded memory descriptor of a (usually remote) region: what a peer
/// needs to write into it or read from it.
///
/// `Descriptor(data)` validates every field of the bytes a peer sent
/// (`strait.InvalidDescriptorError` otherwise). Operations accept either a
/// `Descriptor` or the raw bytes; decoding once and reusing the `Descriptor`
/// saves the decode on every request. Picklable; `bytes(d)` gives the bytes
/// back.
#[pyclass(module = "strait._strait", frozen, eq, skip_from_py_object)]
#[derive(Clone, PartialEq)]
pub struct Descriptor {
    inner: strait::MrDesc,
}

#[pymethods]
impl Descriptor {
    #[new]
    fn new(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(Descriptor { inner: strait::MrDesc::from_bytes(data).py(py)? })
    }

    /// Length of the region in bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.len()
    }

    /// What peers may do: `"none"`, `"write"`, `"read"` or `"read_write"`.
    #[getter]
    fn remote(&self) -> &'static str {
        access_name(self.inner.access())
    }

    /// The owner's engine address (bytes).
    #[getter]
    fn owner<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.owner().to_bytes())
    }

    /// The owner's provider: `"efa"`, `"verbs"`, `"tcp"` or `"shm"`.
    #[getter]
    fn provider(&self) -> String {
        self.inner.provider().to_string()
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let bytes = PyBytes::new(py, &slf.get().inner.to_bytes());
        PyTuple::new(py, [slf.get_type().into_any(), PyTuple::new(py, [bytes])?.into_any()])
    }

    fn __repr__(&self) -> String {
        format!(
            "<strait.Descriptor {} bytes, remote={}, {} NIC(s) on {}>",
            self.inner.len(),
            access_name(self.inner.access()),
            self.inner.owner().nic_count(),
            self.inner.provider()
        )
    }
}

/// A descriptor argument: a `Descriptor`, a `Region` (one of ours), or bytes.
fn descriptor(arg: &Bound<'_, PyAny>) -> PyResult<strait::MrDesc> {
    let py = arg.py();
    if let Ok(d) = arg.cast::<Descriptor>() {
        return Ok(d.get().inner.clone());
    }
    if let Ok(r) = arg.cast::<Region>() {
        return Ok(r.get().region(py)?.descriptor().clone());
    }
    match arg.extract::<Vec<u8>>() {
        Ok(bytes) if !arg.is_instance_of::<pyo3::types::PyString>() => strait::MrDesc::from_bytes(&bytes).py(py),
        _ => Err(raise(
            py,
            "InvalidDescriptorError",
            format!(
                "expected a descriptor (bytes, strait.Descriptor or strait.Region), got {}",
                arg.get_type().name()?
            ),
        )),
    }
}

/// An engine address argument: bytes, or the hex string of `address_hex`.
fn address(arg: &Bound<'_, PyAny>) -> PyResult<strait::EngineAddress> {
    let py = arg.py();
    let bytes = if let Ok(s) = arg.extract::<String>() {
        decode_hex(&s).ok_or_else(|| raise(py, "InvalidDescriptorError", "invalid engine address: not hex"))?
    } else if let Ok(e) = arg.cast::<TransferEngine>() {
        e.get().engine(py)?.address().to_bytes()
    } else {
        arg.extract::<Vec<u8>>()
            .map_err(|_| raise(py, "InvalidDescriptorError", "expected an engine address (bytes, or its hex string)"))?
    };
    strait::EngineAddress::from_bytes(&bytes).py(py)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Memory registered with every NIC of an engine (from
/// `TransferEngine.register` or `TransferEngine.alloc`).
///
/// `descriptor` is the bytes to give peers so they can write here (with
/// `remote="write"`) or read from here (`remote="read"`). The registered
/// object is kept alive, and a `bytearray` cannot be resized, until the
/// region is closed (`close()`, `with`, or garbage collection) and every
/// request using it has ended; closing revokes peers' access at once.
#[pyclass(module = "strait._strait", frozen)]
pub struct Region {
    inner: Mutex<Option<strait::MemoryRegion>>,
    nbytes: u64,
    ptr: usize,
    writable: bool,
    access: strait::Access,
    descriptor: Py<PyBytes>,
    obj: Option<Py<PyAny>>,
    via: &'static str,
}

impl Region {
    pub(crate) fn region(&self, py: Python<'_>) -> PyResult<strait::MemoryRegion> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| raise(py, "InvalidRequestError", "the region is closed"))
    }

    fn new(
        py: Python<'_>,
        region: strait::MemoryRegion,
        writable: bool,
        obj: Option<Py<PyAny>>,
        via: &'static str,
    ) -> Self {
        Region {
            nbytes: region.len(),
            ptr: region.as_ptr() as usize,
            writable,
            access: region.descriptor().access(),
            descriptor: PyBytes::new(py, &region.descriptor().to_bytes()).unbind(),
            inner: Mutex::new(Some(region)),
            obj,
            via,
        }
    }

    fn check_writable(&self, py: Python<'_>, what: &str) -> PyResult<()> {
        if self.writable {
            return Ok(());
        }
        Err(raise(py, "InvalidRequestError", format!("the region's memory is read-only: it cannot be {what}")))
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let region = self.inner.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if region.is_some() {
            // Deregistration waits for the engine's thread, which may itself
            // be waiting for the GIL to run a callback.
            Python::attach(|py| py.detach(|| drop(region)));
        }
    }
}

#[pymethods]
impl Region {
    /// Length in bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    fn __len__(&self) -> usize {
        self.nbytes as usize
    }

    /// Address of the first byte.
    #[getter]
    fn ptr(&self) -> usize {
        self.ptr
    }

    /// The descriptor to give peers (bytes; decode with `strait.Descriptor`).
    #[getter]
    fn descriptor(&self, py: Python<'_>) -> Py<PyBytes> {
        self.descriptor.clone_ref(py)
    }

    /// What peers may do: `"none"`, `"write"`, `"read"` or `"read_write"`.
    #[getter]
    fn remote(&self) -> &'static str {
        access_name(self.access)
    }

    /// False for read-only memory (e.g. `bytes`): it can be a source only.
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }

    /// The registered object (`None` for `alloc`).
    #[getter]
    fn obj(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.obj.as_ref().map(|o| o.clone_ref(py))
    }

    /// How the memory was found: `"alloc"`, `"dlpack_versioned"` (a DLPack
    /// 1.x capsule, asked for first), `"dlpack"` (an unversioned capsule,
    /// from producers that predate DLPack 1.0), `"buffer"` or `"data_ptr"`.
    #[getter]
    fn source(&self) -> &'static str {
        self.via
    }

    /// True once the region is closed.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Copies `nbytes` bytes (default: to the end) at `offset` out.
    #[pyo3(signature = (offset=0, nbytes=None))]
    fn read<'py>(&self, py: Python<'py>, offset: u64, nbytes: Option<u64>) -> PyResult<Bound<'py, PyBytes>> {
        let region = self.region(py)?;
        let len = nbytes.unwrap_or_else(|| self.nbytes.saturating_sub(offset));
        let data = region.to_vec(offset, len).py(py)?;
        Ok(PyBytes::new(py, &data))
    }

    /// Copies `data` (any bytes-like object) into the region at `offset`.
    #[pyo3(signature = (data, offset=0))]
    fn write(&self, py: Python<'_>, data: Vec<u8>, offset: u64) -> PyResult<()> {
        self.check_writable(py, "written")?;
        self.region(py)?.write_at(offset, &data).py(py)
    }

    /// Deregisters now: peers lose access before this returns (requests in
    /// flight keep the memory registered until they end; for staged device
    /// memory, peers' requests arriving later are refused, and the chunks
    /// being served when it closes finish first). Idempotent.
    fn close(&self, py: Python<'_>) {
        let region = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(|| drop(region));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _ty: Option<Py<PyAny>>,
        _value: Option<Py<PyAny>>,
        _tb: Option<Py<PyAny>>,
    ) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!("<strait.Region {} bytes at {:#x}, remote={}, via {}>", self.nbytes, self.ptr, self.remote(), self.via)
    }
}

/// One destination of `TransferEngine.scatter`: `nbytes` bytes from
/// `src_offset` of the source region to `dst_offset` of the peer's region
/// `dst`, optionally followed by immediate `imm` at that peer.
#[pyclass(module = "strait._strait", frozen)]
pub struct ScatterTarget {
    inner: strait::ScatterTarget,
}

#[pymethods]
impl ScatterTarget {
    #[new]
    #[pyo3(signature = (dst, nbytes, *, src_offset=0, dst_offset=0, imm=None))]
    fn new(dst: &Bound<'_, PyAny>, nbytes: u64, src_offset: u64, dst_offset: u64, imm: Option<u32>) -> PyResult<Self> {
        Ok(ScatterTarget {
            inner: strait::ScatterTarget { dst: descriptor(dst)?, src_offset, dst_offset, len: nbytes, imm },
        })
    }

    fn __repr__(&self) -> String {
        let t = &self.inner;
        format!("<strait.ScatterTarget {} bytes from {} to {} imm={:?}>", t.len, t.src_offset, t.dst_offset, t.imm)
    }
}

/// A group of NICs and the worker thread that drives them: the entry point
/// of strait.
///
/// ``provider`` is ``"auto"`` (EFA if present, else ConnectX verbs, else tcp), ``"efa"``, ``"verbs"``,
/// ``"tcp"`` or ``"shm"``; ``nics`` how many NICs to drive as one group;
/// ``interface`` restricts tcp to one network interface (``"lo"`` for
/// loopback). ``poll="adaptive"`` (the default) spins ``spin_us``
/// microseconds after the last work, then sleeps; ``"busy"`` never sleeps
/// (use ``pin_worker`` then). ``receive_buffers=(count, size)`` sizes the
/// two-sided receive pool. Received messages go to ``on_message(data)`` if
/// given (called on the engine's thread with the GIL), else to ``recv()``.
/// Immediates no counter claims are kept for a later ``expect_imm``; with
/// ``unclaimed_imm="queue"`` they go to ``next_imm()`` instead, and with a
/// callable it is called with each. A request fails with
/// ``strait.PeerUnreachableError`` once its peer has completed none of this
/// engine's operations for ``request_timeout`` seconds (``None``: never).
/// On ConnectX, ``verbs_devices`` (e.g. ``["mlx5_0", "mlx5_3"]``; default
/// every device with an active port), ``verbs_port`` and ``verbs_gid_index``
/// (default: the IPv4-mapped RoCE v2 GID on RoCE, GID 0 on InfiniBand)
/// choose what the verbs backend opens. On EFA, ``efa_fabric`` is ``"efa"``
/// (the default: the provider's RDM protocol) or ``"efa-direct"``
/// (libfabric 2.1+; sends limited to the device's MTU); every engine of a
/// job must open the same one. ``gpu=n`` uses the RDMA NICs nearest to GPU
/// ``n`` (PCI order; ``strait.gpu_nic_map()`` shows them). ``packing``:
/// strided copies and paged writes whose runs average fewer bytes than
/// this are packed (gathered, moved in 2 MiB chunks, copied in by the
/// target; ``0``: never; ``None``: the provider's figure, 64 KiB on tcp,
/// never elsewhere).
///
/// Use it as a context manager, or call ``shutdown()``: requests in flight
/// then end with ``strait.ShutdownError``. Every method releases the GIL
/// while it waits for the engine.
#[pyclass(module = "strait._strait", frozen, weakref)]
pub struct TransferEngine {
    inner: Arc<Mutex<Option<strait::TransferEngine>>>,
    address: Py<PyBytes>,
}

type EngineSlot = Arc<Mutex<Option<strait::TransferEngine>>>;

/// Every engine the module has opened and not yet dropped, so that
/// [`shutdown_all`] can stop them at interpreter exit.
static OPEN_ENGINES: Mutex<Vec<Weak<Mutex<Option<strait::TransferEngine>>>>> = Mutex::new(Vec::new());

fn track(slot: &EngineSlot) {
    let mut open = OPEN_ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|w| w.strong_count() > 0);
    open.push(Arc::downgrade(slot));
}

/// Shuts down every engine still open (registered with `atexit` by the
/// package): their threads must not call back into Python while the
/// interpreter finalises.
#[pyfunction]
pub fn _shutdown_all(py: Python<'_>) {
    let open = std::mem::take(&mut *OPEN_ENGINES.lock().unwrap_or_else(|e| e.into_inner()));
    for slot in open.iter().filter_map(Weak::upgrade) {
        let engine = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(|| drop(engine));
    }
}

impl TransferEngine {
    pub(crate) fn engine(&self, py: Python<'_>) -> PyResult<strait::TransferEngine> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| to_py(py, strait::Error::Shutdown))
    }

    /// Submits `op` with the GIL released.
    fn submit(
        &self,
        py: Python<'_>,
        op: impl FnOnce(&strait::TransferEngine) -> strait::Result<strait::Transfer> + Send,
    ) -> PyResult<Transfer> {
        let engine = self.engine(py)?;
        let transfer = py.detach(|| op(&engine)).py(py)?;
        Ok(Transfer::new(transfer))
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        let engine = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if engine.is_some() {
            // Stopping joins the worker, which may be waiting for the GIL.
            Python::attach(|py| py.detach(|| drop(engine)));
        }
    }
}

fn callback_from_python(callback: Py<PyAny>) -> impl Fn(&[u8]) + Send + Sync + 'static {
    move |data: &[u8]| {
        Python::attach(|py| {
            if let Err(e) = callback.call1(py, (PyBytes::new(py, data),)) {
                e.write_unraisable(py, Some(callback.bind(py)));
            }
        })
    }
}

#[pymethods]
impl TransferEngine {
    #[new]
    #[pyo3(signature = (
        provider="auto", nics=1, *, interface=None, poll="adaptive", spin_us=50, pin_worker=None,
        receive_buffers=None, on_message=None, unclaimed_imm=None, request_timeout=10.0,
        verbs_devices=None, verbs_port=1, verbs_gid_index=None, efa_fabric="efa", gpu=None, packing=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        provider: &str,
        nics: usize,
        interface: Option<String>,
        poll: &str,
        spin_us: u64,
        pin_worker: Option<usize>,
        receive_buffers: Option<(usize, usize)>,
        on_message: Option<Py<PyAny>>,
        unclaimed_imm: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<f64>,
        verbs_devices: Option<Vec<String>>,
        verbs_port: u8,
        verbs_gid_index: Option<u8>,
        efa_fabric: &str,
        gpu: Option<usize>,
        packing: Option<u64>,
    ) -> PyResult<Self> {
        let request_timeout = crate::handles::parse_timeout(py, request_timeout)?;
        let provider = match provider {
            "auto" => strait::Provider::Auto,
            "efa" => strait::Provider::Efa,
            "tcp" => strait::Provider::Tcp,
            "shm" => strait::Provider::Shm,
            "verbs" => strait::Provider::Verbs,
            other => {
                return Err(raise(
                    py,
                    "InvalidRequestError",
                    format!("provider must be \"auto\", \"efa\", \"verbs\", \"tcp\" or \"shm\", not {other:?}"),
                ))
            }
        };
        let poll = match poll {
            "adaptive" => strait::PollMode::Adaptive { spin: Duration::from_micros(spin_us) },
            "busy" => strait::PollMode::Busy,
            other => {
                return Err(raise(
                    py,
                    "InvalidRequestError",
                    format!("poll must be \"adaptive\" or \"busy\", not {other:?}"),
                ))
            }
        };
        let efa_fabric: strait::EfaFabric = efa_fabric.parse().map_err(|e: strait::Error| {
            raise(py, "InvalidRequestError", format!("efa_fabric must be \"efa\" or \"efa-direct\": {e}"))
        })?;
        let mut builder = strait::TransferEngine::builder()
            .provider(provider)
            .nics(nics)
            .poll_mode(poll)
            .request_timeout(request_timeout)
            .efa_fabric(efa_fabric);
        if let Some(interface) = interface {
            builder = builder.interface(interface);
        }
        if let Some(gpu) = gpu {
            builder = builder.for_gpu(gpu);
        }
        if let Some(bytes) = packing {
            builder = builder.packing(bytes);
        }
        let mut verbs = strait::VerbsConfig::default();
        verbs.devices = verbs_devices.unwrap_or_default();
        verbs.port = verbs_port;
        verbs.gid_index = verbs_gid_index;
        builder = builder.verbs(verbs);
        if let Some(cpu) = pin_worker {
            builder = builder.pin_worker(cpu);
        }
        if let Some((count, size)) = receive_buffers {
            builder = builder.receive_buffers(count, size);
        }
        if let Some(callback) = on_message {
            builder = builder.on_message(callback_from_python(callback));
        }
        match unclaimed_imm {
            None => {}
            Some(u) if u.is_none() => {}
            Some(u) if u.extract::<String>().is_ok_and(|s| s == "queue") => builder = builder.unclaimed_imm_queue(),
            Some(u) if u.is_callable() => {
                let callback = u.clone().unbind();
                builder = builder.on_unclaimed_imm(move |imm| {
                    Python::attach(|py| {
                        if let Err(e) = callback.call1(py, (imm,)) {
                            e.write_unraisable(py, Some(callback.bind(py)));
                        }
                    })
                });
            }
            Some(_) => {
                return Err(raise(py, "InvalidRequestError", "unclaimed_imm must be None, \"queue\" or a callable"))
            }
        }
        let engine = py.detach(|| builder.build()).py(py)?;
        let address = PyBytes::new(py, &engine.address().to_bytes()).unbind();
        let inner = Arc::new(Mutex::new(Some(engine)));
        track(&inner);
        Ok(TransferEngine { inner, address })
    }

    /// This engine's address (bytes): give it to peers that send to it.
    #[getter]
    fn address(&self, py: Python<'_>) -> Py<PyBytes> {
        self.address.clone_ref(py)
    }

    /// The address as a hex string (accepted wherever an address is).
    #[getter]
    fn address_hex(&self, py: Python<'_>) -> String {
        hex(self.address.as_bytes(py))
    }

    /// The provider in use: `"efa"`, `"verbs"`, `"tcp"` or `"shm"`.
    #[getter]
    fn provider(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.engine(py)?.provider().to_string())
    }

    /// NICs in the group.
    #[getter]
    fn nics(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.engine(py)?.nic_count())
    }

    /// Registers the memory of `obj` with every NIC. `obj` exposes
    /// `__dlpack__` (numpy arrays, PyTorch tensors, CuPy), the buffer
    /// protocol (`bytearray`, `memoryview`, numpy; read-only buffers such as
    /// `bytes` can only be sources), or `data_ptr()`/`nbytes` (PyTorch); it
    /// must be contiguous. `remote` is what peers may do: `None` (local
    /// use only), `"write"`, `"read"` or `"read_write"`. The object is kept
    /// alive while registered.
    ///
    /// CUDA tensors (PyTorch, CuPy: DLPack `kDLCUDA`, or `data_ptr()` with a
    /// `cuda` device) register as device memory, staged through pinned host
    /// buffers on transports without GPUDirect (see the README's "GPU
    /// memory"); without a CUDA driver this raises `CudaError`.
    #[pyo3(signature = (obj, remote=None))]
    fn register(&self, py: Python<'_>, obj: &Bound<'_, PyAny>, remote: Option<&str>) -> PyResult<Region> {
        let access = parse_access(py, remote)?;
        let found = export(obj)?;
        if access.remote_write && !found.writable {
            return Err(raise(
                py,
                "InvalidRequestError",
                "read-only memory cannot be registered with remote write access",
            ));
        }
        let engine = self.engine(py)?;
        let (ptr, len) = (found.ptr, found.len);
        // The keepalive (a capsule, a memoryview export or the object) keeps
        // ptr..ptr+len valid and in place while it lives, and the engine
        // holds it until the memory is deregistered. It is a Py handle, so
        // dropping it on the engine's thread defers the decref to the next
        // holder of the GIL.
        let (keepalive, gpu) = (found.keepalive, found.gpu);
        let region = py
            .detach(|| match gpu {
                // SAFETY: see above; for a CUDA tensor the keepalive holds
                // its device memory.
                Some(gpu) => unsafe { engine.register_device_owned(ptr as u64, len, gpu, access, keepalive) },
                // SAFETY: see above.
                None => unsafe { engine.register_owned(ptr as *mut u8, len, access, keepalive) },
            })
            .py(py)?;
        Ok(Region::new(py, region, found.writable, Some(obj.clone().unbind()), found.via))
    }

    /// Allocates `nbytes` zeroed, page-aligned bytes owned by the engine and
    /// registers them (see `register` for `remote`). Read and write them
    /// with `Region.read`/`Region.write`.
    #[pyo3(signature = (nbytes, remote=None))]
    fn alloc(&self, py: Python<'_>, nbytes: u64, remote: Option<&str>) -> PyResult<Region> {
        let access = parse_access(py, remote)?;
        let engine = self.engine(py)?;
        let region = py.detach(|| engine.alloc(nbytes, access)).py(py)?;
        Ok(Region::new(py, region, true, None, "alloc"))
    }

    /// Writes `nbytes` bytes (default: the rest of `src`) from `src` at
    /// `src_offset` into the peer's region `dst` at `dst_offset`. With `imm`,
    /// the peer receives that 32-bit immediate exactly once, after all the
    /// bytes have landed. Large writes are split across the NICs of both
    /// sides.
    #[pyo3(signature = (src, dst, *, nbytes=None, src_offset=0, dst_offset=0, imm=None))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn write(
        &self,
        py: Python<'_>,
        src: &Region,
        dst: &Bound<'_, PyAny>,
        nbytes: Option<u64>,
        src_offset: u64,
        dst_offset: u64,
        imm: Option<u32>,
    ) -> PyResult<Transfer> {
        let (src, dst) = (src.region(py)?, descriptor(dst)?);
        let len = nbytes.unwrap_or_else(|| src.len().saturating_sub(src_offset));
        self.submit(py, |e| e.write(&src, src_offset, &dst, dst_offset, len, imm))
    }

    /// Writes many ranges of `src` into `dst` with one call and one hand-off
    /// to the engine: write `i` takes `lengths[i]` bytes from `src` at
    /// `src_offsets[i]` to `dst` at `dst_offsets[i]`. The three arguments are
    /// numpy arrays of uint64/int64 (read in one copy, no Python object per
    /// element) or sequences of ints, of equal length. With `imm`, every
    /// write delivers it once after its own bytes (a counter at the target
    /// expects `len(lengths)`). Every write is checked before any is posted.
    /// Returns one `Transfer` for the batch (`joined=True`, the default: it
    /// succeeds when every write has, else carries the first error), or a
    /// list of one per write.
    #[pyo3(signature = (src, dst, src_offsets, dst_offsets, lengths, *, imm=None, joined=true))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn write_batch(
        &self,
        py: Python<'_>,
        src: &Region,
        dst: &Bound<'_, PyAny>,
        src_offsets: &Bound<'_, PyAny>,
        dst_offsets: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        imm: Option<u32>,
        joined: bool,
    ) -> PyResult<Py<PyAny>> {
        let (src, dst) = (src.region(py)?, descriptor(dst)?);
        let src_offsets = crate::export::u64s(src_offsets, "src_offsets")?;
        let dst_offsets = crate::export::u64s(dst_offsets, "dst_offsets")?;
        let lengths = crate::export::u64s(lengths, "lengths")?;
        if src_offsets.len() != lengths.len() || dst_offsets.len() != lengths.len() {
            return Err(raise(
                py,
                "InvalidRequestError",
                format!(
                    "src_offsets, dst_offsets and lengths differ in length ({}, {}, {})",
                    src_offsets.len(),
                    dst_offsets.len(),
                    lengths.len()
                ),
            ));
        }
        let engine = self.engine(py)?;
        let submitted = py
            .detach(|| {
                let mut batch = engine.batch();
                let ranges = (0..lengths.len()).map(|i| (src_offsets[i], dst_offsets[i], lengths[i]));
                batch.writes(&src, &dst, ranges, imm)?;
                if joined {
                    batch.submit_joined().map(|t| (Some(t), Vec::new()))
                } else {
                    batch.submit().map(|ts| (None, ts))
                }
            })
            .py(py)?;
        match submitted {
            (Some(t), _) => Ok(Py::new(py, Transfer::new(t))?.into_any()),
            (None, ts) => {
                let list = ts.into_iter().map(|t| Py::new(py, Transfer::new(t))).collect::<PyResult<Vec<_>>>()?;
                Ok(pyo3::types::PyList::new(py, list)?.into_any().unbind())
            }
        }
    }

    /// Delivers only the immediate `imm` to the owner of `dst` (a
    /// zero-length write).
    fn write_imm(&self, py: Python<'_>, dst: &Bound<'_, PyAny>, imm: u32) -> PyResult<Transfer> {
        let dst = descriptor(dst)?;
        self.submit(py, |e| e.write_imm(&dst, imm))
    }

    /// Writes pages (the KV-cache transfer): page `src_pages[i]` of `src` to
    /// page `dst_pages[i]` of `dst`. A page is `page_size` bytes; pages are
    /// `src_stride`/`dst_stride` bytes apart (default `page_size`), from
    /// `src_offset`/`dst_offset`. Runs of pages consecutive on both sides are
    /// coalesced; one immediate `imm` after all pages have landed.
    #[pyo3(signature = (
        src, dst, src_pages, dst_pages, *, page_size, src_stride=None, dst_stride=None,
        src_offset=0, dst_offset=0, imm=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn write_paged(
        &self,
        py: Python<'_>,
        src: &Region,
        dst: &Bound<'_, PyAny>,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        page_size: u64,
        src_stride: Option<u64>,
        dst_stride: Option<u64>,
        src_offset: u64,
        dst_offset: u64,
        imm: Option<u32>,
    ) -> PyResult<Transfer> {
        let (src, dst) = (src.region(py)?, descriptor(dst)?);
        let layout = strait::PagedLayout {
            page_len: page_size,
            src_stride: src_stride.unwrap_or(page_size),
            dst_stride: dst_stride.unwrap_or(page_size),
            src_offset,
            dst_offset,
        };
        self.submit(py, |e| e.write_paged(&src, &dst, layout, src_pages, dst_pages, imm))
    }

    /// Writes parts of `src` to several peers or places (a list of
    /// `ScatterTarget`), each with its own optional immediate. One handle
    /// for all; every target is checked before any is posted.
    fn scatter(&self, py: Python<'_>, src: &Region, targets: Vec<Py<ScatterTarget>>) -> PyResult<Transfer> {
        let src = src.region(py)?;
        let targets: Vec<strait::ScatterTarget> = targets.iter().map(|t| t.get().inner.clone()).collect();
        self.submit(py, |e| e.scatter(&src, &targets))
    }

    /// Delivers immediate `imm` to the owner of each descriptor in `peers`
    /// (a barrier's signal); ends once every peer has it.
    fn barrier(&self, py: Python<'_>, peers: Vec<Bound<'_, PyAny>>, imm: u32) -> PyResult<Transfer> {
        let peers = peers.iter().map(descriptor).collect::<PyResult<Vec<_>>>()?;
        self.submit(py, |e| e.barrier(&peers, imm))
    }

    /// Reads `nbytes` bytes (default: the rest of `dst`) of the peer's
    /// region `src` at `src_offset` into `dst` at `dst_offset` (one-sided;
    /// `src` needs remote read access).
    #[pyo3(signature = (dst, src, *, nbytes=None, dst_offset=0, src_offset=0))]
    fn read(
        &self,
        py: Python<'_>,
        dst: &Region,
        src: &Bound<'_, PyAny>,
        nbytes: Option<u64>,
        dst_offset: u64,
        src_offset: u64,
    ) -> PyResult<Transfer> {
        dst.check_writable(py, "read into")?;
        let (dst, src) = (dst.region(py)?, descriptor(src)?);
        let len = nbytes.unwrap_or_else(|| dst.len().saturating_sub(dst_offset));
        self.submit(py, |e| e.read(&dst, dst_offset, &src, src_offset, len))
    }

    /// Sends `nbytes` bytes (default: the rest) of `src` at `offset` as one
    /// message to the engine at address `peer` (two-sided; it must fit in
    /// one of the peer's receive buffers, 64 KiB by default).
    #[pyo3(signature = (peer, src, *, offset=0, nbytes=None))]
    fn send(
        &self,
        py: Python<'_>,
        peer: &Bound<'_, PyAny>,
        src: &Region,
        offset: u64,
        nbytes: Option<u64>,
    ) -> PyResult<Transfer> {
        let (peer, src) = (address(peer)?, src.region(py)?);
        let len = nbytes.unwrap_or_else(|| src.len().saturating_sub(offset));
        self.submit(py, |e| e.send(&peer, &src, offset, len))
    }

    /// The next message received (bytes), waiting up to `timeout` seconds
    /// (forever if `None`); `strait.TimeoutError` after that. Not available
    /// with `on_message`.
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let engine = self.engine(py)?;
        let data = blocking(py, timeout, |slice| engine.recv_timeout(slice))?;
        Ok(PyBytes::new(py, &data))
    }

    /// The next immediate no counter claimed (with `unclaimed_imm="queue"`),
    /// waiting up to `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn next_imm(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u32> {
        let engine = self.engine(py)?;
        blocking(py, timeout, |slice| engine.next_imm(slice))
    }

    /// A counter reached once `count` immediates of `value` have arrived
    /// (counting those that arrived earlier and were not claimed). One
    /// counter per value at a time.
    #[pyo3(signature = (value, count=1))]
    fn expect_imm(&self, py: Python<'_>, value: u32, count: u64) -> PyResult<ImmCounter> {
        let engine = self.engine(py)?;
        let counter = py.detach(|| engine.expect_imm(value, count)).py(py)?;
        Ok(ImmCounter::new(counter, count))
    }

    /// A snapshot of what the engine has done and has in flight, as a dict:
    /// `nics` (per NIC: `posted` {writes, reads, sends}, `bytes_posted`,
    /// `busy`, `completed`, `errors` {kind: count}, `imms_out`, `imms_in`,
    /// `messages_in`), `peers` (per peer: `address` (hex), `label`,
    /// `posted`, `bytes_posted`, `imms_out`, `completed`, `errors`,
    /// `requests_ok`, `requests_failed`, `in_flight`, `oldest_in_flight`
    /// (seconds or None), `expired`, `resets`), `in_flight`,
    /// `oldest_in_flight`, `latency` (per kind write/read/send: `count`,
    /// `mean`, `p50`, `p90`, `p99`, `max`, in seconds), `receive_buffers`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let engine = self.engine(py)?;
        let s = py.detach(|| engine.stats()).py(py)?;
        crate::stats::to_dict(py, &s)
    }

    /// The snapshot as text: `"table"` (one line per NIC and peer, and the
    /// latency percentiles) or `"prometheus"` (the text exposition format,
    /// metric names prefixed with `prefix`).
    #[pyo3(signature = (format="table", prefix="strait"))]
    fn stats_text(&self, py: Python<'_>, format: &str, prefix: &str) -> PyResult<String> {
        let engine = self.engine(py)?;
        let s = py.detach(|| engine.stats()).py(py)?;
        match format {
            "table" => Ok(s.table()),
            "prometheus" => Ok(s.prometheus(prefix)),
            other => Err(raise(
                py,
                "InvalidRequestError",
                format!("format must be \"table\" or \"prometheus\", not {other:?}"),
            )),
        }
    }

    /// Names the engine at `peer` (an address) in `stats()`.
    fn label_peer(&self, py: Python<'_>, peer: &Bound<'_, PyAny>, label: &str) -> PyResult<()> {
        let peer = address(peer)?;
        self.engine(py)?.label_peer(&peer, label);
        Ok(())
    }

    /// Stops the engine: requests in flight end with `strait.ShutdownError`,
    /// and later calls raise it. Idempotent; returns once the worker has
    /// stopped.
    fn shutdown(&self, py: Python<'_>) {
        let engine = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(|| {
            if let Some(engine) = engine {
                engine.shutdown();
            }
        });
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _ty: Option<Py<PyAny>>,
        _value: Option<Py<PyAny>>,
        _tb: Option<Py<PyAny>>,
    ) -> bool {
        self.shutdown(py);
        false
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match self.engine(py) {
            Ok(e) => format!("<strait.TransferEngine {} x{} {}>", e.provider(), e.nic_count(), self.address_hex(py)),
            Err(_) => "<strait.TransferEngine (shut down)>".into(),
        }
    }
}
