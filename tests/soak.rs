//! Soak: three million small writes, each with an immediate, between two
//! engines of 4 NICs over libfabric tcp on loopback. Every write succeeds
//! and the target counts exactly as many immediates.
//!
//! Memory: resident memory must stay flat over the last million writes.
//! The first two million are the warm-up: libfabric 1.17's `tcp;ofi_rxm`
//! grows by about 90 bytes per write with an immediate until, after about
//! 1.2 million writes here, it levels off (about 90 MiB above its size at
//! the start, then flat through three million; valgrind massif places the
//! growth inside libfabric). The engine's own memory is also checked flat
//! on the null backend over one million requests. `STRAIT_SOAK_WRITES`
//! changes the count (the last third is then the measured part).

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use strait::{Access, Provider};

/// Resident memory is per process: the two tests run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

#[test]
fn millions_of_writes_with_immediates_across_four_nics_in_flat_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = std::env::var("STRAIT_SOAK_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000_000);
    let warm_up = total - total / 3;
    let (sender, target) = (common::engine(Provider::Tcp, 4), common::engine(Provider::Tcp, 4));
    let src = sender.alloc(1 << 20, Access::LOCAL).unwrap();
    src.write_at(0, &common::pattern(1 << 20, 9)).unwrap();
    let inbox = target.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let dst = inbox.descriptor().clone();
    let counter = target.expect_imm(5, total).unwrap();

    const WINDOW: usize = 512;
    const SIZE: u64 = 64;
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    let mut rss_after_warm_up = 0;
    let mut samples = Vec::new();
    let start = Instant::now();
    for i in 0..total {
        if in_flight.len() == WINDOW {
            let t: strait::Transfer = in_flight.pop_front().unwrap();
            t.wait_timeout(common::TIMEOUT).unwrap_or_else(|e| panic!("write {}: {e}", i - WINDOW as u64));
        }
        let offset = (i * SIZE) % (1 << 20);
        in_flight.push_back(sender.write(&src, offset, &dst, offset, SIZE, Some(5)).unwrap());
        if i + 1 == warm_up {
            rss_after_warm_up = resident_bytes();
        }
        if (i + 1) % (total / 10) == 0 {
            samples.push(resident_bytes() >> 20);
        }
    }
    for t in in_flight.drain(..) {
        t.wait_timeout(common::TIMEOUT).unwrap();
    }
    counter.wait_timeout(Duration::from_secs(60)).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(counter.seen(), total);
    // Exactly: nothing beyond the count arrives either.
    assert!(target.expect_imm(5, 1).unwrap().wait_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(inbox.to_vec(0, 1 << 20).unwrap(), src.to_vec(0, 1 << 20).unwrap());
    let rss_end = resident_bytes();
    eprintln!("soak: RSS MiB at each tenth: {samples:?}");
    let growth = rss_end.saturating_sub(rss_after_warm_up);
    eprintln!(
        "soak: {total} writes of {SIZE} B with immediates over 4+4 tcp NICs in {elapsed:.2?} ({:.0} writes/s); \
         RSS {} MiB after warm-up, {} MiB at the end",
        total as f64 / elapsed.as_secs_f64(),
        rss_after_warm_up >> 20,
        rss_end >> 20
    );
    // Flat: under 16 bytes per write over the measured part (16 MiB per
    // million), against about 90 before libfabric levels off.
    let per_write = growth / (total - warm_up);
    assert!(per_write < 16, "resident memory grew by {} MiB ({per_write} B per write)", growth >> 20);
}

/// On the null backend, so only with `--features test-backend` (the test
/// command, `scripts/test.sh`, builds with `--all-features`).
#[cfg(feature = "test-backend")]
#[test]
fn the_engine_itself_keeps_memory_flat_over_a_million_requests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = std::env::var("STRAIT_SOAK_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let open = || strait::TransferEngine::builder().nics(4).build_null_backend().unwrap();
    let (sender, target) = (open(), open());
    let src = sender.alloc(1 << 20, Access::LOCAL).unwrap();
    let inbox = target.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let dst = inbox.descriptor().clone();
    let mut in_flight = VecDeque::with_capacity(512);
    let mut before = 0;
    for i in 0..total {
        if in_flight.len() == 512 {
            let t: strait::Transfer = in_flight.pop_front().unwrap();
            t.wait_timeout(common::TIMEOUT).unwrap();
        }
        in_flight.push_back(sender.write(&src, 0, &dst, (i * 64) % (1 << 20), 64, Some(5)).unwrap());
        if i + 1 == total / 10 {
            before = resident_bytes();
        }
    }
    for t in in_flight.drain(..) {
        t.wait_timeout(common::TIMEOUT).unwrap();
    }
    let growth = resident_bytes().saturating_sub(before);
    eprintln!("null backend: {total} requests, resident memory grew by {} KiB after the warm-up", growth >> 10);
    assert!(growth < 4 << 20, "the engine's memory grew by {} MiB", growth >> 20);
}
