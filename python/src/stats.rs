//! `TransferEngine.stats()` as Python dicts.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use strait::stats::{EngineStats, ErrorCounts, Histogram, OpCounts, ERROR_KINDS};

fn ops<'py>(py: Python<'py>, o: &OpCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("writes", o.writes)?;
    d.set_item("reads", o.reads)?;
    d.set_item("sends", o.sends)?;
    Ok(d)
}

fn errors<'py>(py: Python<'py>, e: &ErrorCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (i, kind) in ERROR_KINDS.iter().enumerate() {
        d.set_item(*kind, e.0[i])?;
    }
    Ok(d)
}

fn histogram<'py>(py: Python<'py>, h: &Histogram) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let secs = |v: Option<std::time::Duration>| v.map(|d| d.as_secs_f64());
    d.set_item("count", h.count())?;
    d.set_item("mean", secs(h.mean()))?;
    d.set_item("p50", secs(h.percentile(0.5)))?;
    d.set_item("p90", secs(h.percentile(0.9)))?;
    d.set_item("p99", secs(h.percentile(0.99)))?;
    d.set_item("max", secs(h.max()))?;
    Ok(d)
}

/// The snapshot as nested dicts and lists.
pub fn to_dict<'py>(py: Python<'py>, s: &EngineStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let mut nics = Vec::new();
    for n in &s.nics {
        let x = PyDict::new(py);
        x.set_item("posted", ops(py, &n.posted)?)?;
        x.set_item("bytes_posted", n.bytes_posted)?;
        x.set_item("busy", n.busy)?;
        x.set_item("completed", n.completed)?;
        x.set_item("errors", errors(py, &n.errors)?)?;
        x.set_item("imms_out", n.imms_out)?;
        x.set_item("imms_in", n.imms_in)?;
        x.set_item("messages_in", n.messages_in)?;
        x.set_item("receives_posted", n.receives_posted)?;
        nics.push(x);
    }
    d.set_item("nics", nics)?;
    let mut peers = Vec::new();
    for p in &s.peers {
        let x = PyDict::new(py);
        x.set_item("address", p.address.to_string())?;
        x.set_item("label", p.label.clone())?;
        x.set_item("posted", ops(py, &p.posted)?)?;
        x.set_item("bytes_posted", p.bytes_posted)?;
        x.set_item("imms_out", p.imms_out)?;
        x.set_item("completed", p.completed)?;
        x.set_item("errors", errors(py, &p.errors)?)?;
        x.set_item("requests_ok", p.requests_ok)?;
        x.set_item("requests_failed", p.requests_failed)?;
        x.set_item("in_flight", p.in_flight)?;
        x.set_item("oldest_in_flight", p.oldest_in_flight.map(|d| d.as_secs_f64()))?;
        x.set_item("expired", p.expired)?;
        x.set_item("resets", p.resets)?;
        peers.push(x);
    }
    d.set_item("peers", peers)?;
    d.set_item("in_flight", s.in_flight)?;
    d.set_item("oldest_in_flight", s.oldest_in_flight.map(|d| d.as_secs_f64()))?;
    let lat = PyDict::new(py);
    for (kind, h) in s.latency.kinds() {
        lat.set_item(kind, histogram(py, h)?)?;
    }
    d.set_item("latency", lat)?;
    d.set_item("receive_buffers", s.receive_buffers)?;
    let packed = PyDict::new(py);
    packed.set_item("requests", s.packed.requests)?;
    packed.set_item("chunks", s.packed.chunks)?;
    packed.set_item("served", s.packed.served)?;
    d.set_item("packed", packed)?;
    Ok(d)
}
