//! Tier 2: caller-driven progress (see `engine::progress` in the crate):
//! waiting threads run the engine's polling themselves. These tests check
//! what that must not break: many threads waiting at once, callbacks that
//! submit (or drop the engine) on a driving thread, and requests nobody
//! waits for, which the worker thread must still complete once the
//! drivers have gone. Over libfabric tcp and shm on loopback.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{engine, PROVIDERS, TIMEOUT};
use strait::{Access, Error, PollMode, Provider, TransferEngine};

#[test]
fn many_threads_waiting_at_once_all_get_their_outcomes() {
    for provider in PROVIDERS {
        let writer = engine(provider, 2);
        let target = engine(provider, 1);
        let inbox = target.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
        let dst = inbox.descriptor().clone();
        const THREADS: u32 = 4;
        const EACH: u64 = 200;
        let arrived = target.expect_imm(77, u64::from(THREADS) * EACH).unwrap();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (writer, dst) = (writer.clone(), dst.clone());
                s.spawn(move || {
                    let outbox = writer.alloc(4096, Access::LOCAL).unwrap();
                    outbox.write_at(0, &[t as u8 + 1; 4096]).unwrap();
                    for i in 0..EACH {
                        let at = u64::from(t) * 4096 * 4 + (i % 4) * 4096;
                        writer.write(&outbox, 0, &dst, at, 4096, Some(77)).unwrap().wait_timeout(TIMEOUT).unwrap();
                    }
                });
            }
            // The target's own waiting thread drives the target meanwhile.
            arrived.wait_timeout(TIMEOUT).unwrap();
        });
        for t in 0..THREADS {
            let bytes = inbox.to_vec(u64::from(t) * 4096 * 4, 4 * 4096).unwrap();
            assert!(bytes.iter().all(|&b| b == t as u8 + 1), "{provider:?}: thread {t}'s bytes");
        }
        let extra = target.expect_imm(77, 1).unwrap();
        assert!(matches!(extra.wait_timeout(Duration::from_millis(100)), Err(Error::Timeout(_))), "{provider:?}");
    }
}

#[test]
fn callbacks_on_a_driving_thread_may_submit_but_not_block() {
    for provider in PROVIDERS {
        let writer = engine(provider, 1);
        let target = engine(provider, 1);
        let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
        let dst = inbox.descriptor().clone();
        const CHAIN: u64 = 50;
        let arrived = target.expect_imm(5, CHAIN).unwrap();
        // Each completion submits the next write from its callback, on
        // whichever thread drives then (here, mostly the waiting one).
        let (refused_tx, refused) = mpsc::channel();
        fn next(engine: TransferEngine, dst: strait::MrDesc, left: u64, refused: mpsc::Sender<bool>) {
            let t = engine.write_imm(&dst, 5).unwrap();
            let e = engine.clone();
            t.on_complete(move |r| {
                r.as_ref().unwrap();
                if left == 1 {
                    // Blocking on the engine from a callback is refused,
                    // never a deadlock.
                    let r = e.alloc(4096, Access::LOCAL);
                    let _ = refused.send(matches!(r, Err(Error::WouldDeadlock(_))) || r.is_ok());
                } else {
                    next(e, dst, left - 1, refused);
                }
            });
        }
        next(writer.clone(), dst, CHAIN, refused_tx);
        arrived.wait_timeout(TIMEOUT).unwrap();
        assert!(refused.recv_timeout(TIMEOUT).unwrap(), "{provider:?}: alloc in a callback neither refused nor done");
    }
}

#[test]
fn dropping_the_last_handle_in_a_callback_does_not_hang() {
    for provider in PROVIDERS {
        let target = engine(provider, 1);
        let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
        let writer = engine(provider, 1);
        let t = writer.write_imm(inbox.descriptor(), 9).unwrap();
        let holder = Arc::new(std::sync::Mutex::new(Some(writer)));
        let in_cb = holder.clone();
        let (done_tx, done) = mpsc::channel();
        t.on_complete(move |_| {
            drop(in_cb.lock().unwrap().take());
            let _ = done_tx.send(());
        });
        // The last handle is the one in the holder: drop the local `t`'s
        // engine reference by waiting (this thread drives) and letting the
        // callback drop it.
        t.wait_timeout(TIMEOUT).unwrap();
        done.recv_timeout(TIMEOUT).unwrap();
        assert!(holder.lock().unwrap().is_none());
    }
}

#[test]
fn requests_nobody_waits_for_complete_after_the_drivers_leave() {
    for provider in PROVIDERS {
        let writer = engine(provider, 1);
        let target = engine(provider, 1);
        let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
        let dst = inbox.descriptor().clone();
        // Drive both engines once (the workers stand aside meanwhile).
        let c = target.expect_imm(3, 1).unwrap();
        writer.write_imm(&dst, 3).unwrap().wait_timeout(TIMEOUT).unwrap();
        c.wait_timeout(TIMEOUT).unwrap();
        // Now only poll: the worker threads must take over again.
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let c = target.expect_imm(4, 100).unwrap();
        c.on_reached(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let transfers: Vec<_> = (0..100).map(|_| writer.write_imm(&dst, 4).unwrap()).collect();
        let start = Instant::now();
        while !(transfers.iter().all(|t| t.is_done()) && seen.load(Ordering::SeqCst) == 1) {
            assert!(start.elapsed() < TIMEOUT, "{provider:?}: polled requests never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(transfers.iter().all(|t| t.result().is_some_and(|r| r.is_ok())));
    }
}

#[test]
fn a_busy_engine_waits_and_polls_too() {
    let open = || TransferEngine::builder().provider(Provider::Tcp).interface("lo").poll_mode(PollMode::Busy).build();
    let (writer, target) = (open().unwrap(), open().unwrap());
    let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let c = target.expect_imm(1, 20).unwrap();
    for _ in 0..20 {
        writer.write_imm(inbox.descriptor(), 1).unwrap().wait_timeout(TIMEOUT).unwrap();
    }
    c.wait_timeout(TIMEOUT).unwrap();
}
