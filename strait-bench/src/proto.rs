//! The side channel between `serve` and `connect`: one TCP connection
//! carrying JSON messages, one per line. It carries addresses, descriptors
//! and the start/finish of each workload; the measured traffic goes through
//! the engine (or the raw endpoints, or the TCP baseline's own sockets).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes.
pub const PROTOCOL: u32 = 3;

/// The raw baseline's endpoints and target buffer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RawEnds {
    /// `EngineAddress` of the raw group, hex.
    pub address: String,
    /// `MrDesc` of its buffer, hex.
    pub desc: String,
}

/// Which implementation a workload runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// The engine.
    Strait,
    /// Plain libfabric.
    Raw,
}

/// Ping-pong flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Echo {
    /// Zero-length write with an immediate, answered the same way.
    Imm,
    /// Send of `size` bytes, answered with a send of the same size.
    Send,
}

/// Every message, in both directions.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// Client -> server, first: who the client is and what it needs.
    Hello {
        protocol: u32,
        /// Client engine address, hex.
        engine: String,
        /// Client region (writable by the server, for answers), hex.
        desc: String,
        /// Bytes the server's target region must have.
        region_len: u64,
        /// The client's raw endpoints, when it runs the raw baseline.
        raw: Option<RawEnds>,
    },
    /// Server -> client: its engine, region and raw endpoints.
    Welcome { engine: String, desc: String, raw: Option<RawEnds>, nics: usize, provider: String },
    /// Client -> server: `count` requests with immediate `tag` were sent;
    /// answer `Counted` once they have all arrived.
    Finished { driver: Driver, tag: u32, count: u64 },
    /// Server -> client.
    Counted { seen: u64 },
    /// Client -> server: answer `iters` pings, then say `Echoed`.
    Echo { driver: Driver, kind: Echo, size: u64, iters: u64 },
    /// Server -> client.
    Echoed,
    /// Client -> server: listen for `streams` kernel TCP connections.
    TcpListen { streams: usize },
    /// Server -> client: the port to connect the streams to.
    TcpPort { port: u16 },
    /// Server -> client: bytes received on all streams, once all closed.
    TcpCount { bytes: u64 },
    /// Client -> server: build the decode ranks' KV caches for `spec` (as
    /// setup number `setup`: 0, then 1 for the same-TP baseline); the
    /// prefill ranks' cache descriptors (hex).
    KvSetup { setup: usize, spec: crate::kv::KvSpec, senders: Vec<String> },
    /// Server -> client: the decode ranks' cache descriptors (hex).
    KvReady { decoders: Vec<String> },
    /// Client -> server: expect one request on every decode rank of setup
    /// `setup`.
    KvExpect { setup: usize },
    /// Server -> client: the requests (hex), one per decode rank.
    KvRequests { requests: Vec<String> },
    /// Client -> server: wait for setup `setup`'s requests' outcomes.
    KvWait { setup: usize },
    /// Server -> client: every decode rank's outcome.
    KvDone { error: Option<String> },
    /// Client -> server: the results, for the server to print.
    Report { report: Box<crate::report::Report> },
    /// Client -> server: done.
    Bye,
    /// Either way: something went wrong.
    Error { message: String },
}

/// One side channel connection.
pub struct Channel {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: String,
}

impl Channel {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Channel { writer: stream.try_clone()?, reader: BufReader::new(stream), line: String::new() })
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Msg) -> Result<(), String> {
        let mut bytes = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|e| format!("side channel: {e}"))
    }

    /// Receives one message (blocking). A peer's `Error` message becomes an
    /// error here.
    pub fn recv(&mut self) -> Result<Msg, String> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).map_err(|e| format!("side channel: {e}"))?;
        if n == 0 {
            return Err("side channel closed by the peer".into());
        }
        match serde_json::from_str(&self.line).map_err(|e| format!("side channel: bad message: {e}"))? {
            Msg::Error { message } => Err(format!("peer: {message}")),
            msg => Ok(msg),
        }
    }

    /// True when a message (or the end of the stream) can be read without
    /// blocking for more than `timeout`.
    pub fn readable(&mut self, timeout: Duration) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut fd = libc::pollfd { fd: self.reader.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) };
        rc > 0
    }

    /// Receives a message of the expected kind.
    pub fn expect<T>(&mut self, what: &str, pick: impl FnOnce(Msg) -> Option<T>) -> Result<T, String> {
        let msg = self.recv()?;
        let shown = format!("{msg:?}");
        pick(msg).ok_or_else(|| format!("side channel: expected {what}, got {}", truncate(&shown)))
    }
}

fn truncate(s: &str) -> &str {
    &s[..s.len().min(200)]
}
