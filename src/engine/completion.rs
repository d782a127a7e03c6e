//! Request outcomes: the shared completion and the user's `Transfer` handle.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::link::Link;
use crate::error::{Error, Result};

type Callback = Box<dyn FnOnce(&Result<()>) + Send>;

/// Outcome shared by a request's parts and its handle.
pub(crate) struct Completion {
    done: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    parts_left: u32,
    first_error: Option<Error>,
    outcome: Option<Result<()>>,
    waker: Option<Waker>,
    callback: Option<Callback>,
    /// Threads blocked in `wait`: the worker signals the condition variable
    /// only when there are some (a notify is a system call).
    waiters: u32,
}

impl Completion {
    /// A completion that ends when `parts` parts have ended (a scatter or
    /// barrier has one part per destination).
    pub(crate) fn new(parts: u32) -> Arc<Self> {
        Arc::new(Completion {
            done: AtomicBool::new(false),
            state: Mutex::new(State {
                parts_left: parts.max(1),
                first_error: None,
                outcome: None,
                waker: None,
                callback: None,
                waiters: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One part ended. The request's outcome is the first error of any part,
    /// else success, and is published when the last part ends.
    pub(crate) fn part_done(&self, result: Result<()>) {
        let mut s = self.lock();
        if s.outcome.is_some() {
            debug_assert!(false, "part reported after the request ended");
            return;
        }
        if let Err(e) = result {
            s.first_error.get_or_insert(e);
        }
        s.parts_left -= 1;
        if s.parts_left > 0 {
            return;
        }
        let outcome = match s.first_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        s.outcome = Some(outcome.clone());
        let waker = s.waker.take();
        let callback = s.callback.take();
        let waiters = s.waiters > 0;
        self.done.store(true, Ordering::Release);
        drop(s);
        if waiters {
            self.cv.notify_all();
        }
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(cb) = callback {
            cb(&outcome);
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Guarantees a part of a request an outcome: whoever holds it must call
/// [`finish`](Self::finish); if it is dropped instead (the engine shut down,
/// a queue was torn down), the part ends with [`Error::Shutdown`].
pub(crate) struct PartGuard(Option<Arc<Completion>>);

impl PartGuard {
    pub(crate) fn new(completion: Arc<Completion>) -> Self {
        PartGuard(Some(completion))
    }

    pub(crate) fn finish(mut self, result: Result<()>) {
        if let Some(c) = self.0.take() {
            c.part_done(result);
        }
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.part_done(Err(Error::Shutdown));
        }
    }
}

/// Handle to a submitted request. Every request ends in exactly one outcome,
/// `Ok(())` or a typed [`Error`], delivered to every way of observing it:
/// [`wait`](Self::wait), [`wait_timeout`](Self::wait_timeout), polling with
/// [`result`](Self::result), a callback, and `.await` (the handle is a
/// `Future` that works with any executor). Dropping the handle does not
/// cancel the request.
#[derive(Clone)]
pub struct Transfer {
    completion: Arc<Completion>,
    /// The engine, which a waiting thread drives (none in unit tests).
    link: Option<Arc<Link>>,
}

impl fmt::Debug for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfer").field("done", &self.is_done()).finish()
    }
}

impl Transfer {
    /// A handle whose waits only wait (the stager's requests: it moves
    /// them itself).
    pub(crate) fn new(completion: Arc<Completion>) -> Self {
        Transfer { completion, link: None }
    }

    /// A handle whose waits drive the engine behind `link`.
    pub(crate) fn driven(completion: Arc<Completion>, link: Arc<Link>) -> Self {
        Transfer { completion, link: Some(link) }
    }

    /// Drives the engine on this thread while the request is in flight,
    /// if nobody else does (see `engine::progress`).
    fn drive(&self, deadline: Option<Instant>) {
        if let Some(link) = &self.link {
            if !self.is_done() {
                link.drive(&|| self.completion.is_done(), deadline);
            }
        }
    }

    /// True once the request has ended.
    pub fn is_done(&self) -> bool {
        self.completion.is_done()
    }

    /// The outcome, or `None` while the request is in flight.
    pub fn result(&self) -> Option<Result<()>> {
        if !self.is_done() {
            return None;
        }
        self.completion.lock().outcome.clone()
    }

    /// Blocks until the request ends.
    pub fn wait(&self) -> Result<()> {
        self.drive(None);
        let mut s = self.completion.lock();
        while s.outcome.is_none() {
            s.waiters += 1;
            s = self.completion.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiters -= 1;
        }
        s.outcome.clone().expect("checked")
    }

    /// Blocks until the request ends or `timeout` passes; on timeout returns
    /// [`Error::Timeout`] and the request carries on (wait again, or drop the
    /// handle).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.drive(Some(deadline));
        let mut s = self.completion.lock();
        while s.outcome.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            s.waiters += 1;
            s = self.completion.cv.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            s.waiters -= 1;
        }
        s.outcome.clone().expect("checked")
    }

    /// Runs `callback` with the outcome when the request ends: on the
    /// thread that drives the engine then (its worker, or a thread waiting
    /// on it: see the crate docs), or right here if it already has. Keep it
    /// short and non-blocking; submitting new requests from it is fine,
    /// waiting on one is not. One callback per handle: a second replaces the
    /// first if the first has not run yet.
    pub fn on_complete(&self, callback: impl FnOnce(&Result<()>) + Send + 'static) {
        let mut s = self.completion.lock();
        match s.outcome.clone() {
            Some(outcome) => {
                drop(s);
                callback(&outcome);
            }
            None => s.callback = Some(Box::new(callback)),
        }
    }
}

impl Future for Transfer {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.completion.lock();
        match &s.outcome {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn parts_join_into_one_outcome_with_the_first_error() {
        let c = Completion::new(3);
        let t = Transfer::new(c.clone());
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        t.on_complete(move |r| {
            assert!(matches!(r, Err(Error::Cancelled)));
            seen.fetch_add(1, Ordering::SeqCst);
        });
        c.part_done(Ok(()));
        c.part_done(Err(Error::Cancelled));
        assert!(t.result().is_none());
        c.part_done(Err(Error::Shutdown));
        assert!(matches!(t.wait(), Err(Error::Cancelled)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropped_guard_reports_shutdown() {
        let c = Completion::new(1);
        drop(PartGuard::new(c.clone()));
        assert!(matches!(Transfer::new(c).wait_timeout(Duration::from_secs(1)), Err(Error::Shutdown)));
    }

    #[test]
    fn wait_timeout_expires_without_ending_the_request() {
        let c = Completion::new(1);
        let t = Transfer::new(c.clone());
        assert!(matches!(t.wait_timeout(Duration::from_millis(10)), Err(Error::Timeout(_))));
        PartGuard::new(c).finish(Ok(()));
        assert!(t.wait_timeout(Duration::from_millis(10)).is_ok());
    }
}
