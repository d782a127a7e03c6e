//! `strait.weights`' native classes: `WeightsRank`, `WeightsGroup`, thin
//! over `strait::weights`. The tensors are registered by
//! `strait/weights.py` (each its own `Region`); this side takes the
//! regions and the tensors' specs.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::{Region, TransferEngine};
use crate::errors::{raise, IntoPy};
use crate::handles::parse_timeout;

/// One tensor as the Python side passes it: name, element size, full
/// shape, share (`dim` -1: replicated), region index, offset.
type TensorArg = (String, u32, Vec<u64>, i64, u64, u64, u32, u64);

fn role(py: Python<'_>, name: &str) -> PyResult<strait::weights::Role> {
    match name {
        "source" => Ok(strait::weights::Role::Source),
        "destination" => Ok(strait::weights::Role::Destination),
        other => {
            Err(raise(py, "InvalidRequestError", format!("role must be \"source\" or \"destination\", not {other:?}")))
        }
    }
}

/// One rank of a weights group before it is connected.
#[pyclass(module = "strait._strait", frozen)]
pub struct WeightsRank {
    inner: Mutex<Option<strait::weights::WeightsRank>>,
    descriptor: Py<PyBytes>,
    /// The tensors' regions, kept open while the rank lives.
    regions: Vec<Py<Region>>,
}

#[pymethods]
impl WeightsRank {
    #[new]
    #[pyo3(signature = (engine, role, rank, regions, tensors, *, mode="direct", chunk=4 << 20, timeout=30.0, watermark=256 << 20))]
    #[allow(clippy::too_many_arguments)] // keyword arguments on the Python side
    fn new(
        py: Python<'_>,
        engine: &TransferEngine,
        role: &str,
        rank: u32,
        regions: Vec<Py<Region>>,
        tensors: Vec<TensorArg>,
        mode: &str,
        chunk: u64,
        timeout: f64,
        watermark: u64,
    ) -> PyResult<Self> {
        use strait::weights::{Mode, PlanConfig, Share, TensorPlace, TensorSpec, WeightsConfig};
        let role = self::role(py, role)?;
        let mode = match mode {
            "direct" => Mode::Direct,
            "broadcast" => Mode::Broadcast,
            other => {
                return Err(raise(
                    py,
                    "InvalidRequestError",
                    format!("mode must be \"direct\" or \"broadcast\", not {other:?}"),
                ))
            }
        };
        let timeout = parse_timeout(py, Some(timeout))?.unwrap_or(Duration::from_secs(30));
        let config = WeightsConfig { plan: PlanConfig { chunk }, mode, timeout, watermark };
        let places = tensors
            .into_iter()
            .map(|(name, elem_bytes, shape, dim, start, end, region, offset)| {
                let share = if dim < 0 {
                    Share::Replicated
                } else {
                    let dim = u8::try_from(dim)
                        .map_err(|_| raise(py, "InvalidRequestError", format!("{name}: split dimension {dim}")))?;
                    Share::Split { dim, start, end }
                };
                Ok(TensorPlace { spec: TensorSpec { name, elem_bytes, shape, share }, region, offset })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let mrs = regions.iter().map(|r| r.get().region(py)).collect::<PyResult<Vec<_>>>()?;
        let e = engine.engine(py)?;
        let inner = py.detach(|| strait::weights::WeightsRank::new(&e, config, role, rank, mrs, places)).py(py)?;
        let descriptor = PyBytes::new(py, &inner.descriptor().to_bytes()).unbind();
        Ok(WeightsRank { inner: Mutex::new(Some(inner)), descriptor, regions })
    }

    /// The bytes every other rank needs (exchange them through the job's
    /// process group: `strait.distributed.all_gather_bytes`).
    #[getter]
    fn descriptor(&self, py: Python<'_>) -> Py<PyBytes> {
        self.descriptor.clone_ref(py)
    }

    /// Joins the group: `descriptors` holds every rank's (sources and
    /// destinations, this one's included), in any order. Plans; the rank
    /// can be connected once.
    fn connect(&self, py: Python<'_>, descriptors: Vec<Vec<u8>>) -> PyResult<WeightsGroup> {
        let descs = descriptors
            .iter()
            .map(|b| strait::weights::WeightsRankDesc::from_bytes(b))
            .collect::<strait::Result<Vec<_>>>()
            .py(py)?;
        let rank = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| raise(py, "InvalidRequestError", "this rank is connected already"))?;
        let group = py.detach(|| rank.connect(&descs)).py(py)?;
        let regions = self.regions.iter().map(|r| r.clone_ref(py)).collect();
        Ok(WeightsGroup { inner: Mutex::new(group), _regions: regions })
    }
}

/// A connected weights group, seen from one rank (see
/// `strait.weights.Group`).
#[pyclass(module = "strait._strait", frozen)]
pub struct WeightsGroup {
    inner: Mutex<strait::weights::WeightsGroup>,
    _regions: Vec<Py<Region>>,
}

#[pymethods]
impl WeightsGroup {
    /// `"source"` or `"destination"`.
    #[getter]
    fn role(&self) -> &'static str {
        match self.inner.lock().unwrap_or_else(|e| e.into_inner()).role() {
            strait::weights::Role::Source => "source",
            strait::weights::Role::Destination => "destination",
        }
    }

    /// This rank among its side's.
    #[getter]
    fn rank(&self) -> u32 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).rank()
    }

    /// Bytes this rank writes per step.
    #[getter]
    fn bytes_per_step(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes_per_step()
    }

    /// Pushes step `step` (a source). `prepare(name)`, when given, is
    /// called for each of this source's tensors just before its writes
    /// are posted (with the GIL; see `strait.weights.Group.push`).
    #[pyo3(signature = (step, prepare=None))]
    fn push(&self, py: Python<'_>, step: u64, prepare: Option<Py<PyAny>>) -> PyResult<()> {
        py.detach(|| {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match &prepare {
                None => g.push(step),
                Some(f) => g.push_with(step, |slot| {
                    let name = slot.spec.name.as_str();
                    Python::attach(|py| f.call1(py, (name,)).map(|_| ())).map_err(|e| {
                        strait::Error::InvalidRequest(format!("the prepare hook failed on tensor {name:?}: {e}"))
                    })
                }),
            }
        })
        .py(py)
    }

    /// Waits until step `step` is complete here (a destination).
    fn wait(&self, py: Python<'_>, step: u64) -> PyResult<()> {
        py.detach(|| self.inner.lock().unwrap_or_else(|e| e.into_inner()).wait(step)).py(py)
    }
}
