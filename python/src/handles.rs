//! `Transfer` and `ImmCounter`: waiting (with the GIL released), polling,
//! callbacks from the engine's thread, and `await`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::{raise, to_py};

/// How long a blocking wait sleeps between checks for signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// A timeout argument in seconds: `None` waits forever.
pub fn parse_timeout(py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(raise(py, "InvalidRequestError", format!("timeout must be a non-negative number, got {s}"))),
    }
}

/// Runs `wait_for(slice)` with the GIL released, in slices so that Ctrl-C
/// interrupts the wait, until it gives something other than a timeout or
/// `timeout` has passed.
pub fn blocking<T>(
    py: Python<'_>,
    timeout: Option<f64>,
    wait_for: impl Fn(Duration) -> strait::Result<T> + Send + Sync,
) -> PyResult<T>
where
    T: Send,
{
    blocking_until(py, timeout, wait_for, || false)
}

/// [`blocking`] for a handle whose own outcome may be a timeout (a
/// request's deadline): a [`strait::Error::Timeout`] from `wait_for` is the
/// slice running out only while `finished()` is false.
pub fn blocking_until<T>(
    py: Python<'_>,
    timeout: Option<f64>,
    wait_for: impl Fn(Duration) -> strait::Result<T> + Send + Sync,
    finished: impl Fn() -> bool + Send + Sync,
) -> PyResult<T>
where
    T: Send,
{
    let limit = parse_timeout(py, timeout)?;
    let deadline = limit.map(|t| Instant::now() + t);
    loop {
        let slice = match deadline {
            None => SIGNAL_CHECK,
            Some(at) => at.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK),
        };
        match py.detach(|| wait_for(slice)) {
            Err(strait::Error::Timeout(_)) if !finished() => {
                if let (Some(at), Some(limit)) = (deadline, limit) {
                    if Instant::now() >= at {
                        return Err(to_py(py, strait::Error::Timeout(limit)));
                    }
                }
                py.check_signals()?;
            }
            other => return other.map_err(|e| to_py(py, e)),
        }
    }
}

/// Calls `callback(*args)` with the GIL; an exception it raises is reported
/// through `sys.unraisablehook` (it has no caller to go to).
fn call_reporting<'py>(py: Python<'py>, callback: &Py<PyAny>, args: impl pyo3::call::PyCallArgs<'py>) {
    if let Err(e) = callback.call1(py, args) {
        e.write_unraisable(py, Some(callback.bind(py)));
    }
}

/// Python callbacks of one handle, registered with the engine lazily: a
/// request nobody attached a callback to never takes the GIL on the
/// engine's thread.
#[derive(Default)]
struct Callbacks {
    hooked: bool,
    pending: Vec<Py<PyAny>>,
}

/// A submitted request. Every request ends in exactly one outcome: success,
/// or one of the exceptions of `strait.errors`.
///
/// `wait(timeout=None)` blocks (with the GIL released; Ctrl-C interrupts it),
/// `done()` polls, `add_done_callback(fn)` calls `fn(transfer)` once it has
/// ended, and `await transfer` works in asyncio. Dropping the handle does not
/// cancel the request, and the memory it uses stays registered until it
/// ends.
#[pyclass(module = "strait._strait", frozen)]
pub struct Transfer {
    inner: strait::Transfer,
    callbacks: Arc<Mutex<Callbacks>>,
}

impl Transfer {
    pub fn new(inner: strait::Transfer) -> Self {
        Transfer { inner, callbacks: Arc::default() }
    }
}

#[pymethods]
impl Transfer {
    /// Blocks until the request ends; raises its error if it failed, or
    /// `strait.TimeoutError` once `timeout` seconds have passed (the request
    /// carries on).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let inner = self.inner.clone();
        // The request's own outcome may be a timeout (the engine's request
        // timeout): that is its result, not the wait running out.
        blocking_until(py, timeout, |slice| inner.wait_timeout(slice), || inner.is_done())
    }

    /// True once the request has ended (successfully or not).
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// The error the request ended with, `None` if it succeeded. Raises
    /// `strait.InvalidRequestError` while it is in flight.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<PyErr>> {
        match self.inner.result() {
            None => Err(raise(py, "InvalidRequestError", "the request is still in flight")),
            Some(Ok(())) => Ok(None),
            Some(Err(e)) => Ok(Some(to_py(py, e))),
        }
    }

    /// Calls `fn(transfer)` once the request has ended: on the engine's
    /// thread (with the GIL), or right away if it already has. Keep it short;
    /// an exception it raises goes to `sys.unraisablehook`.
    fn add_done_callback(slf: &Bound<'_, Self>, callback: Py<PyAny>) {
        let py = slf.py();
        let this = slf.get();
        let mut cb = this.callbacks.lock().unwrap_or_else(|e| e.into_inner());
        if this.inner.is_done() {
            drop(cb);
            call_reporting(py, &callback, (slf.clone(),));
            return;
        }
        cb.pending.push(callback);
        if cb.hooked {
            return;
        }
        cb.hooked = true;
        drop(cb);
        let callbacks = this.callbacks.clone();
        let handle = slf.clone().unbind();
        // The hook holds the handle (and so its callbacks) until the request
        // ends; it runs on the worker, or here if the request has already
        // ended, in which case the GIL is already held.
        let run = move |_: &strait::Result<()>| {
            Python::attach(|py| {
                let pending = std::mem::take(&mut callbacks.lock().unwrap_or_else(|e| e.into_inner()).pending);
                for callback in &pending {
                    call_reporting(py, callback, (handle.clone_ref(py),));
                }
            })
        };
        py.detach(|| this.inner.on_complete(run));
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let coroutine = py.import("strait._aio")?.getattr("wait_transfer")?.call1((slf,))?;
        Ok(coroutine.call_method0("__await__")?.unbind())
    }

    fn __repr__(&self) -> String {
        match self.inner.result() {
            None => "<strait.Transfer in flight>".into(),
            Some(Ok(())) => "<strait.Transfer done>".into(),
            Some(Err(e)) => format!("<strait.Transfer failed: {e}>"),
        }
    }
}

/// Counts immediates of one value at the target (from
/// `TransferEngine.expect_imm`).
///
/// `wait(timeout=None)` blocks until the count has arrived (GIL released),
/// `reached`/`seen` poll, `on_reached(fn)` calls `fn(value)` each time the
/// count is reached, `cancel()` stops it (waiters get
/// `strait.CancelledError`), `rearm(count)` starts the next round, and
/// `await counter` works in asyncio. Dropping it cancels it.
#[pyclass(module = "strait._strait", frozen)]
pub struct ImmCounter {
    inner: strait::ImmCounter,
    count: Mutex<u64>,
    state: Arc<Mutex<CounterHooks>>,
}

#[derive(Default)]
struct CounterHooks {
    hooked: bool,
    user: Vec<Py<PyAny>>,
    /// One-shot wakers of `await`: run when the count is reached or the
    /// counter is cancelled.
    wakers: Vec<Py<PyAny>>,
}

impl ImmCounter {
    pub fn new(inner: strait::ImmCounter, count: u64) -> Self {
        ImmCounter { inner, count: Mutex::new(count), state: Arc::default() }
    }

    fn hook(&self, py: Python<'_>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.hooked {
            return;
        }
        s.hooked = true;
        drop(s);
        let state = self.state.clone();
        let run = move |value: u32| {
            Python::attach(|py| {
                let (user, wakers) = {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    let user: Vec<_> = s.user.iter().map(|c| c.clone_ref(py)).collect();
                    (user, std::mem::take(&mut s.wakers))
                };
                for callback in user.iter() {
                    call_reporting(py, callback, (value,));
                }
                for waker in wakers.iter() {
                    call_reporting(py, waker, ());
                }
            })
        };
        py.detach(|| self.inner.on_reached(run));
    }

    fn wake_all(&self, py: Python<'_>) {
        let wakers = std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).wakers);
        for waker in wakers.iter() {
            call_reporting(py, waker, ());
        }
    }
}

#[pymethods]
impl ImmCounter {
    /// The immediate value counted.
    #[getter]
    fn value(&self) -> u32 {
        self.inner.value()
    }

    /// Immediates expected in this round.
    #[getter]
    fn count(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Immediates counted in this round so far.
    #[getter]
    fn seen(&self) -> u64 {
        self.inner.seen()
    }

    /// True once this round's count has arrived.
    #[getter]
    fn reached(&self) -> bool {
        self.inner.is_reached()
    }

    /// Blocks until the count has arrived; `strait.TimeoutError` after
    /// `timeout` seconds (the counter stays armed), `strait.CancelledError`
    /// if it is cancelled meanwhile.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        blocking(py, timeout, |slice| self.inner.wait_timeout(slice))
    }

    /// Calls `fn(value)` each time the count is reached: on the engine's
    /// thread (with the GIL), or right away if it already is.
    fn on_reached(&self, py: Python<'_>, callback: Py<PyAny>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.user.push(callback.clone_ref(py));
        let hooked = s.hooked;
        drop(s);
        if !hooked {
            // Registering the hook runs it at once if the count is reached.
            self.hook(py);
        } else if self.inner.is_reached() {
            call_reporting(py, &callback, (self.inner.value(),));
        }
    }

    /// Stops counting: waiters get `strait.CancelledError`; immediates of
    /// this value that arrive later are kept for a later counter.
    fn cancel(&self, py: Python<'_>) {
        py.detach(|| self.inner.cancel());
        self.wake_all(py);
    }

    /// Makes CUDA stream `stream` wait for this counter without the CPU:
    /// work queued on the stream afterwards runs once this round's count
    /// has arrived. `stream` is a `torch.cuda.Stream` (anything with
    /// `cuda_stream`), a CuPy stream (`ptr`) or a raw `CUstream` as an
    /// int. With `clear=True` the wait consumes the reach (one reach
    /// releases one wait), which is what a captured CUDA graph replayed
    /// round after round needs. Keep the counter alive until the stream
    /// has passed the wait. Raises `CudaError` without CUDA.
    #[pyo3(signature = (stream, clear=false))]
    fn wait_on_stream(&self, py: Python<'_>, stream: &Bound<'_, PyAny>, clear: bool) -> PyResult<()> {
        let stream = stream_handle(stream)?;
        let r = if clear { self.inner.wait_on_stream_and_clear(stream) } else { self.inner.wait_on_stream(stream) };
        r.map_err(|e| to_py(py, e))
    }

    /// Starts a new round expecting `count` more immediates.
    fn rearm(&self, py: Python<'_>, count: u64) -> PyResult<()> {
        py.detach(|| self.inner.rearm(count)).map_err(|e| to_py(py, e))?;
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) = count;
        Ok(())
    }

    /// Used by `await`: calls `fn()` once when the count is reached or the
    /// counter is cancelled (right away if either has happened).
    fn _add_waker(&self, py: Python<'_>, waker: Py<PyAny>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).wakers.push(waker);
        self.hook(py);
        // Reached or cancelled before the waker was queued: wake it here
        // (taking the wakers makes a second wake impossible).
        let cancelled = matches!(self.inner.wait_timeout(Duration::ZERO), Err(strait::Error::Cancelled));
        if self.inner.is_reached() || cancelled {
            self.wake_all(py);
        }
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let coroutine = py.import("strait._aio")?.getattr("wait_counter")?.call1((slf,))?;
        Ok(coroutine.call_method0("__await__")?.unbind())
    }

    fn __repr__(&self) -> String {
        format!("<strait.ImmCounter value={} seen={}/{}>", self.inner.value(), self.inner.seen(), self.count())
    }
}

/// A `CUstream` from a torch stream (`cuda_stream`), a CuPy stream (`ptr`)
/// or an int.
pub fn stream_handle(stream: &Bound<'_, PyAny>) -> PyResult<u64> {
    for attr in ["cuda_stream", "ptr"] {
        if stream.hasattr(attr)? {
            return stream.getattr(attr)?.extract();
        }
    }
    stream.extract()
}

/// A slot that CUDA streams store into, on which a watcher thread calls
/// `callback(value)` (with the GIL) for every value after the last one it
/// saw, in order: start the transfers of layer `value` from it.
/// `fire_on_stream(stream, value)` enqueues the store on a stream (after
/// the work queued before it; capturable in a CUDA graph), `fire(value)`
/// stores from the CPU, `address` is the slot's address for a kernel.
/// `StreamTrigger(callback, host=True)` needs no CUDA (fired from the CPU
/// only). `close()` (or dropping it) stops the watcher.
#[pyclass(module = "strait._strait", frozen)]
pub struct StreamTrigger {
    inner: Mutex<Option<strait::StreamTrigger>>,
}

#[pymethods]
impl StreamTrigger {
    #[new]
    #[pyo3(signature = (callback, host=false, spin=false))]
    fn new(py: Python<'_>, callback: Py<PyAny>, host: bool, spin: bool) -> PyResult<Self> {
        let poll = if spin { strait::TriggerPoll::Spin } else { strait::TriggerPoll::default() };
        let on_fire = move |value: u32| Python::attach(|py| call_reporting(py, &callback, (value,)));
        let trigger = if host {
            strait::StreamTrigger::on_host(poll, on_fire)
        } else {
            strait::StreamTrigger::new(poll, on_fire)
        };
        Ok(StreamTrigger { inner: Mutex::new(Some(trigger.map_err(|e| to_py(py, e))?)) })
    }

    fn fire_on_stream(&self, py: Python<'_>, stream: &Bound<'_, PyAny>, value: u32) -> PyResult<()> {
        let stream = stream_handle(stream)?;
        self.with(py, |t| t.fire_on_stream(stream, value))
    }

    fn fire(&self, py: Python<'_>, value: u32) -> PyResult<()> {
        self.with(py, |t| {
            t.fire(value);
            Ok(())
        })
    }

    #[getter]
    fn address(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |t| Ok(t.address()))
    }

    #[getter]
    fn value(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |t| Ok(t.value()))
    }

    fn close(&self, py: Python<'_>) {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The watcher may be waiting for the GIL to run a callback.
        py.detach(move || drop(t));
    }
}

impl StreamTrigger {
    fn with<T>(&self, py: Python<'_>, f: impl FnOnce(&strait::StreamTrigger) -> strait::Result<T>) -> PyResult<T> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t =
            guard.as_ref().ok_or_else(|| crate::errors::raise(py, "InvalidRequestError", "the trigger is closed"))?;
        f(t).map_err(|e| to_py(py, e))
    }
}

impl Drop for StreamTrigger {
    fn drop(&mut self) {
        // Dropped with the GIL held, while the watcher may be waiting for
        // it to run a callback: stop and join it on a thread of its own.
        if let Some(t) = self.inner.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            std::thread::spawn(move || drop(t));
        }
    }
}
