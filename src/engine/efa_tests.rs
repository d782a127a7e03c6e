//! What EFA needs of the engine, run between real engines over libfabric
//! tcp on loopback, with the NICs told to behave as EFA's do (tcp itself
//! needs neither):
//! * the introduction (hello, welcome; see the worker's `Intro`) that
//!   efa-direct needs: requests wait for the welcome and then go, the peer
//!   that took the hello needs none of its own, and a peer that never
//!   answers fails the held requests within the request timeout;
//! * sends from the NIC's staging buffers (see the fabric backend's
//!   `Staging`), so that no user region is registered for sending.

use std::time::Duration;

use super::*;

fn engine(timeout: Duration) -> TransferEngine {
    engine_with(timeout, |o| o.introduce = true)
}

fn engine_with(timeout: Duration, knob: impl Fn(&mut FabricOptions)) -> TransferEngine {
    let builder = TransferEngine::builder()
        .provider(Provider::Tcp)
        .interface("lo")
        .request_timeout(timeout)
        .receive_buffers(8, 4096);
    let mut options = builder.fabric_options(Provider::Tcp);
    knob(&mut options);
    let (kind, nics) = match fabric::open_group(&options, 2) {
        Ok(opened) => opened,
        Err(e) => panic!("libfabric tcp on lo: {e}"),
    };
    builder.start(kind, nics).expect("engine on tcp")
}

#[test]
fn writes_and_reads_go_once_the_peer_has_welcomed_this_engine() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let at_b = b.alloc(1 << 20, Access::REMOTE_READ_WRITE).unwrap();
    let at_a = a.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
    at_a.write_at(0, &data).unwrap();
    let arrived = b.expect_imm(42, 1).unwrap();
    // Several at once, before any welcome: all wait for the same hello.
    let writes: Vec<_> = (0..4u64)
        .map(|i| a.write(&at_a, i << 18, at_b.descriptor(), i << 18, 1 << 18, (i == 3).then_some(42)).unwrap())
        .collect();
    for w in &writes {
        w.wait_timeout(Duration::from_secs(20)).unwrap();
    }
    arrived.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(at_b.to_vec(0, 1 << 20).unwrap(), data);
    let back = a.alloc(4096, Access::LOCAL).unwrap();
    a.read(&back, 0, at_b.descriptor(), 4096, 4096).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(back.to_vec(0, 4096).unwrap(), data[4096..8192]);
    // b took a's hello, so it writes to a without one of its own.
    let got = a.expect_imm(7, 1).unwrap();
    b.write(&at_b, 0, at_a.descriptor(), 0, 4096, Some(7)).unwrap().wait_timeout(Duration::from_secs(20)).unwrap();
    got.wait_timeout(Duration::from_secs(20)).unwrap();
    a.shutdown();
    b.shutdown();
}

#[test]
fn requests_to_a_peer_that_never_answers_the_hello_expire() {
    let a = engine(Duration::from_millis(800));
    let gone = engine(Duration::from_secs(10));
    let region = gone.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let dst = region.descriptor().clone();
    gone.shutdown();
    let src = a.alloc(4096, Access::LOCAL).unwrap();
    let started = std::time::Instant::now();
    let err = a.write(&src, 0, &dst, 0, 4096, None).unwrap().wait_timeout(Duration::from_secs(20)).unwrap_err();
    assert!(matches!(&err, Error::PeerUnreachable(m) if m.contains("introduction")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    a.shutdown();
}

/// More sends than staging buffers, some from a remotely writable region
/// (registered without `FI_SEND`), some from local memory: every message
/// arrives intact, in full, and the buffers come back (later sends go).
#[test]
fn sends_go_from_the_staging_buffers() {
    let staged = |o: &mut FabricOptions| o.stage_sends = true;
    let (a, b) = (engine_with(Duration::from_secs(10), staged), engine_with(Duration::from_secs(10), staged));
    let local = a.alloc(64 * 4096, Access::LOCAL).unwrap();
    let shared = a.alloc(64 * 4096, Access::REMOTE_WRITE).unwrap();
    let mut expected = Vec::new();
    for round in 0..3u32 {
        let mut sends = Vec::new();
        for i in 0..40u32 {
            let region = if i % 2 == 0 { &local } else { &shared };
            let len = 1 + (i * 97 + round * 13) as usize % 4096;
            let offset = u64::from(i) * 4096;
            let payload: Vec<u8> = (0..len).map(|k| (k as u32 ^ i ^ (round << 4)) as u8).collect();
            region.write_at(offset, &payload).unwrap();
            sends.push(a.send(b.address(), region, offset, len as u64).unwrap());
            expected.push(payload);
        }
        for s in &sends {
            s.wait_timeout(Duration::from_secs(20)).unwrap();
        }
    }
    let mut got: Vec<Vec<u8>> = (0..expected.len()).map(|_| b.recv_timeout(Duration::from_secs(20)).unwrap()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    // Longer than a staging buffer: refused before anything is posted.
    assert_eq!(a.max_send_size(), 4096);
    let err = a.send(b.address(), &local, 0, 4097).unwrap_err();
    assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("4096")), "{err}");
    a.shutdown();
    b.shutdown();
}
