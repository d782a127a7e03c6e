//! Helpers shared by the transport tests.
#![allow(dead_code)]

use std::time::Duration;

use strait::{Provider, TransferEngine};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The providers the transport tests run on (both run on any Linux machine
/// with libfabric; no hardware needed).
pub const PROVIDERS: [Provider; 2] = [Provider::Tcp, Provider::Shm];

/// The providers the operation suites run on: tcp and shm always, and
/// verbs when this machine has a usable verbs device (a ConnectX port, or a
/// SoftRoCE `rxe` device). Without one the verbs run is skipped and the
/// reason printed; `STRAIT_REQUIRE_VERBS=1` turns that skip into a failure
/// (for CI on ConnectX machines, so that a broken setup cannot pass as a
/// skip).
pub fn providers() -> Vec<Provider> {
    let mut list = PROVIDERS.to_vec();
    match verbs_available() {
        Ok(()) => list.push(Provider::Verbs),
        Err(reason) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| skipped("verbs runs of the operation suite", &reason));
        }
    }
    list
}

/// Whether an engine opens on verbs here, or why not.
pub fn verbs_available() -> Result<(), String> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| match TransferEngine::builder().provider(Provider::Verbs).build() {
            Ok(_) => Ok(()),
            Err(e) => {
                if std::env::var("STRAIT_REQUIRE_VERBS").is_ok_and(|v| v == "1") {
                    panic!("STRAIT_REQUIRE_VERBS=1 but verbs is unavailable: {e}");
                }
                Err(e.to_string())
            }
        })
        .clone()
}

/// Prints that part of a test was skipped, and why, where `cargo test`
/// shows it: straight to the process's stderr, which the test harness does
/// not capture (it captures only the `print!` family).
pub fn skipped(what: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what} (hardware): {reason}");
}

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
pub mod weights;
