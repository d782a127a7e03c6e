//! The one outcome of a KV request, as both sides' handles wait for it.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Set once; waited on by threads, futures and nothing else.
#[derive(Default)]
pub(crate) struct Outcome {
    state: Mutex<Slot>,
    cv: Condvar,
}

/// A callback run once with the outcome.
pub(crate) type OnDone = Box<dyn FnOnce(&Result<()>) + Send>;

#[derive(Default)]
struct Slot {
    result: Option<Result<()>>,
    wakers: Vec<Waker>,
    callbacks: Vec<OnDone>,
}

impl Outcome {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `result` unless an outcome was already published. Returns
    /// whether this call published it.
    pub(crate) fn set(&self, result: Result<()>) -> bool {
        let mut s = self.lock();
        if s.result.is_some() {
            return false;
        }
        s.result = Some(result.clone());
        let wakers = std::mem::take(&mut s.wakers);
        let callbacks = std::mem::take(&mut s.callbacks);
        drop(s);
        self.cv.notify_all();
        for w in wakers {
            w.wake();
        }
        for f in callbacks {
            f(&result);
        }
        true
    }

    /// Runs `f` with the outcome once it is set: on the thread that sets
    /// it, or here if it is set already. No lock is held while it runs.
    pub(crate) fn on_done(&self, f: OnDone) {
        let mut s = self.lock();
        match s.result.clone() {
            Some(r) => {
                drop(s);
                f(&r);
            }
            None => s.callbacks.push(f),
        }
    }

    pub(crate) fn get(&self) -> Option<Result<()>> {
        self.lock().result.clone()
    }

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| (Instant::now() + t, t));
        let mut s = self.lock();
        loop {
            if let Some(r) = &s.result {
                return r.clone();
            }
            s = match deadline {
                None => self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some((at, t)) => {
                    let now = Instant::now();
                    if now >= at {
                        return Err(Error::Timeout(t));
                    }
                    self.cv.wait_timeout(s, at - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    pub(crate) fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        let mut s = self.lock();
        match &s.result {
            Some(r) => std::task::Poll::Ready(r.clone()),
            None => {
                if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    s.wakers.push(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        }
    }
}
