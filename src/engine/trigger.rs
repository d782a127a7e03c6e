//! `StreamTrigger`: a CUDA stream starts a prepared request without the
//! CPU waiting on the stream.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cuda::MappedWords;
use crate::error::{Error, Result};

/// How the trigger's watcher thread waits for the next store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerPoll {
    /// Spins on the word all the time: the lowest latency, one core.
    Spin,
    /// Spins for `spin` after each fire (layer after layer comes quickly),
    /// then looks every `nap` (a sleep: about 60 us more on Linux' default
    /// timer slack).
    SpinThenNap {
        /// How long to spin after a fire.
        spin: Duration,
        /// The sleep between looks after that.
        nap: Duration,
    },
}

impl Default for TriggerPoll {
    /// Spins for 2 ms after each fire, then naps 50 us.
    fn default() -> Self {
        TriggerPoll::SpinThenNap { spin: Duration::from_millis(2), nap: Duration::from_micros(50) }
    }
}

/// A small watched slot that CUDA streams (or kernels, or the CPU) store
/// into, on which a watcher thread calls `on_fire` to start prepared
/// requests: "layer L of this KV request is computed: send it", with no
/// CPU thread blocked on the stream.
///
/// The slot is one 32-bit word of page-locked host memory mapped for the
/// GPU. [`fire_on_stream`](Self::fire_on_stream) enqueues a store
/// (`cuStreamWriteValue32`, ordered after the stream's earlier work, and
/// capturable into a CUDA graph); a kernel may store into
/// [`address`](Self::address) itself. The watcher sees the word change and
/// calls `on_fire(v)` for every value `v` after the last one it saw, up to
/// the new one, in order (so values that increase by one per fire are
/// never lost when two stores land between two looks); a value lower than
/// the last is taken as a new sequence and passed alone. Store increasing
/// values (layer + 1, or a running count); 0 is the initial value.
///
/// `on_fire` runs on the watcher thread: submit requests from it (they
/// are non-blocking), do not wait on them. Dropping the trigger stops the
/// watcher; the word must not be stored into afterwards (a stream still
/// holding a fire must have completed).
pub struct StreamTrigger {
    words: Arc<MappedWords<1>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for StreamTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTrigger").field("value", &self.value()).field("gpu", &self.words.on_gpu()).finish()
    }
}

impl StreamTrigger {
    /// A trigger whose word streams can store into. Needs CUDA.
    pub fn new(poll: TriggerPoll, on_fire: impl FnMut(u32) + Send + 'static) -> Result<StreamTrigger> {
        Self::start(Arc::new(MappedWords::mapped()?), poll, on_fire)
    }

    /// A trigger fired from the CPU only ([`fire`](Self::fire)): the same
    /// watcher on a word of plain host memory, without CUDA (for CPU
    /// producers, and for tests of what the fire starts).
    pub fn on_host(poll: TriggerPoll, on_fire: impl FnMut(u32) + Send + 'static) -> Result<StreamTrigger> {
        Self::start(Arc::new(MappedWords::host()), poll, on_fire)
    }

    fn start(
        words: Arc<MappedWords<1>>,
        poll: TriggerPoll,
        mut on_fire: impl FnMut(u32) + Send + 'static,
    ) -> Result<StreamTrigger> {
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (words.clone(), stop.clone());
        // Read here, not on the watcher: a fire before it runs still counts.
        let first = words.word(0).load(Ordering::Acquire);
        let thread = std::thread::Builder::new()
            .name("strait-trigger".into())
            .spawn(move || watch(&w, &s, first, poll, &mut on_fire))
            .map_err(|e| Error::InvalidRequest(format!("spawning the trigger's watcher: {e}")))?;
        Ok(StreamTrigger { words, stop, thread: Some(thread) })
    }

    /// Enqueues on CUDA stream `stream` (a `CUstream`; PyTorch:
    /// `torch.cuda.current_stream().cuda_stream`) a store of `value` into
    /// the word, after the work queued before it.
    pub fn fire_on_stream(&self, stream: u64, value: u32) -> Result<()> {
        self.words.stream_write(stream, 0, value)
    }

    /// Stores `value` from the CPU.
    pub fn fire(&self, value: u32) {
        self.words.word(0).store(value, Ordering::Release);
    }

    /// The word's address, for a kernel to store into (unified addressing:
    /// valid on every GPU, and on the host).
    pub fn address(&self) -> u64 {
        self.words.address(0)
    }

    /// The last value stored.
    pub fn value(&self) -> u32 {
        self.words.word(0).load(Ordering::Acquire)
    }
}

impl Drop for StreamTrigger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Values a single look passes on at most: a jump larger than this is
/// passed as its last value alone.
const MAX_CATCH_UP: u32 = 1 << 16;

fn watch(words: &MappedWords<1>, stop: &AtomicBool, mut last: u32, poll: TriggerPoll, on_fire: &mut dyn FnMut(u32)) {
    let word = words.word(0);
    let mut active = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let now = word.load(Ordering::Acquire);
        if now != last {
            let ahead = now.wrapping_sub(last);
            if ahead <= MAX_CATCH_UP && (ahead as i32) > 0 {
                for i in 1..=ahead {
                    on_fire(last.wrapping_add(i));
                }
            } else {
                on_fire(now);
            }
            last = now;
            active = Instant::now();
            continue;
        }
        match poll {
            TriggerPoll::Spin => std::hint::spin_loop(),
            TriggerPoll::SpinThenNap { spin, nap } => {
                if active.elapsed() < spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(nap);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn nap() -> TriggerPoll {
        TriggerPoll::SpinThenNap { spin: Duration::from_micros(100), nap: Duration::from_micros(200) }
    }

    fn wait_for(seen: &Mutex<Vec<u32>>, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = seen.lock().unwrap().clone();
            if v.len() >= n || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_value_up_to_the_stored_one_fires_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let t = StreamTrigger::on_host(nap(), move |v| s.lock().unwrap().push(v)).unwrap();
        t.fire(1);
        assert_eq!(wait_for(&seen, 1), [1]);
        // Two stores between looks: both values still fire.
        t.fire(3);
        assert_eq!(wait_for(&seen, 3), [1, 2, 3]);
        // A lower value starts a new sequence.
        t.fire(1);
        assert_eq!(wait_for(&seen, 4), [1, 2, 3, 1]);
        assert_eq!(t.value(), 1);
        assert!(t.fire_on_stream(0, 5).is_err(), "a host trigger has no stream");
    }

    #[test]
    fn a_fire_starts_a_transfer() {
        use crate::{Access, Provider, TransferEngine};
        let a = TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().unwrap();
        let b = TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().unwrap();
        let src = a.alloc(4096 * 4, Access::LOCAL).unwrap();
        src.write_at(0, &[9u8; 4096 * 4]).unwrap();
        let dst = b.alloc(4096 * 4, Access::REMOTE_WRITE).unwrap();
        let desc = dst.descriptor().clone();
        let engine = a.clone();
        let landed = b.expect_imm(100, 4).unwrap();
        // "Layer L is ready": write layer L - 1, with its immediate.
        let t = StreamTrigger::on_host(nap(), move |layer| {
            let off = u64::from(layer - 1) * 4096;
            engine.write(&src, off, &desc, off, 4096, Some(100)).expect("submits");
        })
        .unwrap();
        for layer in 1..=4 {
            t.fire(layer);
        }
        landed.wait_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(dst.to_vec(0, 4096 * 4).unwrap(), vec![9u8; 4096 * 4]);
    }
}
