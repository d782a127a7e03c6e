//! The path from user threads to the worker: a command queue, a wake-up
//! that costs a syscall only when the worker is actually asleep, and the
//! hook through which a waiting user thread drives the engine itself (see
//! [`super::progress`]).

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::worker::Command;
use crate::error::{Error, Result};

thread_local! {
    /// The link of the engine whose worker this thread runs right now (as
    /// an address; 0: none), set while a user thread drives it.
    static DRIVING: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as running `link`'s worker for as long as the value
/// lives (restoring the previous mark: a callback may drive another engine).
pub(crate) struct DrivingMark(usize);

impl DrivingMark {
    pub(crate) fn set(link: &Link) -> Self {
        DrivingMark(DRIVING.with(|d| d.replace(std::ptr::from_ref(link) as usize)))
    }
}

impl Drop for DrivingMark {
    fn drop(&mut self) {
        DRIVING.with(|d| d.set(self.0));
    }
}

/// What a user thread can ask of the engine's progress: implemented by the
/// worker's shared core.
pub(crate) trait Progress: Send + Sync {
    /// Runs turns of the worker's loop on this thread, while no other thread
    /// does, until `done()` holds, `deadline` passes, or nothing has
    /// happened for the poll mode's spin. Returns `done()`.
    fn drive(&self, link: &Link, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool;
}

/// Shared by the engine, its regions, its handles and the worker.
pub(crate) struct Link {
    commands: Sender<Command>,
    /// The worker thread sleeps on the descriptors (or naps).
    sleeping: AtomicBool,
    /// User threads that want to drive now: the worker steps aside.
    wanted: AtomicUsize,
    /// A user thread holds the worker.
    driver_active: AtomicBool,
    /// The driving thread sleeps on the descriptors (holding the worker).
    driver_sleeping: AtomicBool,
    /// When a driver last let go, in nanoseconds since `epoch`.
    last_drive: AtomicU64,
    epoch: Instant,
    eventfd: OwnedFd,
    worker: OnceLock<Thread>,
    progress: OnceLock<Arc<dyn Progress>>,
}

impl Link {
    pub(crate) fn new() -> Result<(Self, Receiver<Command>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::InvalidRequest(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let link = Link {
            commands: tx,
            sleeping: AtomicBool::new(false),
            wanted: AtomicUsize::new(0),
            driver_active: AtomicBool::new(false),
            driver_sleeping: AtomicBool::new(false),
            last_drive: AtomicU64::new(0),
            epoch: Instant::now(),
            eventfd,
            worker: OnceLock::new(),
            progress: OnceLock::new(),
        };
        Ok((link, rx))
    }

    /// Records the worker's thread (once, right after spawning it).
    pub(crate) fn set_worker(&self, worker: Thread) {
        let _ = self.worker.set(worker);
    }

    /// Records the worker's core, through which user threads drive it.
    pub(crate) fn set_progress(&self, progress: Arc<dyn Progress>) {
        let _ = self.progress.set(progress);
    }

    /// Queues a command and makes sure somebody handles it soon: a driving
    /// thread or the worker asleep on the descriptors is woken through the
    /// eventfd; a running worker or an awake driver sees the command on its
    /// next turn; a worker standing aside after a driver left sees it when
    /// it resumes (at most `progress::ASIDE_MAX` later). Fails with [`Error::Shutdown`] (returning nothing: the
    /// command is dropped, and with it any guard, which reports the
    /// shutdown) once the worker is gone.
    ///
    /// (Posting the command right here, on the submitting thread, when
    /// nobody held the worker was tried and dropped: it saved nothing
    /// measurable on the ping-pong, where the submitter waits, and so
    /// drives, right after, and with it a post spun for good inside
    /// libfabric shm on the lock of a peer killed meanwhile in 3 of 12 runs
    /// of the killed-peer test, against none in 26 runs without it.)
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| Error::Shutdown)?;
        if self.driver_sleeping.load(Ordering::SeqCst) || self.sleeping.load(Ordering::SeqCst) {
            self.wake_fd();
        }
        Ok(())
    }

    /// Whether commands are queued.
    pub(crate) fn has_commands(&self) -> bool {
        !self.commands.is_empty()
    }

    /// Wakes the worker wherever it waits: its `ppoll` and its park.
    pub(crate) fn wake(&self) {
        self.wake_fd();
        self.unpark_worker();
    }

    fn wake_fd(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Ends the worker's standing aside (a driver is leaving and will not
    /// poll any more).
    pub(crate) fn unpark_worker(&self) {
        if let Some(t) = self.worker.get() {
            t.unpark();
        }
    }

    /// Worker side: about to sleep on the descriptors (`true`), or awake.
    pub(crate) fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }

    pub(crate) fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Worker side: clears pending wake-ups.
    pub(crate) fn drain_wakeups(&self) {
        let mut buf = 0u64;
        // SAFETY: reads at most 8 bytes into a live u64; non-blocking fd.
        unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
    }

    /// True on the worker thread, and on a user thread while it drives the
    /// worker (inside callbacks it runs): there, waiting for the worker would
    /// wait for this very thread.
    pub(crate) fn on_worker(&self) -> bool {
        DRIVING.with(Cell::get) == std::ptr::from_ref(self) as usize
            || self.worker.get().is_some_and(|t| t.id() == std::thread::current().id())
    }

    /// Whether user threads want to drive now.
    pub(crate) fn drive_wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst) > 0
    }

    /// Whether a user thread holds the worker now.
    pub(crate) fn driver_active(&self) -> bool {
        self.driver_active.load(Ordering::SeqCst)
    }

    /// Driver side: about to sleep on the descriptors (`true`), or awake.
    pub(crate) fn set_driver_sleeping(&self, sleeping: bool) {
        self.driver_sleeping.store(sleeping, Ordering::SeqCst);
    }

    /// Driver side: took the worker.
    pub(crate) fn driver_took(&self) {
        self.driver_active.store(true, Ordering::SeqCst);
    }

    /// Driver side: lets the worker go; `coming_back` when it got what it
    /// waited for and is likely to submit or wait again soon (the worker
    /// then stays aside a little longer).
    pub(crate) fn driver_left(&self, coming_back: bool) {
        let now = if coming_back { (self.epoch.elapsed().as_nanos() as u64).max(1) } else { 0 };
        self.last_drive.store(now, Ordering::SeqCst);
        self.driver_active.store(false, Ordering::SeqCst);
    }

    /// Whether a user thread drove the worker within `window` (or does now).
    pub(crate) fn driven_within(&self, window: std::time::Duration) -> bool {
        if self.driver_active() {
            return true;
        }
        let last = self.last_drive.load(Ordering::SeqCst);
        last != 0 && (self.epoch.elapsed().as_nanos() as u64).saturating_sub(last) < window.as_nanos() as u64
    }

    pub(crate) fn want_drive(&self, want: bool) {
        if want {
            self.wanted.fetch_add(1, Ordering::SeqCst);
        } else {
            self.wanted.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Drives the engine on this thread until `done()` (see
    /// [`Progress::drive`]); false at once on the worker thread, inside a
    /// callback, or after shutdown. The caller then waits as it would have.
    pub(crate) fn drive(&self, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool {
        if self.on_worker() {
            return false;
        }
        match self.progress.get() {
            Some(p) => p.drive(self, done, deadline),
            None => false,
        }
    }
}
