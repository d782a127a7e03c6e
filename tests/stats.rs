//! `TransferEngine::stats`: counters exact after known workloads on both
//! sides, errors counted by kind, the latency histogram's count equal to
//! the requests, labels, and the table and Prometheus renderings.

mod common;

use common::{engine, PROVIDERS, TIMEOUT};
use std::time::Duration;

use strait::Access;

#[test]
fn counters_match_a_known_workload_on_both_sides() {
    const N: u64 = 40;
    const S: u64 = 64 << 10;
    const K: u64 = 25;
    for provider in PROVIDERS {
        let a = engine(provider, 1);
        let b = engine(provider, 1);
        let src = a.alloc(S, Access::LOCAL).unwrap();
        let dst = b.alloc(N * S, Access::REMOTE_READ_WRITE).unwrap();
        let arrived = b.expect_imm(9, K).unwrap();
        a.label_peer(b.address(), "target");
        let before_a = a.stats().unwrap();
        let before_b = b.stats().unwrap();
        let ts: Vec<_> =
            (0..N).map(|i| a.write(&src, 0, dst.descriptor(), i * S, S, (i < K).then_some(9)).unwrap()).collect();
        for t in &ts {
            t.wait_timeout(TIMEOUT).unwrap();
        }
        arrived.wait_timeout(TIMEOUT).unwrap();
        let r = a.read(&src, 0, dst.descriptor(), 0, 4096).unwrap();
        r.wait_timeout(TIMEOUT).unwrap();

        let sa = a.stats().unwrap();
        let nic = &sa.nics[0];
        let (w0, r0) = (before_a.nics[0].posted.writes, before_a.nics[0].posted.reads);
        assert_eq!(nic.posted.writes - w0, N, "{provider:?} {nic:?}");
        assert_eq!(nic.posted.reads - r0, 1, "{provider:?}");
        assert_eq!(nic.bytes_posted - before_a.nics[0].bytes_posted, N * S + 4096, "{provider:?}");
        assert_eq!(nic.imms_out - before_a.nics[0].imms_out, K, "{provider:?}");
        assert_eq!(nic.errors.total(), 0);
        let peer = sa.peers.iter().find(|p| p.address == *b.address()).expect("the target");
        assert_eq!(peer.label.as_deref(), Some("target"));
        assert_eq!(peer.requests_ok, N + 1);
        assert_eq!((peer.requests_failed, peer.in_flight, peer.expired), (0, 0, 0));
        assert_eq!(peer.imms_out, K);
        assert_eq!(peer.bytes_posted, N * S + 4096);
        assert_eq!(peer.completed, N + 1, "one piece each: below the smallest shard");
        assert_eq!(sa.latency.write.count(), N);
        assert_eq!(sa.latency.read.count(), 1);
        assert!(sa.latency.write.percentile(0.5).unwrap() <= sa.latency.write.max().unwrap());
        assert_eq!(sa.in_flight, 0);

        let sb = b.stats().unwrap();
        assert_eq!(sb.nics[0].imms_in - before_b.nics[0].imms_in, K, "{provider:?} target");
        // The target timed its one counter, from arming to the K-th arrival
        // (which came after the writes were submitted, so not before them).
        assert_eq!(sb.latency.imm.count() - before_b.latency.imm.count(), 1, "{provider:?}");
        assert!(sb.latency.imm.max().unwrap() > Duration::ZERO);
        // Re-armed and reached again: one more.
        arrived.rearm(2).unwrap();
        for _ in 0..2 {
            a.write_imm(dst.descriptor(), 9).unwrap().wait_timeout(TIMEOUT).unwrap();
        }
        arrived.wait_timeout(TIMEOUT).unwrap();
        assert_eq!(b.stats().unwrap().latency.imm.count() - before_b.latency.imm.count(), 2, "{provider:?}");
        assert!(b.stats().unwrap().table().contains("imm counters: 2"));
        assert_eq!(sb.nics[0].posted.total(), before_b.nics[0].posted.total(), "the target posted nothing");
        // Every receive buffer is posted again once its message was taken:
        // a's 3 sends to b, each taking one of b's buffers for a moment.
        for _ in 0..3 {
            a.send(b.address(), &src, 0, 100).unwrap().wait_timeout(TIMEOUT).unwrap();
            b.recv_timeout(TIMEOUT).unwrap();
        }
        let sb = b.stats().unwrap();
        assert_eq!(sb.nics[0].messages_in - before_b.nics[0].messages_in, 3, "{provider:?}");
        assert_eq!(sb.nics[0].receives_posted, sb.receive_buffers as u64, "{provider:?}");
        assert!(b.stats().unwrap().prometheus("strait").contains("strait_receives_posted{nic=\"0\"} 64"));

        let table = sa.table();
        assert!(table.contains("target") && table.contains("write requests: 40"), "{table}");
        let prom = sa.prometheus("strait");
        assert!(
            prom.contains(&format!("strait_ops_posted_total{{nic=\"0\",kind=\"write\"}} {}", nic.posted.writes)),
            "{prom}"
        );
        assert!(prom.contains("strait_peer_requests_total{peer=\"target\",outcome=\"ok\"} 41"), "{prom}");
        assert!(prom.contains("strait_request_seconds_count{kind=\"write\"} 40"), "{prom}");
        for line in prom.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("strait_") && value.parse::<f64>().is_ok(), "{line}");
        }
    }
}

#[test]
fn failed_requests_are_counted_by_kind() {
    for provider in PROVIDERS {
        let a = engine(provider, 1);
        let b = engine(provider, 1);
        let src = a.alloc(4096, Access::LOCAL).unwrap();
        let dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
        let desc = dst.descriptor().clone();
        a.write(&src, 0, &desc, 0, 4096, None).unwrap().wait_timeout(TIMEOUT).unwrap();
        drop(dst); // revoked: the next write is refused
        let e = a.write(&src, 0, &desc, 0, 4096, None).unwrap().wait_timeout(TIMEOUT).unwrap_err();
        assert!(matches!(e, strait::Error::RemoteAccess(_)), "{provider:?}: {e}");
        let s = a.stats().unwrap();
        let peer = s.peers.iter().find(|p| p.address == *b.address()).unwrap();
        assert_eq!((peer.requests_ok, peer.requests_failed), (1, 1), "{provider:?} {peer:?}");
        assert!(peer.errors.total() >= 1 || provider == strait::Provider::Shm, "{provider:?} {peer:?}");
        assert_eq!(s.latency.write.count(), 2);
    }
}
