//! The native module of the `strait` Python package (`strait._strait`).
//!
//! Thin bindings over the Rust engine: every blocking call releases the GIL,
//! callbacks from the engine's thread take it, and errors map to
//! `strait.errors` in one place (`errors.rs`). The Python side of the
//! package (`strait/`) adds `await`, the exceptions and the
//! `torch.distributed` helpers.

// The classes are Python objects with `__repr__`; a Rust `Debug` would never
// be used.
#![allow(missing_debug_implementations)]

use pyo3::prelude::*;

mod engine;
mod errors;
mod export;
mod handles;
mod kv;
mod moe;
mod stats;
mod weights;

/// The providers strait can open here, and why the others cannot be: a list
/// of `(name, available, detail)`.
#[pyfunction]
fn probe(py: Python<'_>) -> Vec<(String, bool, String)> {
    let reports = py.detach(strait::probe::probe);
    reports
        .into_iter()
        .map(|r| match r.domains {
            Ok(domains) => {
                let names: Vec<String> = domains.into_iter().map(|(p, d)| format!("{p}/{d}")).collect();
                (r.kind.to_string(), true, names.join(", "))
            }
            Err(why) => (r.kind.to_string(), false, why),
        })
        .collect()
}

/// Which RDMA NICs serve which GPU here (PCIe topology from sysfs): a
/// dict `{gpu: [nic, ...]}`, empty without GPUs or RDMA NICs. Raises
/// `InvalidRequestError` when sysfs cannot be read.
#[pyfunction]
fn gpu_nic_map(py: Python<'_>) -> PyResult<std::collections::BTreeMap<usize, Vec<String>>> {
    let topology = py.detach(strait::topology::Topology::discover);
    match topology {
        Ok(t) => Ok(t.gpu_nic_map().into_iter().map(|(g, (nics, _))| (g, nics)).collect()),
        Err(e) => Err(crate::errors::raise(py, "InvalidRequestError", e.to_string())),
    }
}

/// CUDA on this machine: `{"available": True, "driver": "13.0", "gpus":
/// [{"ordinal", "name", "memory", "pci"}, ...]}`, or `{"available": False,
/// "reason": "..."}` (no driver: a normal condition, host memory only).
#[pyfunction]
fn cuda_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    match py.detach(strait::cuda::probe) {
        Ok(info) => {
            d.set_item("available", true)?;
            d.set_item("driver", info.driver_version_string())?;
            let gpus = pyo3::types::PyList::empty(py);
            for g in &info.gpus {
                let gd = pyo3::types::PyDict::new(py);
                gd.set_item("ordinal", g.ordinal)?;
                gd.set_item("name", &g.name)?;
                gd.set_item("memory", g.memory)?;
                gd.set_item("pci", &g.pci)?;
                gpus.append(gd)?;
            }
            d.set_item("gpus", gpus)?;
        }
        Err(e) => {
            d.set_item("available", false)?;
            d.set_item("reason", e.to_string())?;
        }
    }
    Ok(d)
}

#[pymodule]
fn _strait(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::TransferEngine>()?;
    m.add_class::<engine::Region>()?;
    m.add_class::<engine::Descriptor>()?;
    m.add_class::<engine::ScatterTarget>()?;
    m.add_class::<handles::Transfer>()?;
    m.add_class::<handles::ImmCounter>()?;
    m.add_class::<kv::KvLayout>()?;
    m.add_class::<kv::KvCacheDesc>()?;
    m.add_class::<kv::KvCache>()?;
    m.add_class::<kv::KvRecv>()?;
    m.add_class::<kv::KvSend>()?;
    m.add_class::<moe::MoeRank>()?;
    m.add_class::<moe::MoeGroup>()?;
    m.add_class::<moe::MoeHandle>()?;
    m.add_class::<weights::WeightsRank>()?;
    m.add_class::<weights::WeightsGroup>()?;
    m.add_function(wrap_pyfunction!(probe, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_nic_map, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_class::<handles::StreamTrigger>()?;
    m.add_function(wrap_pyfunction!(engine::_shutdown_all, m)?)?;
    m.add("PAGE_SIZE", strait::PAGE_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
