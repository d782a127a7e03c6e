//! The one mapping from strait's `Error` to the Python exceptions of
//! `strait.errors`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The exception class `name` of `strait.errors`.
fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module = ERRORS.get_or_try_init(py, || py.import("strait.errors").map(Bound::unbind))?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

/// An exception of class `name` (of `strait.errors`) with `message`.
pub fn raise(py: Python<'_>, name: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    match class(py, name) {
        Ok(ty) => PyErr::from_type(ty, message),
        // Only when the package is broken (strait.errors missing).
        Err(e) => PyRuntimeError::new_err(format!("{message} (and strait.errors is unusable: {e})")),
    }
}

/// The Python exception for a strait error.
pub fn to_py(py: Python<'_>, error: strait::Error) -> PyErr {
    use strait::Error as E;
    let name = match &error {
        E::BackendUnavailable { .. } => "BackendUnavailableError",
        E::Fabric { .. } | E::Verbs { .. } | E::Transport { .. } => "TransportError",
        E::PeerUnreachable(_) => "PeerUnreachableError",
        E::RemoteAccess(_) => "RemoteAccessError",
        E::Timeout(_) => "TimeoutError",
        E::InvalidRequest(_) => "InvalidRequestError",
        E::OutOfBounds { .. } => "OutOfBoundsError",
        E::InvalidDescriptor { .. } => "InvalidDescriptorError",
        E::RegisterMemory { .. } => "RegisterMemoryError",
        E::Shutdown => "ShutdownError",
        E::Cancelled => "CancelledError",
        E::WouldDeadlock(_) => "WouldDeadlockError",
        E::LayoutMismatch { .. } => "LayoutMismatchError",
        E::Aborted { .. } => "AbortedError",
        E::WeightsPlan(_) => "WeightsPlanError",
        E::Cuda(_) => "CudaError",
        _ => "Error",
    };
    raise(py, name, error.to_string())
}

/// `strait::Result` into `PyResult`.
pub trait IntoPy<T> {
    /// Maps the error with [`to_py`].
    fn py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for strait::Result<T> {
    fn py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
