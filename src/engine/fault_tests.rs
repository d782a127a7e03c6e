//! The engine against the fault-injecting test double of the backend:
//! completions late, reordered and sometimes failed, posts refused, NICs
//! killed. Whatever happens, every request ends in exactly one outcome, an
//! immediate is delivered exactly when its request succeeded, and it is never
//! posted before the rest of its request has completed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::backend::fault::{FaultNic, Faults};

fn engine(nics: usize, seed: u64, faults: &Arc<Faults>) -> TransferEngine {
    let nics: Vec<FaultNic> =
        (0..nics).map(|i| FaultNic::new(seed.wrapping_add(0x9e37_79b9 * (i as u64 + 1)), faults.clone())).collect();
    // Small pieces, so that every request of more than 4 KiB is split.
    let shard = ShardConfig { min_piece: 4096, max_piece: 16384, align: 4096 };
    EngineBuilder::default().shard_config(shard).start(ProviderKind::Tcp, nics).expect("engine on the test double")
}

fn counted(t: &Transfer) -> Arc<AtomicU32> {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    t.on_complete(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    calls
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_request_ends_once_and_its_immediate_follows_its_data(
        seed in any::<u64>(),
        nics in 1usize..=4,
        fail_per_mille in prop_oneof![Just(0u64), Just(40u64)],
        requests in prop::collection::vec((any::<bool>(), 1u64..=65536, any::<bool>()), 1..40),
    ) {
        let faults = Arc::new(Faults { fail_per_mille, ..Faults::default() });
        let e = engine(nics, seed, &faults);
        let region = e.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
        let dst = region.descriptor().clone();
        let mut handles = Vec::new();
        for (i, &(paged, len, with_imm)) in requests.iter().enumerate() {
            let imm = with_imm.then_some(i as u32 + 1);
            let counter = imm.map(|v| e.expect_imm(v, 1).unwrap());
            let t = if paged {
                let pages: Vec<u32> = (0..(len % 16 + 1) as u32).map(|p| p * 2).collect();
                e.write_paged(&region, &dst, PagedLayout::contiguous(4096), pages.clone(), pages, imm).unwrap()
            } else {
                e.write(&region, 0, &dst, 0, len, imm).unwrap()
            };
            let calls = counted(&t);
            handles.push((t, calls, counter));
        }
        let outcomes: Vec<_> = handles.iter().map(|(t, _, _)| t.wait_timeout(Duration::from_secs(20))).collect();
        for ((_, _, counter), outcome) in handles.iter().zip(&outcomes) {
            prop_assert!(!matches!(outcome, Err(Error::Timeout(_))), "a request never ended");
            if let Some(c) = counter {
                if outcome.is_ok() {
                    prop_assert!(c.wait_timeout(Duration::from_secs(5)).is_ok(), "immediate of a successful request lost");
                } else {
                    prop_assert_eq!(c.seen(), 0, "immediate of a failed request delivered");
                }
            }
        }
        e.shutdown();
        for (_, calls, _) in &handles {
            prop_assert_eq!(calls.load(Ordering::SeqCst), 1, "callback count");
        }
        prop_assert_eq!(faults.violations.load(Ordering::SeqCst), 0, "immediate posted before its data completed");
        if fail_per_mille == 0 {
            prop_assert!(outcomes.iter().all(|o| o.is_ok()));
        }
    }
}

#[test]
fn a_killed_nic_fails_every_later_request_once_and_nothing_hangs() {
    let faults = Arc::new(Faults::default());
    let e = engine(2, 7, &faults);
    let region = e.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let dst = region.descriptor().clone();
    let mut before = Vec::new();
    for i in 0..100 {
        let t = e.write(&region, 0, &dst, 0, 64 << 10, Some(i)).unwrap();
        let calls = counted(&t);
        before.push((t, calls));
    }
    faults.killed.store(true, Ordering::SeqCst);
    let mut after = Vec::new();
    for i in 0..100 {
        let t = e.write(&region, 0, &dst, 0, 64 << 10, Some(1000 + i)).unwrap();
        let calls = counted(&t);
        after.push((t, calls));
    }
    for (t, _) in &before {
        assert!(!matches!(t.wait_timeout(Duration::from_secs(20)), Err(Error::Timeout(_))));
    }
    for (t, _) in &after {
        assert!(matches!(t.wait_timeout(Duration::from_secs(20)), Err(Error::Transport { .. })));
    }
    e.shutdown();
    for (_, calls) in before.iter().chain(&after) {
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
    assert_eq!(faults.violations.load(Ordering::SeqCst), 0);
}

/// KV cancellation on the double, whose writes land (their bytes are
/// copied) only when they complete, late and in random order: once the
/// decoder's cancel outcome is reported, no byte of the request lands in
/// its blocks any more.
#[test]
fn no_kv_byte_lands_after_a_confirmed_cancel() {
    use crate::kv::{KvCache, KvConfig, KvExpect, KvLayout, KvShape, Tp};
    let shape =
        KvShape { layers: 6, blocks: 32, block_tokens: 4, heads: 2, total_heads: 2, head_dim: 16, elem_bytes: 2 };
    let layout = KvLayout::flashinfer_nhd(shape);
    let (mut cancelled, mut some_landed) = (0, 0);
    for seed in 0..24u64 {
        let faults = Arc::new(Faults::default());
        let e = engine(1 + (seed % 2) as usize, seed, &faults);
        let config = KvConfig { heartbeat: Duration::from_millis(50), ..KvConfig::default() };
        let decoder = KvCache::alloc(&e, layout, Tp::SINGLE, config).unwrap();
        let sender = KvCache::alloc(&e, layout, Tp::SINGLE, config).unwrap();
        for t in sender.tensors() {
            t.write_at(0, &vec![0xAB; layout.layer_bytes() as usize]).unwrap();
        }
        let blocks: Vec<u32> = (0..16).map(|i| i * 2).collect();
        let recv = decoder.expect(&KvExpect::push(&[sender.descriptor().clone()], &blocks)).unwrap();
        let send = sender.push(recv.request(), decoder.descriptor(), &blocks).unwrap();
        // At most 5 of the 6 layers: the request cannot complete, so the
        // cancel must end it.
        send.send_layers(0..(seed % 5) as u32 + 1).unwrap();
        recv.cancel();
        let outcome = recv.wait_timeout(Duration::from_secs(20));
        let snapshot = || -> Vec<Vec<u8>> {
            decoder.tensors().iter().map(|t| t.to_vec(0, layout.layer_bytes()).unwrap()).collect()
        };
        let (landed, at_outcome) = (faults.landed.load(Ordering::SeqCst), snapshot());
        if at_outcome.iter().any(|t| t.contains(&0xAB)) {
            some_landed += 1;
        }
        match outcome {
            Err(Error::Cancelled) => cancelled += 1,
            other => panic!("seed {seed}: the cancel ended {other:?}"),
        }
        assert!(matches!(send.wait_timeout(Duration::from_secs(20)), Err(Error::Cancelled)));
        // Let the double release everything it may still hold.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(snapshot(), at_outcome, "seed {seed}: bytes landed after the confirmed cancel");
        // Pings may still complete, but they carry no bytes.
        assert_eq!(faults.landed.load(Ordering::SeqCst), landed, "seed {seed}: a write landed after the cancel");
        assert_eq!(faults.violations.load(Ordering::Relaxed), 0);
    }
    assert_eq!(cancelled, 24);
    assert!(some_landed > 0, "no run had writes land before its cancel: the test exercised nothing");
    eprintln!("{some_landed} of 24 cancels came after some layers had landed");
}

/// efa-direct's rule on the double: a target must know the initiator
/// before its first write or read. With the NICs saying so, the engine
/// holds every request until its hello went through, and none is refused;
/// without (the double enforcing the rule on an engine that does not know
/// it), the first write fails as it would on efa-direct.
#[test]
fn requests_wait_for_the_introduction_where_targets_must_know_the_initiator() {
    for announced in [true, false] {
        let faults = Arc::new(Faults { introduction: announced, require_introduction: true, ..Faults::default() });
        let e = engine(2, 7, &faults);
        let region = e.alloc(1 << 20, Access::REMOTE_READ_WRITE).unwrap();
        let dst = region.descriptor().clone();
        let transfers: Vec<_> = (0..16u64)
            .map(|i| {
                if i % 4 == 3 {
                    e.read(&region, i * 4096, &dst, 0, 4096).unwrap()
                } else {
                    e.write(&region, 0, &dst, i * 65536, 65536, None).unwrap()
                }
            })
            .collect();
        let outcomes: Vec<_> = transfers.iter().map(|t| t.wait_timeout(Duration::from_secs(20))).collect();
        let refused = faults.unknown_peer.load(Ordering::SeqCst);
        if announced {
            assert_eq!(refused, 0, "an operation was posted before the introduction");
            assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
            // Later requests go at once (the peer is known).
            e.write(&region, 0, &dst, 0, 4096, None).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
        } else {
            assert!(refused > 0, "the double did not enforce the rule");
            assert!(outcomes.iter().any(|o| o.is_err()));
        }
        e.shutdown();
    }
}

/// A NIC's message limit (efa-direct: the MTU) is the engine's.
#[test]
fn sends_longer_than_the_transport_takes_are_refused() {
    let faults = Arc::new(Faults { max_message: 8192, ..Faults::default() });
    let e = engine(1, 3, &faults);
    assert_eq!(e.max_send_size(), 8192);
    let region = e.alloc(16384, Access::LOCAL).unwrap();
    let me = e.address().clone();
    let err = e.send(&me, &region, 0, 8193).unwrap_err();
    assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("8192")), "{err}");
    e.send(&me, &region, 0, 8192).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(e.recv_timeout(Duration::from_secs(5)).unwrap().len(), 8192);
    e.shutdown();
}

/// Shutting down with requests in flight and regions alive: the NICs'
/// endpoints close before any receive pool is deregistered (fi_efa: a
/// registration with a posted receive must not be closed), and nothing is
/// posted after.
#[test]
fn endpoints_close_before_the_receive_pools_are_released() {
    let faults = Arc::new(Faults::default());
    let e = engine(3, 11, &faults);
    let region = e.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let dst = region.descriptor().clone();
    let in_flight: Vec<_> = (0..8).map(|i| e.write(&region, 0, &dst, i * 65536, 65536, None).unwrap()).collect();
    e.shutdown();
    for t in &in_flight {
        let _ = t.wait_timeout(Duration::from_secs(20));
    }
    assert_eq!(faults.pools_released.load(Ordering::SeqCst), 3, "one receive pool per NIC");
    assert_eq!(faults.teardown_violations.load(Ordering::SeqCst), 0);
    drop(region);
}

/// GPUDirect: on NICs that reach device memory, a device region is
/// registered with every NIC, its descriptor is not staged, and its
/// requests go to the NICs as host memory's do (marked as not host memory,
/// so verbs never inlines from it), with no stager in the way.
#[test]
fn device_memory_registers_directly_where_the_nics_reach_it() {
    let faults = Arc::new(Faults { device_memory: true, ..Faults::default() });
    let nics: Vec<FaultNic> = (0..2).map(|i| FaultNic::new(7 + i, faults.clone())).collect();
    let e = EngineBuilder::default().host_device_stand_in().start(ProviderKind::Tcp, nics).unwrap();
    let src = e.alloc_device(1 << 16, 0, Access::LOCAL).unwrap();
    let dst = e.alloc(1 << 16, Access::REMOTE_WRITE).unwrap();
    assert_eq!(faults.device_registrations.load(Ordering::SeqCst), 2, "one registration per NIC");
    assert!(!src.descriptor().is_staged());
    let data: Vec<u8> = (0..1u32 << 16).map(|i| (i * 13) as u8).collect();
    src.write_at(0, &data).unwrap();
    let got = e.expect_imm(3, 1).unwrap();
    e.write(&src, 0, dst.descriptor(), 0, 1 << 16, Some(3)).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
    got.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(dst.to_vec(0, 1 << 16).unwrap(), data);
    assert!(faults.device_posts.load(Ordering::SeqCst) > 0, "posts from device memory are marked as such");
    // A direct device region takes every request kind, strided ones too.
    let list = CopyList::new(vec![crate::plan::Strided {
        src_offset: 0,
        dst_offset: 0,
        rows: 4,
        row_len: 64,
        src_stride: 128,
        dst_stride: 128,
    }])
    .unwrap();
    e.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
    drop(src);
    e.shutdown();
}
