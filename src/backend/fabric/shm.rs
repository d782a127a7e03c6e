//! shm endpoints: their names, and when they may be closed.
//!
//! # Names
//!
//! libfabric 1.17's shm names an endpoint after the process id
//! (`fi_shm://<pid>`, a `/dev/shm/<pid>:<uid>:<index>` region of 16 MiB) and
//! removes the region when the endpoint closes. A process that is killed
//! leaves its regions behind, and a later process that gets the same pid
//! cannot open shm at all (`fi_enable`: EBUSY) until they are removed. So
//! strait names its shm endpoints `fi_shm://strait-<pid>-<random>` (unique
//! per engine), and before naming one removes the regions of strait
//! processes that no longer exist, which also returns their memory.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::sync::Mutex;

use fabric_sys as sys;

use crate::error::{Error, Result};

const PREFIX: &str = "strait-";

/// An `fi_info` copy carrying our endpoint name, freed on drop.
pub(super) struct Named(pub *mut sys::fi_info);

impl Drop for Named {
    fn drop(&mut self) {
        if let Ok(lib) = sys::Library::get() {
            // SAFETY: the copy came from fi_dupinfo and is freed once.
            unsafe { (lib.fi_freeinfo)(self.0) };
        }
    }
}

/// For an shm entry, a copy of it whose source address is a fresh strait
/// name; `None` for other providers (their names need no help).
///
/// # Safety
/// `info` must be a live `fi_info` from `fi_getinfo`.
pub(super) unsafe fn named_info(info: *mut sys::fi_info) -> Result<Option<Named>> {
    let shm = super::info::provider_name(info) == "shm";
    if !shm {
        return Ok(None);
    }
    remove_stale();
    let lib =
        sys::Library::get().map_err(|e| Error::BackendUnavailable { backend: "libfabric", reason: e.to_string() })?;
    let name = CString::new(format!("fi_shm://{PREFIX}{}-{:08x}", std::process::id(), crate::backend::random_u32()))
        .expect("no NUL");
    // SAFETY: info is live; the copy is ours until Named drops it. Its
    // src_addr is replaced by a malloc'ed string, which fi_freeinfo frees.
    unsafe {
        let copy = (lib.fi_dupinfo)(info);
        if copy.is_null() {
            return Err(Error::BackendUnavailable { backend: "shm", reason: "fi_dupinfo failed".into() });
        }
        libc::free((*copy).src_addr);
        (*copy).src_addr = libc::strdup(name.as_ptr()).cast();
        (*copy).src_addrlen = name.as_bytes_with_nul().len();
        (*copy).addr_format = sys::FI_ADDR_STR;
        Ok(Some(Named(copy)))
    }
}

/// Which shm NICs of this process have peered with which (both ways), and
/// the NICs dropped while a peer of theirs is still open.
///
/// # Why
/// libfabric 1.17's shm does not map the region of a peer endpoint that
/// lives in the same process: it uses that endpoint's own region pointer.
/// Closing the endpoint frees the region and leaves the pointer dangling in
/// every endpoint of the process that has it as a peer; their next
/// operation to it, or their progress answering it, crashes the process.
/// So an shm NIC that peered with another NIC of this process (it inserted
/// that NIC's address, or that NIC inserted its) is not closed when dropped
/// while such a partner is open: it is kept, idle, until none is, and closed
/// then. Nothing progresses a kept NIC: requests to it fail through the
/// request timeout; its receive buffers and regions were released by the
/// engine, and nothing reads or writes them without its progress.
/// A dropped NIC kept open: its address, its partners, and its objects.
struct Kept {
    address: Box<[u8]>,
    partners: HashSet<Box<[u8]>>,
    _objects: Box<dyn Send>,
}

#[derive(Default)]
struct Registry {
    /// Open NICs by address, each with the addresses of its partners.
    open: HashMap<Box<[u8]>, HashSet<Box<[u8]>>>,
    kept: Vec<Kept>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Registry::default))
}

/// An shm NIC with this address was opened.
pub(super) fn opened(address: &[u8]) {
    with_registry(|r| r.open.insert(address.into(), HashSet::new()));
}

/// The shm NIC `own` inserted `peer`. Only peers in this process matter.
pub(super) fn peered(own: &[u8], peer: &[u8]) {
    let marker = format!("{PREFIX}{}-", std::process::id());
    if !peer.windows(marker.len()).any(|w| w == marker.as_bytes()) {
        return;
    }
    with_registry(|r| {
        if let Some(partners) = r.open.get_mut(own) {
            partners.insert(peer.into());
        }
        if let Some(partners) = r.open.get_mut(peer) {
            partners.insert(own.into());
        } else if let Some(kept) = r.kept.iter_mut().find(|k| &*k.address == peer) {
            kept.partners.insert(own.into());
        }
    });
}

/// The shm NIC with this address was dropped: close it (drop `objects`)
/// now, or keep it while an open NIC of this process is its partner. Also
/// closes the kept NICs whose partners have all gone.
pub(super) fn retire(address: Box<[u8]>, objects: Box<dyn Send>) {
    let closing = with_registry(|r| {
        let partners = r.open.remove(&address).unwrap_or_default();
        r.kept.push(Kept { address, partners, _objects: objects });
        let (free, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut r.kept).into_iter().partition(|k| !k.partners.iter().any(|p| r.open.contains_key(p)));
        r.kept = kept;
        if !r.kept.is_empty() {
            tracing::debug!(kept = r.kept.len(), "shm NICs kept open while a partner in this process is open");
        }
        free
    });
    // Closed outside the lock.
    drop(closing);
}

/// Whether the process behind an shm peer still runs.
///
/// libfabric 1.17's shm takes a spinlock inside the *peer's* region for
/// every operation to it, and the peer holds the same lock whenever it
/// progresses its endpoint. A peer killed while holding it leaves it held
/// for good, and the next post to that peer spins inside libfabric forever,
/// taking the engine's worker with it (seen in the killed-peer test: the
/// worker spinning in `fi_writemsg` on the lock at offset 0x18 of the dead
/// peer's `/dev/shm` region). So the NIC checks the peer's process before
/// its first post to that peer in each round of posts (one pass of the
/// worker over its ready requests), through a pidfd (readable once the
/// process has exited, reaped or not; one `poll` of 0.2-0.4 µs) or,
/// without pidfds, `kill(pid, 0)`. A post to an exited peer fails with
/// `PeerUnreachable` without calling into libfabric. (Checking before every
/// post cost up to a fifth of the submitting thread's time with 4 KiB
/// writes, whose retries on a full queue each paid the system call.) A
/// round can be long (a request of many pieces that shm takes without
/// waiting: see `Nic::in_order_delivery`), so the check is also repeated
/// every [`POSTS_PER_CHECK`] posts to the peer within a round. What remains
/// is a post already spinning on the lock of a live peer that is killed
/// within that critical section, or killed between two checks.
///
/// A peer *stopped* (`SIGSTOP`, a debugger, a frozen cgroup) while it holds
/// the lock leaves it held until it runs again, with the same effect on
/// the next post for as long as it is stopped (seen in the failure tests:
/// the worker in `pthread_spin_lock` under `fi_writedata`). So the watch
/// also reads the peer's scheduling state (`/proc/<pid>/stat`, kept open:
/// one `pread` of about a microsecond) when the last reading is older than
/// [`STATE_EVERY`], at the first post of a round: a stopped peer's posts
/// wait as for a full queue, and its requests expire through the request
/// timeout, with the worker free. What remains is a peer stopped, holding
/// the lock, within [`STATE_EVERY`] before a post; and stops that do not
/// show in the main thread's state: a frozen cgroup (`docker pause`: the
/// tasks read as sleeping) or a tracer stopping another thread. Those still
/// wedge the worker until the peer runs again; waits with a deadline and
/// the engine's drop stay bounded (see `engine::progress`).
pub(super) struct PeerWatch {
    pid: i32,
    pidfd: Option<std::os::fd::OwnedFd>,
    exited: bool,
    /// The round of posts it was last checked in.
    checked: Option<u64>,
    /// Posts since the last check.
    posts: u32,
    /// `/proc/<pid>/stat`, and when it was last read and what it said.
    stat: Option<std::fs::File>,
    state_read: Option<std::time::Instant>,
    stopped: bool,
}

/// What a [`PeerWatch`] knows of its peer's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerState {
    Running,
    /// Stopped by a signal or a tracer (state `T` or `t`).
    Stopped,
    Exited,
}

/// How often a watch reads its peer's scheduling state at most.
const STATE_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// Posts to one peer between two liveness checks within a round.
const POSTS_PER_CHECK: u32 = 8;

impl PeerWatch {
    /// A watch for the process behind an shm address of strait's naming;
    /// `None` for addresses of this process or of other naming.
    pub(super) fn for_address(address: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(address).ok()?.trim_end_matches('\0');
        let pid = owner(text.strip_prefix("fi_shm://").unwrap_or(text))?;
        if pid <= 0 || pid as u32 == std::process::id() {
            return None;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: a fresh descriptor that nothing else owns.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) }
        });
        let stat = std::fs::File::open(format!("/proc/{pid}/stat")).ok();
        Some(PeerWatch { pid, pidfd, exited: false, checked: None, posts: 0, stat, state_read: None, stopped: false })
    }

    /// The peer's pid.
    pub(super) fn pid(&self) -> i32 {
        self.pid
    }

    /// The peer's state: whether it exited (checked as [`exited`] says) or
    /// is stopped (read at most every [`STATE_EVERY`], at the first post of
    /// a round).
    ///
    /// [`exited`]: Self::exited
    pub(super) fn check(&mut self, round: u64) -> PeerState {
        let first_of_round = self.checked != Some(round);
        if self.exited(round) {
            return PeerState::Exited;
        }
        if first_of_round || self.stopped {
            let now = std::time::Instant::now();
            if self.state_read.is_none_or(|at| now.duration_since(at) >= STATE_EVERY) {
                self.state_read = Some(now);
                self.stopped = self.stat.as_ref().is_some_and(stopped);
            }
        }
        if self.stopped {
            PeerState::Stopped
        } else {
            PeerState::Running
        }
    }

    /// True once the peer's process has exited; checked at the first post
    /// of each round of posts (`round`: the NIC's round counter) and every
    /// [`POSTS_PER_CHECK`] posts after it.
    pub(super) fn exited(&mut self, round: u64) -> bool {
        if self.exited {
            return true;
        }
        if self.checked == Some(round) && self.posts < POSTS_PER_CHECK {
            self.posts += 1;
            return false;
        }
        self.checked = Some(round);
        self.posts = 0;
        self.exited = match &self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd, zero timeout.
                let ready = unsafe { libc::poll(&mut p, 1, 0) };
                ready > 0
            }
            None => {
                // SAFETY: signal 0 only checks that the process exists.
                let rc = unsafe { libc::kill(self.pid, 0) };
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            }
        };
        self.exited
    }
}

/// Whether the process whose `/proc/<pid>/stat` is open as `stat` is
/// stopped: its state, the field after the command name's closing
/// parenthesis, is `T` (stopped by a signal) or `t` (stopped by a tracer).
fn stopped(stat: &std::fs::File) -> bool {
    let mut buf = [0u8; 512];
    let Ok(n) = std::os::unix::fs::FileExt::read_at(stat, &mut buf, 0) else { return false };
    state_of(&buf[..n]).is_some_and(|s| s == b'T' || s == b't')
}

/// The state letter of a `/proc/<pid>/stat` line.
fn state_of(line: &[u8]) -> Option<u8> {
    let close = line.iter().rposition(|&b| b == b')')?;
    line.get(close + 2).copied()
}

/// The pid in a region name `strait-<pid>-<random>:<uid>:<index>`.
fn owner(file: &str) -> Option<i32> {
    file.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the shm regions of strait processes that have exited.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!(region = ?name, "removed the shm region of an exited process"),
                Err(e) => tracing::debug!(region = ?name, error = %e, "could not remove a stale shm region"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partners keep each other open until both are dropped; unrelated
    /// NICs close at once.
    #[test]
    fn kept_until_no_partner_is_open() {
        let pid = std::process::id();
        let name = |n: u32| format!("fi_shm://{PREFIX}{pid}-{n:08x}:0:0").into_bytes().into_boxed_slice();
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = || {
            let f = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            (f.clone(), Box::new(Flag(f)) as Box<dyn Send>)
        };
        let (a, b, c) = (name(0xa0a0_a0a0), name(0xb0b0_b0b0), name(0xc0c0_c0c0));
        for n in [&a, &b, &c] {
            opened(n);
        }
        peered(&a, &b); // a inserted b
        peered(&c, b"fi_shm://someone-else:0:0");
        let (a_closed, a_objects) = flag();
        retire(a.clone(), a_objects);
        assert!(!a_closed.load(std::sync::atomic::Ordering::SeqCst), "b is still open and may point at a");
        let (c_closed, c_objects) = flag();
        retire(c, c_objects);
        assert!(c_closed.load(std::sync::atomic::Ordering::SeqCst), "c has no partner in this process");
        let (b_closed, b_objects) = flag();
        retire(b, b_objects);
        assert!(
            a_closed.load(std::sync::atomic::Ordering::SeqCst) && b_closed.load(std::sync::atomic::Ordering::SeqCst)
        );
    }

    #[test]
    fn a_watched_peer_is_seen_to_exit() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("spawning sleep");
        let address = format!("fi_shm://{PREFIX}{}-0badcafe:0:0", child.id());
        let mut watch = PeerWatch::for_address(address.as_bytes()).expect("a strait shm name of another process");
        assert!(!watch.exited(1), "the child runs");
        child.kill().unwrap();
        // Exited but not reaped yet (a zombie): with a pidfd it counts as exited.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if watch.pidfd.is_none() {
            child.wait().unwrap();
        }
        assert!(!watch.exited(1), "checked once per round");
        assert!(watch.exited(2), "the child was killed");
        let _ = child.wait();
        let own = format!("fi_shm://{PREFIX}{}-0badcafe:0:0", std::process::id());
        assert!(PeerWatch::for_address(own.as_bytes()).is_none(), "in-process peers are not watched");
        assert!(PeerWatch::for_address(b"fi_shm://1234:0:0").is_none(), "names of other naming are not");
    }

    #[test]
    fn a_watched_peer_is_seen_stopped_and_running_again() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("spawning sleep");
        let address = format!("fi_shm://{PREFIX}{}-0badcafe:0:0", child.id());
        let mut watch = PeerWatch::for_address(address.as_bytes()).expect("a strait shm name of another process");
        assert_eq!(watch.check(1), PeerState::Running);
        // SAFETY: signals to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(watch.check(2), PeerState::Stopped);
        assert_eq!(watch.check(2), PeerState::Stopped, "within the round, what was read");
        // SAFETY: as above.
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(watch.check(3), PeerState::Running);
        child.kill().unwrap();
        let _ = child.wait();
        assert_eq!(watch.check(4), PeerState::Exited);
        assert_eq!(state_of(b"42 (a b) c) T 1 2"), Some(b'T'), "the command name may hold ') '");
        assert_eq!(state_of(b"42 (x"), None);
    }

    #[test]
    fn owner_is_read_from_our_names_only() {
        assert_eq!(owner("strait-1234-0badcafe:0:1"), Some(1234));
        assert_eq!(owner("1234:0:1"), None);
        assert_eq!(owner("strait-x-1:0:0"), None);
        assert_eq!(owner("other"), None);
    }
}
