//! Finding the memory behind a Python object: `__dlpack__`, then the buffer
//! protocol, then `data_ptr()`/`nbytes` (PyTorch tensors), in that order.
//!
//! The result names the first byte, the length, whether it may be written,
//! and a Python object that keeps the memory where it is for as long as it
//! lives: the DLPack capsule (its destructor returns the tensor to its
//! owner), a `memoryview` (an open buffer export, which also stops a
//! `bytearray` from being resized), or the object itself.

use std::ffi::{c_char, c_int, c_void};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::errors::raise;

/// Memory found behind an object.
pub struct Exported {
    /// First byte.
    pub ptr: usize,
    /// Length in bytes.
    pub len: u64,
    /// False when the exporter said the memory must not be written.
    pub writable: bool,
    /// Keeps the memory alive and in place.
    pub keepalive: Py<PyAny>,
    /// How it was found: `dlpack` (an unversioned capsule),
    /// `dlpack_versioned` (DLPack 1.x), `buffer` or `data_ptr`.
    pub via: &'static str,
    /// CUDA device memory of this GPU (DLPack `kDLCUDA`, or a tensor whose
    /// `device.type` is `"cuda"`); `None` for host memory.
    pub gpu: Option<u32>,
}

/// The memory behind `obj`, or `UnsupportedObjectError` /
/// `RegisterMemoryError` saying why it cannot be registered.
pub fn export(obj: &Bound<'_, PyAny>) -> PyResult<Exported> {
    let py = obj.py();
    let mut tried = Vec::new();
    if obj.hasattr("__dlpack__")? {
        // DLPack 1.0 first (a versioned capsule, which can say the memory
        // is read-only); producers that predate it take no max_version.
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("max_version", (1, 0))?;
        let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => obj.call_method0("__dlpack__"),
            r => r,
        };
        match capsule {
            Ok(capsule) => return from_dlpack(obj, capsule),
            // numpy refuses read-only arrays this way before DLPack 1.0;
            // the buffer protocol below takes them (read-only).
            Err(e) => tried.push(format!("__dlpack__() raised {e}")),
        }
    }
    match from_buffer(obj)? {
        Ok(found) => return Ok(found),
        Err(why) => tried.push(why),
    }
    if obj.hasattr("data_ptr")? && obj.hasattr("nbytes")? {
        return from_data_ptr(obj);
    }
    tried.push("no data_ptr()/nbytes".into());
    let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    Err(raise(
        py,
        "UnsupportedObjectError",
        format!(
            "cannot register a {type_name}: it needs __dlpack__, the buffer protocol, or data_ptr()/nbytes ({})",
            tried.join("; ")
        ),
    ))
}

// DLPack: the unversioned "dltensor" capsule (0.8, what producers give when
// no max_version is asked for) and the versioned "dltensor_versioned" one
// (1.x: a version and flags before the same DLTensor).
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

#[repr(C)]
struct DlPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DlManagedTensorVersioned {
    version: DlPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DlTensor,
}

/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const DL_READ_ONLY: u64 = 1;

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;
const DL_CUDA_HOST: i32 = 3;
const DL_ROCM_HOST: i32 = 11;

fn device_name(device_type: i32) -> &'static str {
    match device_type {
        2 => "cuda",
        4 => "opencl",
        7 => "vulkan",
        8 => "metal",
        10 => "rocm",
        13 => "cuda_managed",
        14 => "oneapi",
        _ => "device",
    }
}

fn from_dlpack(obj: &Bound<'_, PyAny>, capsule: Bound<'_, PyAny>) -> PyResult<Exported> {
    let py = obj.py();
    let capsule = capsule
        .cast_into::<PyCapsule>()
        .map_err(|_| raise(py, "UnsupportedObjectError", "__dlpack__() returned something that is not a capsule"))?;
    let (plain, versioned) = (c"dltensor", c"dltensor_versioned");
    // SAFETY: the capsule is a live capsule object; IsValid only reads its
    // name and pointer.
    let is_versioned = unsafe { ffi::PyCapsule_IsValid(capsule.as_ptr(), versioned.as_ptr()) } != 0;
    // SAFETY: as above.
    let is_plain = unsafe { ffi::PyCapsule_IsValid(capsule.as_ptr(), plain.as_ptr()) } != 0;
    let (t, writable, via) = if is_versioned {
        // SAFETY: valid with this name, so its pointer is the producer's
        // DLManagedTensorVersioned, alive while the capsule is unconsumed
        // and referenced (we hold it, and never consume it).
        let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), versioned.as_ptr()) }
            as *const DlManagedTensorVersioned;
        if managed.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: non-null pointer to it (see above).
        let m = unsafe { &*managed };
        if m.version.major != 1 {
            return Err(raise(
                py,
                "UnsupportedObjectError",
                format!("__dlpack__() gave DLPack {}.{}; strait reads 1.x", m.version.major, m.version.minor),
            ));
        }
        (&m.dl_tensor, m.flags & DL_READ_ONLY == 0, "dlpack_versioned")
    } else if is_plain {
        // SAFETY: as above, for the unversioned DLManagedTensor.
        let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), plain.as_ptr()) } as *const DlManagedTensor;
        if managed.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: non-null pointer to it (see above).
        (unsafe { &(*managed).dl_tensor }, true, "dlpack")
    } else {
        return Err(raise(
            py,
            "UnsupportedObjectError",
            "__dlpack__() returned a capsule that is neither \"dltensor\" nor \"dltensor_versioned\"",
        ));
    };
    let device = t.device.device_type;
    let gpu = (device == DL_CUDA).then_some(t.device.device_id.max(0) as u32);
    if !matches!(device, DL_CPU | DL_CUDA | DL_CUDA_HOST | DL_ROCM_HOST) {
        return Err(raise(
            py,
            "RegisterMemoryError",
            format!(
                "{}:{} memory cannot be registered: strait registers host memory and CUDA device memory",
                device_name(device),
                t.device.device_id
            ),
        ));
    }
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack: shape points to ndim dimensions.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let strides: Option<&[i64]> = if t.strides.is_null() || ndim == 0 {
        None
    } else {
        // SAFETY: DLPack: non-null strides point to ndim strides (elements).
        Some(unsafe { std::slice::from_raw_parts(t.strides, ndim) })
    };
    if !c_contiguous(shape, strides) {
        return Err(raise(
            py,
            "UnsupportedObjectError",
            format!(
                "the array is not contiguous (shape {shape:?}, strides {:?} in elements): register a contiguous copy",
                strides.unwrap_or_default()
            ),
        ));
    }
    let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
    let item_bits = u64::from(t.dtype.bits) * u64::from(t.dtype.lanes);
    let len = elements.and_then(|n| n.checked_mul(item_bits.div_ceil(8))).ok_or_else(|| {
        raise(py, "UnsupportedObjectError", format!("array shape {shape:?} does not give a byte length"))
    })?;
    let ptr = (t.data as usize).wrapping_add(t.byte_offset as usize);
    let keepalive = (obj.clone(), capsule).into_pyobject(py)?.into_any().unbind();
    Ok(Exported { ptr, len, writable, keepalive, via, gpu })
}

/// Row-major with no gaps; dimensions of length 1 may have any stride.
fn c_contiguous(shape: &[i64], strides: Option<&[i64]>) -> bool {
    let Some(strides) = strides else { return true };
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1i64;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 && stride != expected {
            return false;
        }
        expected = expected.saturating_mul(dim);
    }
    true
}

// The buffer protocol. pyo3 exposes it under the stable ABI only from
// Python 3.11, but `PyObject_GetBuffer`, `PyBuffer_Release`,
// `PyBuffer_IsContiguous` and the `Py_buffer` layout have been the same since
// Python 3.3 (3.11 only added them to the limited API), so they are declared
// here for the 3.9+ abi3 module.
#[repr(C)]
struct PyBufferView {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

const PYBUF_FULL_RO: c_int = 0x0100 | 0x0010 | 0x0008 | 0x0004;

extern "C" {
    #[link_name = "PyObject_GetBuffer"]
    fn get_buffer(obj: *mut ffi::PyObject, view: *mut PyBufferView, flags: c_int) -> c_int;
    #[link_name = "PyBuffer_Release"]
    fn release_buffer(view: *mut PyBufferView);
    #[link_name = "PyBuffer_IsContiguous"]
    fn buffer_is_contiguous(view: *const PyBufferView, order: c_char) -> c_int;
}

/// `Ok(Err(why))` when the object has no buffer interface.
fn from_buffer(obj: &Bound<'_, PyAny>) -> PyResult<Result<Exported, String>> {
    let py = obj.py();
    // A memoryview holds a buffer export of the object for as long as it
    // lives: the pointer read below stays valid, and a bytearray cannot be
    // resized meanwhile.
    let view = match py.import("builtins")?.getattr("memoryview")?.call1((obj,)) {
        Ok(v) => v,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
            return Ok(Err("no buffer protocol".into()));
        }
        Err(e) if e.is_instance_of::<PyBufferError>(py) => {
            return Err(raise(py, "UnsupportedObjectError", format!("the buffer cannot be exported: {e}")));
        }
        Err(e) => return Err(e),
    };
    // SAFETY: an all-zero Py_buffer is a valid "empty" value to fill.
    let mut b: PyBufferView = unsafe { std::mem::zeroed() };
    // SAFETY: `view` is a live object and `b` a Py_buffer to fill.
    if unsafe { get_buffer(view.as_ptr(), &mut b, PYBUF_FULL_RO) } != 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `b` was filled by a successful PyObject_GetBuffer.
    let contiguous = unsafe { buffer_is_contiguous(&b, b'C' as c_char) } != 0;
    let (ptr, len, writable) = (b.buf as usize, b.len as u64, b.readonly == 0);
    // SAFETY: released once, after its last use; `view` keeps its own export.
    unsafe { release_buffer(&mut b) };
    if !contiguous {
        return Err(raise(
            py,
            "UnsupportedObjectError",
            "the buffer is not C-contiguous: register a contiguous copy".to_string(),
        ));
    }
    Ok(Ok(Exported { ptr, len, writable, keepalive: view.unbind(), via: "buffer", gpu: None }))
}

/// PyTorch tensors whose `__dlpack__` failed (for example `requires_grad`),
/// and look-alikes: `data_ptr()`, `nbytes`, `is_contiguous()`, `device`.
fn from_data_ptr(obj: &Bound<'_, PyAny>) -> PyResult<Exported> {
    let py = obj.py();
    if obj.hasattr("is_contiguous")? && !obj.call_method0("is_contiguous")?.is_truthy()? {
        return Err(raise(py, "UnsupportedObjectError", "the tensor is not contiguous: register .contiguous()"));
    }
    let mut gpu = None;
    if obj.hasattr("device")? {
        let device = obj.getattr("device")?;
        let kind: String = device.getattr("type").and_then(|t| t.extract()).unwrap_or_else(|_| "cpu".into());
        match kind.as_str() {
            "cpu" => {}
            "cuda" => {
                let index: Option<u32> = device.getattr("index").and_then(|i| i.extract()).unwrap_or(None);
                gpu = Some(index.unwrap_or(0));
            }
            _ => {
                return Err(raise(
                    py,
                    "RegisterMemoryError",
                    format!(
                        "{} memory cannot be registered: strait registers host memory and CUDA device memory",
                        device.str()?
                    ),
                ));
            }
        }
    }
    let ptr: usize = obj.call_method0("data_ptr")?.extract()?;
    let len: u64 = obj.getattr("nbytes")?.extract()?;
    Ok(Exported { ptr, len, writable: true, keepalive: obj.clone().unbind(), via: "data_ptr", gpu })
}

/// A sequence of offsets or lengths as `u64`s (see [`ints`]).
pub fn u64s(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    ints(obj, what)
}

/// Block ids and other small integers as `u32`s (see [`ints`]); values
/// above `u32::MAX` are refused.
pub fn u32s(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    let values = ints(obj, what)?;
    if values.iter().any(|&v| v > u64::from(u32::MAX)) {
        return Err(raise(obj.py(), "InvalidRequestError", format!("{what}: values above 2^32 - 1")));
    }
    Ok(values.into_iter().map(|v| v as u32).collect())
}

/// A one-dimensional sequence of non-negative integers: a contiguous
/// buffer of integers of any width and signedness (numpy arrays,
/// `array.array`), a CPU tensor through `__dlpack__` (PyTorch), each read
/// in one pass with no Python object per element; else any sequence of
/// Python ints. Negative values are refused.
pub fn ints(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    let py = obj.py();
    // Lists and tuples go the sequence way.
    if !obj.is_instance_of::<pyo3::types::PyList>() && !obj.is_instance_of::<pyo3::types::PyTuple>() {
        if let Some(values) = ints_from_buffer(obj, what)? {
            return Ok(values);
        }
        if let Some(values) = ints_from_dlpack(obj, what)? {
            return Ok(values);
        }
    }
    obj.extract::<Vec<u64>>().map_err(|e| {
        raise(py, "InvalidRequestError", format!("{what}: expected an array of integers or a sequence of ints ({e})"))
    })
}

/// Reads `n` integers of `width` bytes at `ptr`, widening to `u64`;
/// negative values of a signed type are an error.
///
/// # Safety
/// `ptr` must point to `n * width` readable bytes.
unsafe fn widen(ptr: *const u8, n: usize, width: usize, signed: bool) -> Result<Vec<u64>, &'static str> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut raw = [0u8; 8];
        // SAFETY: the caller's bytes hold item i; unaligned reads are fine.
        unsafe { std::ptr::copy_nonoverlapping(ptr.add(i * width), raw.as_mut_ptr(), width) };
        // strait runs on little-endian hosts (x86-64, aarch64): the item's
        // bytes are the low bytes of the u64, its last one holds the sign.
        let v = u64::from_le_bytes(raw);
        if signed && raw[width - 1] & 0x80 != 0 {
            return Err("negative values");
        }
        out.push(v);
    }
    Ok(out)
}

/// Width and signedness of a struct-module integer format code.
fn int_format(format: &str) -> Option<bool> {
    match format.trim_start_matches(['@', '=', '<']) {
        "b" | "h" | "i" | "l" | "q" | "n" => Some(true),
        "B" | "H" | "I" | "L" | "Q" | "N" => Some(false),
        _ => None,
    }
}

fn ints_from_buffer(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Option<Vec<u64>>> {
    let py = obj.py();
    // SAFETY: an all-zero Py_buffer is a valid "empty" value to fill.
    let mut b: PyBufferView = unsafe { std::mem::zeroed() };
    // SAFETY: `obj` is a live object and `b` a Py_buffer to fill.
    if unsafe { get_buffer(obj.as_ptr(), &mut b, PYBUF_FULL_RO) } != 0 {
        // Not a buffer exporter: clear the error and try the other ways.
        let _ = PyErr::take(py);
        return Ok(None);
    }
    let format = if b.format.is_null() {
        "B".to_string()
    } else {
        // SAFETY: `b` was filled by a successful PyObject_GetBuffer with
        // PyBUF_FORMAT: a non-null format is a NUL-terminated string that
        // lives until the buffer is released, below.
        unsafe { std::ffi::CStr::from_ptr(b.format) }.to_string_lossy().into_owned()
    };
    // SAFETY: as above.
    let contiguous = unsafe { buffer_is_contiguous(&b, b'C' as c_char) } != 0;
    let width = b.itemsize as usize;
    let result = match int_format(&format) {
        Some(signed) if contiguous && b.ndim <= 1 && matches!(width, 1 | 2 | 4 | 8) => {
            // SAFETY: the buffer holds `len` contiguous bytes at `buf`.
            unsafe { widen(b.buf.cast::<u8>(), b.len as usize / width, width, signed) }
                .map(Some)
                .map_err(|why| raise(py, "InvalidRequestError", format!("{what}: {why}")))
        }
        _ => Err(raise(
            py,
            "InvalidRequestError",
            format!(
                "{what}: expected a contiguous 1-d array of integers (got format {format:?}, {} bytes per item)",
                b.itemsize
            ),
        )),
    };
    // SAFETY: released once, after its last use.
    unsafe { release_buffer(&mut b) };
    result
}

fn ints_from_dlpack(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Option<Vec<u64>>> {
    let py = obj.py();
    if !obj.hasattr("__dlpack__")? {
        return Ok(None);
    }
    let bad = |why: String| raise(py, "InvalidRequestError", format!("{what}: {why}"));
    let capsule = obj.call_method0("__dlpack__")?;
    let capsule = capsule.cast_into::<PyCapsule>().map_err(|_| bad("__dlpack__() did not give a capsule".into()))?;
    let name = c"dltensor";
    // SAFETY: a live capsule; IsValid only reads its name and pointer.
    if unsafe { ffi::PyCapsule_IsValid(capsule.as_ptr(), name.as_ptr()) } == 0 {
        return Err(bad("__dlpack__() gave a capsule that is not a \"dltensor\"".into()));
    }
    // SAFETY: valid with this name (above): the producer's DLManagedTensor,
    // alive while we hold the unconsumed capsule.
    let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), name.as_ptr()) } as *const DlManagedTensor;
    if managed.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: non-null pointer to the DLManagedTensor (see above).
    let t = unsafe { &(*managed).dl_tensor };
    if !matches!(t.device.device_type, DL_CPU | DL_CUDA_HOST | DL_ROCM_HOST) {
        return Err(bad(format!("a {} tensor: pass a CPU tensor (.cpu())", device_name(t.device.device_type))));
    }
    let signed = match t.dtype.code {
        0 => true,
        1 => false,
        code => return Err(bad(format!("a tensor of dtype code {code}: expected integers"))),
    };
    let width = usize::from(t.dtype.bits) / 8;
    if !matches!(width, 1 | 2 | 4 | 8) || t.dtype.lanes != 1 || t.ndim > 1 {
        return Err(bad(format!("expected a 1-d tensor of integers ({} dims, {} bits)", t.ndim, t.dtype.bits)));
    }
    let n = if t.ndim == 0 {
        1
    } else {
        // SAFETY: DLPack: shape points to ndim dimensions.
        usize::try_from(unsafe { *t.shape }).unwrap_or(0)
    };
    // SAFETY: DLPack: non-null strides point to ndim strides (elements).
    let stride = if t.strides.is_null() || t.ndim == 0 { 1 } else { unsafe { *t.strides } };
    if n > 1 && stride != 1 {
        return Err(bad("the tensor is not contiguous: pass .contiguous()".into()));
    }
    let ptr = (t.data as *const u8).wrapping_add(t.byte_offset as usize);
    // SAFETY: a contiguous CPU tensor of n items of `width` bytes at ptr,
    // kept alive by the capsule we hold.
    unsafe { widen(ptr, n, width, signed) }.map(Some).map_err(|why| bad(why.into()))
}

/// The bytes of any C-contiguous buffer (numpy arrays, `bytes`,
/// `bytearray`, `memoryview`), copied in one go.
pub fn buffer_bytes(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let py = obj.py();
    // SAFETY: an all-zero Py_buffer is a valid "empty" value to fill.
    let mut b: PyBufferView = unsafe { std::mem::zeroed() };
    // SAFETY: `obj` is a live object and `b` a Py_buffer to fill.
    if unsafe { get_buffer(obj.as_ptr(), &mut b, PYBUF_FULL_RO) } != 0 {
        let _ = PyErr::take(py);
        let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(raise(
            py,
            "UnsupportedObjectError",
            format!("{what}: a {type_name} has no buffer (pass a numpy array)"),
        ));
    }
    // SAFETY: `b` was filled by a successful PyObject_GetBuffer.
    let contiguous = unsafe { buffer_is_contiguous(&b, b'C' as c_char) } != 0;
    let result = if contiguous {
        let mut out = vec![0u8; b.len as usize];
        // SAFETY: the buffer holds `len` contiguous bytes at `buf`.
        unsafe { std::ptr::copy_nonoverlapping(b.buf.cast::<u8>(), out.as_mut_ptr(), out.len()) };
        Ok(out)
    } else {
        Err(raise(py, "UnsupportedObjectError", format!("{what}: not C-contiguous (pass a contiguous copy)")))
    };
    // SAFETY: released once, after its last use.
    unsafe { release_buffer(&mut b) };
    result
}
