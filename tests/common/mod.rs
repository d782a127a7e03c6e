//! Helpers shared by the transport tests.
#![allow(dead_code)]

use std::time::Duration;

use strait::{Provider, TransferEngine};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The providers the transport tests run on (both run on any Linux machine
/// with libfabric; no hardware needed).
pub const PROVIDERS: [Provider; 2] = [Provider::Tcp, Provider::Shm];

/// An engine on loopback, with the adaptive (sleeping) poll mode so that many
/// engines share a 2-core machine.
pub fn engine(provider: Provider, nics: usize) -> TransferEngine {
    TransferEngine::builder()
        .provider(provider)
        .interface("lo")
        .nics(nics)
        .build()
        .unwrap_or_else(|e| panic!("opening a {provider:?} engine with {nics} NICs: {e}"))
}

/// A deterministic byte pattern that differs per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
