//! The path from user threads to the worker: a command queue and a wake-up
//! that costs a syscall only when the worker is actually asleep.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread::ThreadId;

use crossbeam_channel::{Receiver, Sender};

use super::worker::Command;
use crate::error::{Error, Result};

/// Shared by the engine, its regions and nothing else.
pub(crate) struct Link {
    commands: Sender<Command>,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    worker: OnceLock<ThreadId>,
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
        Ok((Link { commands: tx, sleeping: AtomicBool::new(false), eventfd, worker: OnceLock::new() }, rx))
    }

    /// Records the worker's thread (once, right after spawning it).
    pub(crate) fn set_worker(&self, worker: ThreadId) {
        let _ = self.worker.set(worker);
    }

    /// Queues a command and wakes the worker if it sleeps. Fails with
    /// [`Error::Shutdown`] (returning nothing: the command is dropped, and
    /// with it any guard, which reports the shutdown) once the worker is gone.
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| Error::Shutdown)?;
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Worker side: about to sleep (`true`) or awake (`false`).
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

    pub(crate) fn on_worker(&self) -> bool {
        self.worker.get() == Some(&std::thread::current().id())
    }
}
