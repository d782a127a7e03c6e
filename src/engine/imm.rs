//! Counting immediates at the target: `expect_imm` counters and the tally
//! of immediates nobody was waiting for yet.
//!
//! # Semantics
//! Immediates are counted per 32-bit value. An immediate that arrives while
//! a counter is armed for its value counts towards that counter. One that
//! arrives while none is armed goes to the engine's unclaimed-immediate
//! callback or queue if one was configured, and otherwise is kept in a tally
//! that the next counter armed for that value starts from, so a sender that
//! races ahead of the receiver's `expect_imm` loses nothing. A counter takes
//! from the tally at most the count it expects; the rest stays for the next.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::link::Link;
use crate::cuda::MappedWords;
use crate::error::{Error, Result};

/// Where immediates no counter claims go.
pub(crate) enum UnclaimedImm {
    /// Kept per value for a later `expect_imm` (the default).
    Tally,
    /// Handed to a callback on the worker thread.
    Callback(Box<dyn Fn(u32) + Send + Sync>),
    /// Pushed into a queue read by `TransferEngine::next_imm`.
    Queue(super::mailbox::Poster<u32>),
}

pub(crate) struct ImmTable {
    state: Mutex<TableState>,
    unclaimed: UnclaimedImm,
    /// The engine, which a thread waiting on a counter drives.
    link: OnceLock<Arc<Link>>,
    /// Every counter's GPU-visible words, kept for the engine's life: a
    /// stream may still wait on the words of a counter already dropped.
    mirrors: Mutex<Vec<Arc<MappedWords<2>>>>,
}

struct TableState {
    tally: HashMap<u32, u64>,
    armed: HashMap<u32, Arc<CounterShared>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Armed,
    Reached,
    Cancelled,
}

struct CounterShared {
    value: u32,
    state: Mutex<CounterState>,
    cv: Condvar,
    /// `state.status != Armed`, readable without the lock (a driving
    /// waiter checks it after every turn of the worker).
    settled: AtomicBool,
    /// GPU-visible words (see [`ImmCounter::wait_on_stream`]): 0, rounds
    /// reached; 1, set on each reach (cleared by streams).
    mirror: OnceLock<Arc<MappedWords<2>>>,
}

struct CounterState {
    expected: u64,
    seen: u64,
    status: Status,
    /// Threads blocked on `cv`.
    waiters: u32,
    waker: Option<Waker>,
    callback: Option<Arc<dyn Fn(u32) + Send + Sync>>,
    /// When it was last armed (its latency in the engine's stats).
    armed_at: Instant,
    /// Rounds that reached their count.
    rounds: u32,
    /// A cancel stored releasing values into the GPU-visible words.
    released: bool,
}

/// A round reached its count: counted, and stored where streams wait
/// (before anyone is woken).
fn reached_round(counter: &CounterShared, c: &mut CounterState) {
    c.rounds = c.rounds.wrapping_add(1);
    if let Some(m) = counter.mirror.get() {
        m.word(0).store(c.rounds, Ordering::Release);
        m.word(1).store(1, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ImmTable {
    pub(crate) fn new(unclaimed: UnclaimedImm) -> Arc<Self> {
        Arc::new(ImmTable {
            state: Mutex::new(TableState { tally: HashMap::new(), armed: HashMap::new() }),
            unclaimed,
            link: OnceLock::new(),
            mirrors: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn set_link(&self, link: Arc<Link>) {
        let _ = self.link.set(link);
    }

    /// One immediate arrived (worker thread) at `now`. Returns how long
    /// its counter was armed when this arrival reached the count.
    pub(crate) fn deliver(&self, value: u32, now: Instant) -> Option<Duration> {
        if value == super::reserved::PING_IMM {
            return None;
        }
        let mut t = lock(&self.state);
        if let Some(counter) = t.armed.get(&value).cloned() {
            let mut c = lock(&counter.state);
            c.seen += 1;
            let mut took = None;
            if c.seen >= c.expected {
                took = Some(now.saturating_duration_since(c.armed_at));
                t.armed.remove(&value);
                drop(t);
                c.status = Status::Reached;
                reached_round(&counter, &mut c);
                counter.settled.store(true, Ordering::Release);
                let waker = c.waker.take();
                let callback = c.callback.clone();
                let waiters = c.waiters > 0;
                drop(c);
                // A notify is a system call: only for threads blocked on it.
                if waiters {
                    counter.cv.notify_all();
                }
                if let Some(w) = waker {
                    w.wake();
                }
                if let Some(cb) = callback {
                    cb(value);
                }
            }
            return took;
        }
        match &self.unclaimed {
            // Reserved immediates are never the user's: kept for their slot.
            _ if value >= super::reserved::RESERVED_IMM_BASE => *t.tally.entry(value).or_insert(0) += 1,
            UnclaimedImm::Tally => *t.tally.entry(value).or_insert(0) += 1,
            UnclaimedImm::Callback(cb) => {
                drop(t);
                cb(value);
            }
            UnclaimedImm::Queue(tx) => {
                drop(t);
                tx.push(value);
            }
        }
        None
    }

    /// Arms `counter` for `count` more immediates, starting from the tally.
    fn arm(&self, counter: &Arc<CounterShared>, count: u64) -> Result<()> {
        if count == 0 {
            return Err(Error::InvalidRequest("expect_imm count must be at least 1".into()));
        }
        let mut t = lock(&self.state);
        if let Some(other) = t.armed.get(&counter.value) {
            if !Arc::ptr_eq(other, counter) {
                return Err(Error::InvalidRequest(format!(
                    "a counter for immediate {} is already armed",
                    counter.value
                )));
            }
        }
        let from_tally = match t.tally.get_mut(&counter.value) {
            Some(n) => {
                let take = (*n).min(count);
                *n -= take;
                if *n == 0 {
                    t.tally.remove(&counter.value);
                }
                take
            }
            None => 0,
        };
        let mut c = lock(&counter.state);
        c.expected = count;
        c.seen = from_tally;
        c.armed_at = Instant::now();
        if let Some(m) = counter.mirror.get() {
            if c.released {
                // A cancel released the streams; this round starts clean.
                c.released = false;
                m.word(0).store(c.rounds, Ordering::Release);
                m.word(1).store(0, Ordering::Release);
            }
        }
        if from_tally >= count {
            c.status = Status::Reached;
            t.armed.remove(&counter.value);
            reached_round(counter, &mut c);
        } else {
            c.status = Status::Armed;
            t.armed.insert(counter.value, counter.clone());
        }
        counter.settled.store(c.status != Status::Armed, Ordering::Release);
        Ok(())
    }

    /// Forgets the kept immediates of the 256 values from `first` (a slot
    /// being handed to a new holder).
    pub(crate) fn forget_prefix(&self, first: u32) {
        let mut t = lock(&self.state);
        if !t.tally.is_empty() {
            t.tally.retain(|v, _| v & !0xFF != first);
        }
    }

    pub(crate) fn expect(self: &Arc<Self>, value: u32, count: u64) -> Result<ImmCounter> {
        let shared = Arc::new(CounterShared {
            value,
            state: Mutex::new(CounterState {
                expected: count,
                seen: 0,
                status: Status::Armed,
                waiters: 0,
                waker: None,
                callback: None,
                armed_at: Instant::now(),
                rounds: 0,
                released: false,
            }),
            cv: Condvar::new(),
            settled: AtomicBool::new(false),
            mirror: OnceLock::new(),
        });
        self.arm(&shared, count)?;
        Ok(ImmCounter { shared, table: self.clone() })
    }
}

/// Counts immediates of one value at the target, from
/// [`TransferEngine::expect_imm`](crate::TransferEngine::expect_imm).
///
/// Wait on it (with or without a deadline), poll it, give it a callback,
/// cancel it, and re-arm it for the next round. Dropping it cancels it.
pub struct ImmCounter {
    shared: Arc<CounterShared>,
    table: Arc<ImmTable>,
}

impl fmt::Debug for ImmCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = lock(&self.shared.state);
        f.debug_struct("ImmCounter")
            .field("value", &self.shared.value)
            .field("seen", &c.seen)
            .field("expected", &c.expected)
            .finish()
    }
}

impl ImmCounter {
    /// The immediate value counted.
    pub fn value(&self) -> u32 {
        self.shared.value
    }

    /// Immediates counted in this round so far (capped at the expected count).
    pub fn seen(&self) -> u64 {
        let c = lock(&self.shared.state);
        c.seen.min(c.expected)
    }

    /// True once the expected count has arrived.
    pub fn is_reached(&self) -> bool {
        lock(&self.shared.state).status == Status::Reached
    }

    /// Blocks until the count is reached. Fails with [`Error::Cancelled`] if
    /// the counter is cancelled meanwhile.
    pub fn wait(&self) -> Result<()> {
        self.wait_until(None)
    }

    /// Like [`wait`](Self::wait) with a deadline: [`Error::Timeout`] when it
    /// passes (the counter stays armed).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.wait_until(Some((Instant::now() + timeout, timeout)))
    }

    fn wait_until(&self, deadline: Option<(Instant, Duration)>) -> Result<()> {
        if let Some(link) = self.table.link.get() {
            let settled = || self.shared.settled.load(Ordering::Acquire);
            if !settled() {
                link.drive(&settled, deadline.map(|(at, _)| at));
            }
        }
        let mut c = lock(&self.shared.state);
        loop {
            match c.status {
                Status::Reached => return Ok(()),
                Status::Cancelled => return Err(Error::Cancelled),
                Status::Armed => {}
            }
            c.waiters += 1;
            c = match deadline {
                None => self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner()),
                Some((at, timeout)) => {
                    let now = Instant::now();
                    if now >= at {
                        c.waiters -= 1;
                        return Err(Error::Timeout(timeout));
                    }
                    self.shared.cv.wait_timeout(c, at - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
            c.waiters -= 1;
        }
    }

    /// Calls `callback(value)` each time the counter reaches its count (on
    /// the thread that drives the engine then, see the crate docs; or right
    /// away if it already has).
    pub fn on_reached(&self, callback: impl Fn(u32) + Send + Sync + 'static) {
        let callback: Arc<dyn Fn(u32) + Send + Sync> = Arc::new(callback);
        let mut c = lock(&self.shared.state);
        c.callback = Some(callback.clone());
        if c.status == Status::Reached {
            drop(c);
            callback(self.shared.value);
        }
    }

    /// Enqueues on CUDA stream `stream` (a `CUstream`; in PyTorch
    /// `torch.cuda.current_stream().cuda_stream`; 0 for the legacy default
    /// stream) a wait for this counter, with no CPU round trip: work queued
    /// on the stream after this call runs once the counter's current round
    /// has reached its count (at once if it already has). The engine's
    /// worker, on the arrival that reaches the count, stores the number of
    /// rounds reached into a word of page-locked host memory mapped for the
    /// GPU, on which the stream waits (`cuStreamWaitValue32`, "greater or
    /// equal", wrap-around safe).
    ///
    /// The round waited for is fixed when this is called, so in a captured
    /// CUDA graph every replay waits for the same round: for graphs use
    /// [`wait_on_stream_and_clear`](Self::wait_on_stream_and_clear).
    /// Cancelling the counter (or dropping it while armed) releases the
    /// streams waiting on it, so that none hangs on a round that will not
    /// come; the words live as long as the engine. Needs CUDA
    /// ([`crate::cuda::probe`]).
    pub fn wait_on_stream(&self, stream: u64) -> Result<()> {
        let mirror = self.mirror(false)?;
        let c = lock(&self.shared.state);
        let target = if c.status == Status::Reached { c.rounds } else { c.rounds.wrapping_add(1) };
        drop(c);
        mirror.stream_wait(stream, 0, target)
    }

    /// Enqueues on `stream` a wait for the next reach of the count, then a
    /// store that clears the flag that reach set: one reach releases one
    /// wait, and the same two operations captured in a CUDA graph release
    /// each replay on the next reach. Use it when the next round cannot
    /// reach its count before the stream has passed this wait (the usual
    /// step-by-step protocol: the peer's next round follows this side's
    /// next request); two reaches before the stream gets there release it
    /// once. Cancelling the counter releases the wait. Needs CUDA.
    pub fn wait_on_stream_and_clear(&self, stream: u64) -> Result<()> {
        let mirror = self.mirror(false)?;
        mirror.stream_wait(stream, 1, 1)?;
        mirror.stream_write(stream, 1, 0)
    }

    /// The counter's GPU-visible words, created on first use (`host`: the
    /// plain-memory stand-in, for tests).
    pub(crate) fn mirror(&self, host: bool) -> Result<Arc<MappedWords<2>>> {
        if let Some(m) = self.shared.mirror.get() {
            return Ok(m.clone());
        }
        let words = Arc::new(if host { MappedWords::host() } else { MappedWords::mapped()? });
        // Under the state lock, so that no reach falls between reading the
        // state and publishing the words.
        let c = lock(&self.shared.state);
        words.word(0).store(c.rounds, Ordering::Release);
        words.word(1).store(u32::from(c.status == Status::Reached), Ordering::Release);
        if self.shared.mirror.set(words.clone()).is_ok() {
            lock(&self.table.mirrors).push(words);
        }
        drop(c);
        Ok(self.shared.mirror.get().expect("set above").clone())
    }

    /// Stops counting: waiters get [`Error::Cancelled`]. Immediates of this
    /// value that arrive later go to the tally (or the unclaimed sink).
    pub fn cancel(&self) {
        let mut t = lock(&self.table.state);
        if t.armed.get(&self.shared.value).is_some_and(|a| Arc::ptr_eq(a, &self.shared)) {
            t.armed.remove(&self.shared.value);
        }
        drop(t);
        let mut c = lock(&self.shared.state);
        if c.status == Status::Armed {
            c.status = Status::Cancelled;
            if let Some(m) = self.shared.mirror.get() {
                // No stream hangs on a round that will not come: waits are
                // released (their data did not arrive: check the counter).
                c.released = true;
                m.word(0).store(c.rounds.wrapping_add(1 << 30), Ordering::Release);
                m.word(1).store(1, Ordering::Release);
            }
        }
        self.shared.settled.store(true, Ordering::Release);
        let waker = c.waker.take();
        drop(c);
        self.shared.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Starts a new round expecting `count` more immediates of the same value
    /// (arrivals beyond the previous round's count are already in the tally).
    pub fn rearm(&self, count: u64) -> Result<()> {
        self.table.arm(&self.shared, count)
    }
}

impl Drop for ImmCounter {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl std::future::Future for ImmCounter {
    type Output = Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        let mut c = lock(&self.shared.state);
        match c.status {
            Status::Reached => std::task::Poll::Ready(Ok(())),
            Status::Cancelled => std::task::Poll::Ready(Err(Error::Cancelled)),
            Status::Armed => {
                c.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_arrivals_are_kept_for_the_next_counter() {
        let t = ImmTable::new(UnclaimedImm::Tally);
        for _ in 0..5 {
            t.deliver(7, Instant::now());
        }
        let c = t.expect(7, 3).unwrap();
        assert!(c.is_reached());
        c.rearm(3).unwrap();
        assert_eq!(c.seen(), 2, "two left over from the tally");
        assert!(!c.is_reached());
        t.deliver(7, Instant::now());
        assert!(c.wait_timeout(Duration::from_millis(10)).is_ok());
    }

    #[test]
    fn counts_exactly_and_times_out() {
        let t = ImmTable::new(UnclaimedImm::Tally);
        let c = t.expect(1, 2).unwrap();
        t.deliver(1, Instant::now());
        t.deliver(2, Instant::now());
        assert!(matches!(c.wait_timeout(Duration::from_millis(5)), Err(Error::Timeout(_))));
        assert_eq!(c.seen(), 1);
        t.deliver(1, Instant::now());
        assert!(c.wait().is_ok());
    }

    #[test]
    fn cancel_wakes_waiters_and_one_counter_per_value() {
        let t = ImmTable::new(UnclaimedImm::Tally);
        let c = t.expect(9, 1).unwrap();
        assert!(t.expect(9, 1).is_err());
        c.cancel();
        assert!(matches!(c.wait(), Err(Error::Cancelled)));
        t.deliver(9, Instant::now());
        let d = t.expect(9, 1).unwrap();
        assert!(d.is_reached());
        assert!(t.expect(3, 0).is_err());
    }

    #[test]
    fn unclaimed_go_to_the_queue() {
        let (tx, rx) = super::super::mailbox::Mailbox::new();
        let t = ImmTable::new(UnclaimedImm::Queue(tx));
        let c = t.expect(1, 1).unwrap();
        t.deliver(2, Instant::now());
        t.deliver(1, Instant::now());
        assert!(c.is_reached());
        assert_eq!(rx.pop_timeout(Duration::ZERO).unwrap(), 2);
        assert!(rx.pop_timeout(Duration::ZERO).is_err());
    }
}
