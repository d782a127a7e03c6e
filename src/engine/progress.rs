//! Who runs the worker's loop: the worker thread, or a user thread that is
//! waiting for the engine.
//!
//! # Decision
//! On the latency path the hand-offs between threads cost more than the
//! transfer: a completion seen by the worker wakes the waiting thread (a
//! futex), whose reply goes back through the queue to the worker, and on a
//! small machine spinning workers take the cores that the woken threads
//! need. So a thread that blocks in [`Transfer::wait`](super::Transfer),
//! [`ImmCounter::wait`](super::ImmCounter) or `recv_timeout` first *drives*
//! the engine itself, as UCX's and NIXL's callers progress their workers:
//! it takes the worker (the one lock around it), runs its turns (take
//! commands, post, read completions, expire) and returns as soon as what it
//! waits for has happened; the worker thread stands aside meanwhile. In a
//! ping-pong the reply is submitted by the thread that then waits for the
//! next message, so it is posted by that thread's next turn: nothing crosses
//! threads.
//!
//! Exactly one thread runs the worker at a time, so the NICs keep a single
//! owner and every guarantee of the worker holds unchanged. A driver runs
//! the worker's own polling: in [`PollMode::Adaptive`] it spins for the
//! spin time after the last work and then sleeps on the completion queues'
//! wait descriptors (or naps) itself, holding the worker, so that the
//! completion it waits for wakes it directly (one wake-up, not two); a
//! request submitted by another thread meanwhile wakes it through the
//! eventfd. In [`PollMode::Busy`] a driver never sleeps: it polls until
//! its wait ends (the parked worker resumes polling after it). (Having
//! waiters spin on their outcome while the busy worker polls was tried:
//! on two cores, two busy workers and two spinning waiters made the
//! ping-pong 2 ms.) A driver lets go when its wait ends (the worker thread then
//! stays aside a little longer, since the same thread usually submits or
//! waits again at once: it checks after 100 µs, and half as often each
//! time it finds that a driver came back, down to every 1 ms), at its deadline,
//! or at shutdown (the worker resumes at once).
//!
//! Other waiting threads find the worker taken and wait on their condition
//! variables as before; the driver delivers their completions. The worker
//! thread checks for would-be drivers between turns, so a waiting thread
//! gets the worker within one turn.
//!
//! Measured with `strait-bench loopback --baseline raw --workloads
//! imm-lat,send-lat` (1 NIC, adaptive polling): the tcp ping-pong went
//! from 72 to 12-16 µs p50 (raw libfabric 10-13 µs in the same runs), shm
//! from 7.9 to 3-4 µs (raw 2 µs). See the README for the current figures.
//!
//! Consequences users see, written in the crate docs: callbacks run on the
//! thread that drives at that moment (the worker or a waiting thread), and
//! a waiting thread runs the engine's polling while it waits.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::link::{DrivingMark, Link, Progress};
use super::worker::{PollMode, Worker};
use crate::backend::Nic;

/// A worker stands aside while a user thread drives, and for this long
/// after one let go having got what it waited for (it is likely to submit
/// or wait again at once); it checks again at this interval. So the engine
/// goes at most this long without progress once its users stop waiting.
const ASIDE_FOR: Duration = Duration::from_micros(100);
/// While drivers keep coming, the standing-aside worker checks half as
/// often each time, down to every this long: each of its wake-ups takes a
/// core from a spinning driver on a small machine (with a fixed 200 µs the
/// tcp ping-pong's p90 was 60-95 µs, with 2 ms 19-20 µs, raw 14-19 µs).
/// It is also the longest the engine goes without progress once its users
/// stop waiting after a long run of waits.
const ASIDE_MAX: Duration = Duration::from_millis(1);

/// The worker, shared by its thread and the user threads that drive it.
pub(crate) struct Core<N: Nic> {
    worker: Mutex<Option<Worker<N>>>,
    /// How long a driver spins after the last work before it sleeps.
    spin: Duration,
    /// [`PollMode::Busy`]: a driver never sleeps either.
    busy: bool,
}

impl<N: Nic> Core<N> {
    pub(crate) fn new(worker: Worker<N>) -> Arc<Self> {
        let (spin, busy) = match worker.poll_mode() {
            PollMode::Busy => (Duration::ZERO, true),
            PollMode::Adaptive { spin } => (spin, false),
        };
        Arc::new(Core { worker: Mutex::new(Some(worker)), spin, busy })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Worker<N>>> {
        self.worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker, taken before `deadline` (or `None`: the deadline passed,
    /// or `done` became true meanwhile). Yields the CPU between tries for
    /// the first few, then sleeps 50 µs between them.
    fn lock_until(&self, deadline: Instant, done: &dyn Fn() -> bool) -> Option<MutexGuard<'_, Option<Worker<N>>>> {
        for tries in 0u32.. {
            if let Some(g) = self.try_lock() {
                return Some(g);
            }
            if done() || Instant::now() >= deadline {
                return None;
            }
            if tries < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        None
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, Option<Worker<N>>>> {
        match self.worker.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

impl<N: Nic + 'static> Progress for Core<N> {
    fn drive(&self, link: &Link, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool {
        link.want_drive(true);
        let guard = match self.try_lock() {
            Some(g) => Some(g),
            // Another waiting thread drives: it delivers what this one waits
            // for too; wait the usual way.
            None if link.driver_active() => None,
            // The worker thread lets go after its current turn (it checks
            // for would-be drivers between turns). Block rather than spin:
            // on a small machine the worker may need this very core to get
            // there. With a deadline, block in short sleeps instead, so that
            // a turn that never ends (a provider wedged inside a call: shm
            // spinning on the lock of a peer that died holding it) cannot
            // keep the caller past its deadline.
            None => match deadline {
                None => Some(self.lock()),
                Some(d) => self.lock_until(d, done),
            },
        };
        let Some(mut guard) = guard else {
            link.want_drive(false);
            return done();
        };
        let Some(worker) = guard.as_mut() else {
            link.want_drive(false);
            return done();
        };
        link.driver_took();
        let mark = DrivingMark::set(link);
        let mut last_work = Instant::now();
        let mut asleep = false;
        let reached = loop {
            if done() {
                break true;
            }
            if worker.stopping() {
                break false;
            }
            // One clock read per turn: the one the turn itself makes (the
            // clock showed as 15% of a driving thread reading it twice).
            let worked = worker.step();
            let now = worker.now();
            if deadline.is_some_and(|d| now >= d) {
                break done();
            }
            if worked {
                worker.worked();
                last_work = now;
                asleep = false;
                continue;
            }
            if self.busy || !(asleep || now.duration_since(last_work) >= self.spin) {
                continue;
            }
            // Idle for the spin: this thread sleeps on the descriptors
            // itself, as the worker would, and wakes straight into its turn.
            link.set_driver_sleeping(true);
            if let Some(mut timeout) = worker.prepare_sleep() {
                if let Some(d) = deadline {
                    timeout = timeout.min(d.saturating_duration_since(now));
                }
                sleep_on(worker.pollfds(), timeout);
                link.drain_wakeups();
                asleep = true;
            }
            link.set_driver_sleeping(false);
        };
        let stopping = worker.stopping();
        drop(mark);
        link.driver_left(reached && !stopping);
        drop(guard);
        link.want_drive(false);
        // Still waiting, or shutting down: the worker must poll again now.
        // Done: this thread will likely submit or wait again at once; the
        // standing-aside worker resumes on its own if it does not.
        if !reached || stopping {
            link.unpark_worker();
        }
        reached
    }
}

/// The worker thread: runs turns while nobody else does, stands aside while
/// a user thread drives, sleeps when idle in the adaptive mode. Ends with
/// the worker's teardown.
pub(crate) fn run<N: Nic + 'static>(core: Arc<Core<N>>, link: Arc<Link>, mut pollfds: Vec<libc::pollfd>) {
    let poll_mode = core.lock().as_ref().map_or(PollMode::Busy, |w| w.poll_mode());
    // Spin only after real work: once asleep, a turn that finds nothing
    // goes straight back to sleep, so an idle worker costs next to no CPU
    // even when it must nap instead of waiting on a descriptor.
    let mut idle_since: Option<Instant> = None;
    let mut asleep = false;
    let mut aside_for = ASIDE_FOR;
    loop {
        let aside = |window| link.drive_wanted() || (link.driven_within(window) && !link.has_commands());
        if aside(aside_for) {
            // Parks even in the busy mode: the driver polls meanwhile, and
            // a spinning worker would take the core it runs on.
            if aside(aside_for) {
                std::thread::park_timeout(aside_for);
                aside_for = (aside_for * 2).min(ASIDE_MAX);
            }
            // Back from standing aside: no spin before sleeping again (the
            // driver's thread is likely to come back; a submission or a
            // completion wakes the sleeping worker).
            asleep = true;
            continue;
        }
        aside_for = ASIDE_FOR;
        let mut guard = core.lock();
        let Some(worker) = guard.as_mut() else { return };
        if worker.stopping() {
            break;
        }
        // Turns back to back while they find work, unless a user thread
        // asks for the worker.
        let mut worked = false;
        while worker.step() {
            worked = true;
            if worker.stopping() || link.drive_wanted() {
                break;
            }
        }
        if worker.stopping() {
            break;
        }
        if worked {
            worker.worked();
            idle_since = None;
            asleep = false;
            continue;
        }
        let PollMode::Adaptive { spin } = poll_mode else { continue };
        // The turn's own clock reading: no second one per idle turn.
        let now = worker.now();
        let since = *idle_since.get_or_insert(now);
        if !(asleep || now.duration_since(since) >= spin) {
            continue;
        }
        link.set_sleeping(true);
        let Some(timeout) = worker.prepare_sleep() else {
            link.set_sleeping(false);
            continue;
        };
        drop(guard);
        sleep_on(&mut pollfds, timeout);
        link.set_sleeping(false);
        link.drain_wakeups();
        asleep = true;
    }
    let worker = core.lock().take();
    if let Some(worker) = worker {
        worker.teardown();
    }
}

/// Waits until one of `fds` is readable or `timeout` (under a second) passes.
fn sleep_on(fds: &mut [libc::pollfd], timeout: Duration) {
    let ts = libc::timespec { tv_sec: 0, tv_nsec: timeout.as_nanos().min(999_999_999) as libc::c_long };
    // SAFETY: fds is a live array of len pollfd structs; ts is a valid
    // timeout below one second; no signal mask is passed.
    unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
}
