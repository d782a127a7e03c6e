//! `strait.moe`'s native classes: `MoeRank`, `MoeGroup`, `MoeHandle`,
//! thin over `strait::moe`. Arrays cross as bytes (read through the
//! buffer protocol); `strait/moe.py` gives them their numpy shapes.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};

use crate::engine::TransferEngine;
use crate::errors::{raise, IntoPy};
use crate::export::buffer_bytes;
use crate::handles::parse_timeout;

fn dtype(py: Python<'_>, name: &str) -> PyResult<strait::moe::MoeDtype> {
    match name {
        "bf16" | "bfloat16" => Ok(strait::moe::MoeDtype::Bf16),
        "f32" | "float32" => Ok(strait::moe::MoeDtype::F32),
        other => Err(raise(py, "InvalidRequestError", format!("dtype must be \"bf16\" or \"f32\", not {other:?}"))),
    }
}

/// One rank of a MoE group before it is connected: its registered regions
/// and its `descriptor` (bytes) for the other ranks.
#[pyclass(module = "strait._strait", frozen)]
pub struct MoeRank {
    inner: Mutex<Option<strait::moe::MoeRank>>,
    descriptor: Py<PyBytes>,
    config: strait::moe::MoeConfig,
}

#[pymethods]
impl MoeRank {
    #[new]
    #[pyo3(signature = (
        engine, *, rank, ranks, experts, top_k, max_tokens, hidden, dtype="bf16", token_bytes=None,
        capacity=None, timeout=10.0
    ))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn new(
        py: Python<'_>,
        engine: &TransferEngine,
        rank: u32,
        ranks: u32,
        experts: u32,
        top_k: u32,
        max_tokens: u32,
        hidden: u32,
        dtype: &str,
        token_bytes: Option<u32>,
        capacity: Option<u32>,
        timeout: f64,
    ) -> PyResult<Self> {
        let dt = self::dtype(py, dtype)?;
        let mut config = strait::moe::MoeConfig::new(ranks, experts, top_k, max_tokens, hidden, dt);
        if let Some(b) = token_bytes {
            config.token_bytes = b;
        }
        config.capacity = capacity;
        config.timeout = parse_timeout(py, Some(timeout))?.unwrap_or(Duration::from_secs(10));
        let e = engine.engine(py)?;
        let inner = py.detach(|| strait::moe::MoeRank::new(&e, config, rank)).py(py)?;
        let descriptor = PyBytes::new(py, &inner.descriptor().to_bytes()).unbind();
        Ok(MoeRank { inner: Mutex::new(Some(inner)), descriptor, config })
    }

    /// The bytes every other rank needs (exchange them through the job's
    /// process group: `strait.distributed.all_gather_bytes`).
    #[getter]
    fn descriptor(&self, py: Python<'_>) -> Py<PyBytes> {
        self.descriptor.clone_ref(py)
    }

    /// Bytes of this rank's regions: `counts`, `pool`, `combine` (what
    /// peers write into), `staging`, `receive`, `total`.
    #[getter]
    fn memory<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.config.memory();
        let d = PyDict::new(py);
        d.set_item("counts", m.counts)?;
        d.set_item("pool", m.pool)?;
        d.set_item("combine", m.combine)?;
        d.set_item("staging", m.staging)?;
        d.set_item("receive", m.receive())?;
        d.set_item("total", m.total())?;
        Ok(d)
    }

    /// Joins the group: `descriptors[r]` is rank `r`'s (this rank's own
    /// included). The rank can be connected once.
    fn connect(&self, py: Python<'_>, descriptors: Vec<Vec<u8>>) -> PyResult<MoeGroup> {
        let descs = descriptors
            .iter()
            .map(|b| strait::moe::MoeRankDesc::from_bytes(b))
            .collect::<strait::Result<Vec<_>>>()
            .py(py)?;
        let rank = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| raise(py, "InvalidRequestError", "this rank is connected already"))?;
        let group = py.detach(|| rank.connect(&descs)).py(py)?;
        Ok(MoeGroup { inner: Mutex::new(group), config: self.config })
    }
}

/// A connected group, seen from one rank (see `strait.moe.Group`).
#[pyclass(module = "strait._strait", frozen)]
pub struct MoeGroup {
    inner: Mutex<strait::moe::MoeGroup>,
    config: strait::moe::MoeConfig,
}

/// Where a dispatch's rows came from, for combine.
#[pyclass(module = "strait._strait", frozen)]
pub struct MoeHandle {
    inner: strait::moe::MoeHandle,
}

#[pymethods]
impl MoeHandle {
    /// `(rank, token, k)` of row `i` of local expert `e`, or `None`.
    fn source(&self, e: u32, i: u32) -> Option<(u32, u32, u32)> {
        self.inner.source(e, i)
    }

    /// Tokens this rank dispatched.
    #[getter]
    fn tokens(&self) -> u32 {
        self.inner.tokens()
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn i32s(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[pymethods]
impl MoeGroup {
    /// This rank.
    #[getter]
    fn rank(&self) -> u32 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).rank()
    }

    /// `(ranks, experts, top_k, max_tokens, hidden, token_bytes)`.
    #[getter]
    fn shape(&self) -> (u32, u32, u32, u32, u32, u32) {
        let c = &self.config;
        (c.ranks, c.experts, c.top_k, c.max_tokens, c.hidden, c.token_bytes)
    }

    /// Dispatch: `x` (`tokens * token_bytes` bytes), `topk_idx` (int32
    /// bytes, `[tokens, top_k]`, -1 for none), `topk_weights` (float32
    /// bytes). Returns `(expert_x bytearray, counts, capacity, handle)`. The GIL
    /// is released meanwhile.
    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        topk_idx: &Bound<'py, PyAny>,
        topk_weights: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyByteArray>, Vec<u32>, u32, MoeHandle)> {
        let (x, idx, w) =
            (buffer_bytes(x, "x")?, buffer_bytes(topk_idx, "topk_idx")?, buffer_bytes(topk_weights, "topk_weights")?);
        let (idx, w) = (i32s(&idx), f32s(&w));
        let d = py.detach(|| self.inner.lock().unwrap_or_else(|e| e.into_inner()).dispatch(&x, &idx, &w)).py(py)?;
        Ok((PyByteArray::new(py, &d.expert_x), d.counts, d.capacity, MoeHandle { inner: d.handle }))
    }

    /// Combine: `expert_y` laid out as the dispatch's `expert_x`, `hidden`
    /// elements of the group's dtype per row. Returns `y` (a bytearray), `[tokens,
    /// hidden]`, summed in float32 in k order.
    fn combine<'py>(
        &self,
        py: Python<'py>,
        expert_y: &Bound<'py, PyAny>,
        handle: &MoeHandle,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let y = buffer_bytes(expert_y, "expert_y")?;
        let out =
            py.detach(|| self.inner.lock().unwrap_or_else(|e| e.into_inner()).combine(&y, &handle.inner)).py(py)?;
        Ok(PyByteArray::new(py, &out))
    }
}
