//! The verbs (ConnectX) backend: what holds on every machine (no device is
//! a normal, reported condition; `Auto` falls through; transports do not
//! mix), and, on a machine with a verbs device, connection handling that the
//! shared operation suite in `transport.rs` does not cover. Hardware parts
//! are skipped with the reason printed when there is no device.

mod common;

use std::time::Duration;

use common::{pattern, skipped, verbs_available, TIMEOUT};
use strait::{Access, EngineAddress, Error, Provider, ProviderKind, TransferEngine};

fn verbs_engine() -> TransferEngine {
    TransferEngine::builder().provider(Provider::Verbs).build().expect("verbs engine")
}

#[test]
fn no_device_is_reported_and_auto_falls_through() {
    let report = strait::probe::probe();
    let verbs = report.iter().find(|r| r.kind == ProviderKind::Verbs).expect("probe lists verbs");
    match verbs_available() {
        Err(reason) => {
            skipped("verbs engine", &reason);
            let err = TransferEngine::builder().provider(Provider::Verbs).build().unwrap_err();
            assert!(matches!(&err, Error::BackendUnavailable { backend: "verbs", .. }), "{err:?}");
            assert!(err.to_string().contains("verbs"), "{err}");
            let probed = verbs.domains.as_ref().expect_err("probe agrees that verbs is unavailable");
            assert!(!probed.is_empty());
            // Auto takes the next provider; on this kind of machine (no EFA)
            // that is tcp.
            let efa = report.iter().find(|r| r.kind == ProviderKind::Efa).unwrap();
            if efa.domains.is_err() {
                let auto = TransferEngine::builder().interface("lo").build().expect("auto opens tcp");
                assert_eq!(auto.address().provider(), ProviderKind::Tcp);
            }
        }
        Ok(()) => {
            assert!(verbs.domains.is_ok(), "{:?}", verbs.domains);
            let efa = report.iter().find(|r| r.kind == ProviderKind::Efa).unwrap();
            if efa.domains.is_err() {
                let auto = TransferEngine::builder().build().expect("auto opens verbs");
                assert_eq!(auto.address().provider(), ProviderKind::Verbs);
            }
        }
    }
}

/// An engine address as a verbs engine would encode it (one NIC).
fn verbs_address() -> EngineAddress {
    let mut nic = vec![b'V'];
    nic.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]); // GID
    nic.extend_from_slice(&7u16.to_le_bytes()); // LID
    nic.extend_from_slice(&0x42u32.to_le_bytes()); // UD QPN
    nic.extend_from_slice(&9u32.to_le_bytes()); // nonce
    nic.extend_from_slice(&[5, 0, 0, 1]); // MTU 4096, InfiniBand, GID index 0, port 1
    let mut bytes = b"STA\x01\x04\x01".to_vec();
    bytes.push(nic.len() as u8);
    bytes.extend_from_slice(&nic);
    EngineAddress::from_bytes(&bytes).expect("a well-formed verbs address")
}

#[test]
fn a_verbs_peer_is_refused_by_a_libfabric_engine() {
    let tcp = common::engine(Provider::Tcp, 1);
    let peer = verbs_address();
    assert_eq!(peer.provider(), ProviderKind::Verbs);
    let src = tcp.alloc(64, Access::LOCAL).unwrap();
    let err = tcp.send(&peer, &src, 0, 64).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("peer runs on verbs but this engine on tcp"), "{text}");
    assert!(text.contains("does not mix transports"), "{text}");
}

#[test]
fn queue_pair_error_is_contained_and_the_connection_rebuilt() {
    if let Err(reason) = verbs_available() {
        return skipped("verbs queue-pair recovery", &reason);
    }
    let (a, b, c) = (verbs_engine(), verbs_engine(), verbs_engine());
    let src = a.alloc(1 << 20, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(1 << 20, 3)).unwrap();
    let good = b.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let other = c.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let revoked = {
        let region = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
        region.descriptor().clone()
    };
    a.write(&src, 0, good.descriptor(), 0, 4096, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    let err = a.write(&src, 0, &revoked, 0, 4096, None).unwrap().wait_timeout(TIMEOUT).unwrap_err();
    assert!(matches!(err, Error::RemoteAccess(_)), "{err:?}");
    // Another peer never noticed; the failed peer works again at once.
    a.write(&src, 0, other.descriptor(), 0, 1 << 20, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    let arrived = b.expect_imm(5, 1).unwrap();
    a.write(&src, 0, good.descriptor(), 0, 1 << 20, Some(5)).unwrap().wait_timeout(TIMEOUT).unwrap();
    arrived.wait_timeout(TIMEOUT).unwrap();
    assert!(good.to_vec(0, 1 << 20).unwrap() == pattern(1 << 20, 3));
    assert!(other.to_vec(0, 1 << 20).unwrap() == pattern(1 << 20, 3));
}

#[test]
fn both_sides_connecting_at_once() {
    if let Err(reason) = verbs_available() {
        return skipped("verbs simultaneous connect", &reason);
    }
    for _ in 0..5 {
        let (a, b) = (verbs_engine(), verbs_engine());
        let (ra, rb) = (a.alloc(4096, Access::REMOTE_WRITE).unwrap(), b.alloc(4096, Access::REMOTE_WRITE).unwrap());
        let (at_a, at_b) = (a.expect_imm(1, 1).unwrap(), b.expect_imm(2, 1).unwrap());
        let to_b = a.write_imm(rb.descriptor(), 2).unwrap();
        let to_a = b.write_imm(ra.descriptor(), 1).unwrap();
        to_b.wait_timeout(TIMEOUT).unwrap();
        to_a.wait_timeout(TIMEOUT).unwrap();
        at_a.wait_timeout(TIMEOUT).unwrap();
        at_b.wait_timeout(TIMEOUT).unwrap();
    }
}

#[test]
fn unanswered_handshake_fails_within_the_connect_timeout() {
    if let Err(reason) = verbs_available() {
        return skipped("verbs connect timeout", &reason);
    }
    let mut config = strait::VerbsConfig::default();
    config.connect_timeout = Duration::from_millis(500);
    let a = TransferEngine::builder().provider(Provider::Verbs).verbs(config).build().unwrap();
    let gone = {
        let b = verbs_engine();
        let region = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
        region.descriptor().clone()
    };
    let started = std::time::Instant::now();
    let err = a.write_imm(&gone, 1).unwrap().wait_timeout(TIMEOUT).unwrap_err();
    assert!(matches!(err, Error::PeerUnreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
