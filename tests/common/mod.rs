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

/// A child process of a test whose stdout is read line by line and whose
/// stdin takes commands. Dropping it closes stdin, kills and reaps it.
pub struct LineChild {
    pub child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl LineChild {
    /// Spawns `cmd` with piped stdin and stdout.
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        let mut child = cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        LineChild { child, out }
    }

    /// The rest of the next line containing `prefix` (other lines are
    /// skipped); panics if the child exits first.
    pub fn line(&mut self, prefix: &str) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        loop {
            line.clear();
            self.out.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "a child process exited early");
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_string();
            }
        }
    }

    /// The rests of every line containing `prefix` until one containing
    /// `end`.
    pub fn lines_until(&mut self, prefix: &str, end: &str) -> Vec<String> {
        use std::io::BufRead;
        let mut got = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            self.out.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "a child process exited early");
            if line.contains(end) {
                return got;
            }
            if let Some(at) = line.find(prefix) {
                got.push(line[at + prefix.len()..].trim().to_string());
            }
        }
    }

    /// Writes `text` and a newline to its stdin.
    pub fn say(&mut self, text: &str) {
        use std::io::Write;
        writeln!(self.child.stdin.as_mut().unwrap(), "{text}").unwrap();
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
