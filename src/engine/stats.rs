//! What an engine has done and has in flight: [`TransferEngine::stats`].
//!
//! The worker keeps the counters as plain integers it alone writes (no
//! atomics, no locks, no allocation when they change); a snapshot is a
//! command to the worker, which copies them out. Leave it on.
//!
//! [`TransferEngine::stats`]: crate::TransferEngine::stats

use std::fmt::Write as _;
use std::time::Duration;

use crate::error::Error;
use crate::EngineAddress;

/// Kinds of errors, as counted.
pub const ERROR_KINDS: [&str; 6] = ["transport", "peer_unreachable", "remote_access", "timeout", "cancelled", "other"];

/// The [`ERROR_KINDS`] index of an error.
pub(crate) fn error_kind(e: &Error) -> usize {
    match e {
        Error::Fabric { .. } | Error::Verbs { .. } | Error::Transport { .. } => 0,
        Error::PeerUnreachable(_) => 1,
        Error::RemoteAccess(_) => 2,
        Error::Timeout(_) => 3,
        Error::Cancelled | Error::Shutdown => 4,
        _ => 5,
    }
}

/// Operations by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// RDMA writes (zero-length immediate-only writes included).
    pub writes: u64,
    /// RDMA reads.
    pub reads: u64,
    /// Two-sided sends (the engine's own control messages included).
    pub sends: u64,
}

impl OpCounts {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.writes + self.reads + self.sends
    }
}

/// Errors by kind ([`ERROR_KINDS`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts(pub [u64; ERROR_KINDS.len()]);

impl ErrorCounts {
    /// Errors of `kind` (one of [`ERROR_KINDS`]); 0 for an unknown name.
    pub fn get(&self, kind: &str) -> u64 {
        ERROR_KINDS.iter().position(|k| *k == kind).map_or(0, |i| self.0[i])
    }

    /// All of them.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// One NIC of the group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Operations posted.
    pub posted: OpCounts,
    /// Bytes posted (writes, reads and sends).
    pub bytes_posted: u64,
    /// Posts the NIC refused for now (queue full, connection being set up):
    /// retried later.
    pub busy: u64,
    /// Operations that completed, successfully or not.
    pub completed: u64,
    /// Completions that were errors.
    pub errors: ErrorCounts,
    /// Immediates written with a write.
    pub imms_out: u64,
    /// Immediates that arrived here.
    pub imms_in: u64,
    /// Two-sided messages that arrived here (the engine's own included).
    pub messages_in: u64,
    /// Receive buffers posted now (a gauge; at most
    /// [`EngineStats::receive_buffers`]). Each arriving message (and, where
    /// the transport needs buffers for them, each immediate) takes one until
    /// the worker posts it again; one that could not be posted again
    /// (logged as an error) leaves it lower for good.
    pub receives_posted: u64,
}

/// One peer engine (by address, with the label given by
/// [`TransferEngine::label_peer`](crate::TransferEngine::label_peer)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer.
    pub address: EngineAddress,
    /// The user's name for it.
    pub label: Option<String>,
    /// Operations posted to it (counted when their request ends, like the
    /// bytes and immediates: the per-operation path touches only the NIC's
    /// counters).
    pub posted: OpCounts,
    /// Bytes posted to it.
    pub bytes_posted: u64,
    /// Immediates written to it.
    pub imms_out: u64,
    /// Operations to it that completed, successfully or not.
    pub completed: u64,
    /// Completions that were errors.
    pub errors: ErrorCounts,
    /// Requests to it that succeeded.
    pub requests_ok: u64,
    /// Requests to it that failed.
    pub requests_failed: u64,
    /// Requests to it in flight now.
    pub in_flight: u64,
    /// How long the oldest of them has been in flight.
    pub oldest_in_flight: Option<Duration>,
    /// Requests to it that expired (no progress within the request
    /// timeout).
    pub expired: u64,
    /// Times its paths were reset after an expiry (shm).
    pub resets: u64,
}

/// Request completion times, in log buckets (eight per power of two, from
/// 1 ns): a relative error of at most 1/8 on any percentile.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    buckets: Box<[u64; BUCKETS]>,
    count: u64,
    sum_ns: u64,
    max_ns: u64,
}

const SUB: u32 = 3;
const BUCKETS: usize = 64 << SUB;

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: Box::new([0; BUCKETS]), count: 0, sum_ns: 0, max_ns: 0 }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("p50", &self.percentile(0.5))
            .field("p99", &self.percentile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

fn bucket(ns: u64) -> usize {
    let ns = ns.max(1);
    let octave = 63 - ns.leading_zeros();
    let sub = if octave >= SUB {
        (ns >> (octave - SUB)) & ((1 << SUB) - 1)
    } else {
        (ns << (SUB - octave)) & ((1 << SUB) - 1)
    };
    ((octave << SUB) as u64 + sub) as usize
}

/// The lowest value of bucket `i`.
fn bucket_floor(i: usize) -> u64 {
    let (octave, sub) = ((i >> SUB) as u32, (i & ((1 << SUB) - 1)) as u64);
    if octave >= SUB {
        (1u64 << octave) | (sub << (octave - SUB))
    } else {
        (1u64 << octave) | (sub >> (SUB - octave))
    }
}

impl Histogram {
    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)] += 1;
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.sum_ns / self.count))
    }

    /// The largest.
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// The value below which a fraction `q` (0 to 1) of them lie (the
    /// upper end of its bucket, at most the largest value).
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = bucket_floor(i + 1).saturating_sub(1).max(bucket_floor(i));
                return Some(Duration::from_nanos(upper.min(self.max_ns)));
            }
        }
        self.max()
    }

    /// `(upper bound in ns, count)` of every non-empty bucket, in order.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (bucket_floor(i + 1).saturating_sub(1), n))
            .collect()
    }
}

/// Completion times of requests, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Writes (single, paged, strided, immediate-only).
    pub write: Histogram,
    /// Reads.
    pub read: Histogram,
    /// Sends.
    pub send: Histogram,
    /// Immediate counters at this engine (the target): from arming
    /// (`expect_imm`, `rearm`, an `ImmSlot` counter) to the arrival that
    /// reached the count. A counter already reached when armed (its
    /// immediates had arrived first) is not timed.
    pub imm: Histogram,
}

impl Latency {
    /// `(kind, histogram)` for each kind: `write`, `read`, `send`, `imm`.
    pub fn kinds(&self) -> [(&'static str, &Histogram); 4] {
        [("write", &self.write), ("read", &self.read), ("send", &self.send), ("imm", &self.imm)]
    }
}

/// A snapshot of an engine ([`TransferEngine::stats`](crate::TransferEngine::stats)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Per NIC of the group, in order.
    pub nics: Vec<NicStats>,
    /// Per peer this engine has talked to, in the order it first did.
    pub peers: Vec<PeerStats>,
    /// Requests in flight.
    pub in_flight: u64,
    /// How long the oldest of them has been in flight.
    pub oldest_in_flight: Option<Duration>,
    /// Completion times of the requests that ended (successfully or not):
    /// from the worker taking them to their outcome.
    pub latency: Latency,
    /// Receive buffers posted (for two-sided messages) per NIC.
    pub receive_buffers: usize,
    /// Packed transfers (see `EngineBuilder::packing`).
    pub packed: PackedStats,
}

/// Packed transfers of short runs (see `EngineBuilder::packing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedStats {
    /// This engine's requests that went packed.
    pub requests: u64,
    /// Chunks of them committed to peers (each one write of up to a
    /// packer slot, and a copy at the peer).
    pub chunks: u64,
    /// Chunks this engine copied into its regions for peers.
    pub served: u64,
}

impl EngineStats {
    /// The snapshot in the Prometheus text format (version 0.0.4), every
    /// metric prefixed with `prefix` (e.g. `strait`). Metrics:
    /// `{p}_ops_posted_total{nic,kind}`, `{p}_bytes_posted_total{nic}`,
    /// `{p}_ops_completed_total{nic}`, `{p}_errors_total{nic,kind}`,
    /// `{p}_imms_total{nic,direction}`, `{p}_messages_in_total{nic}`,
    /// `{p}_posts_busy_total{nic}`; per peer (`peer` = its label, else its
    /// address): `{p}_peer_bytes_posted_total`,
    /// `{p}_peer_requests_total{outcome}`, `{p}_peer_in_flight`,
    /// `{p}_peer_oldest_in_flight_seconds`, `{p}_peer_expired_total`,
    /// `{p}_peer_errors_total{kind}`; `{p}_in_flight`,
    /// `{p}_packed_requests_total`, `{p}_packed_chunks_total{role}`
    /// (`asker`: committed to peers, `owner`: served for them), and
    /// `{p}_request_seconds{kind}` (a summary: quantiles 0.5, 0.9, 0.99,
    /// sum and count).
    pub fn prometheus(&self, prefix: &str) -> String {
        let mut s = String::new();
        let p = prefix;
        let help = |s: &mut String, name: &str, kind: &str, text: &str| {
            let _ = writeln!(s, "# HELP {p}_{name} {text}\n# TYPE {p}_{name} {kind}");
        };
        help(
            &mut s,
            "packed_requests_total",
            "counter",
            "Requests moved packed (short runs gathered, copied in by the target).",
        );
        let _ = writeln!(s, "{p}_packed_requests_total {}", self.packed.requests);
        help(
            &mut s,
            "packed_chunks_total",
            "counter",
            "Packed chunks, committed to peers (asker) or served for them (owner).",
        );
        let _ = writeln!(s, "{p}_packed_chunks_total{{role=\"asker\"}} {}", self.packed.chunks);
        let _ = writeln!(s, "{p}_packed_chunks_total{{role=\"owner\"}} {}", self.packed.served);
        help(&mut s, "ops_posted_total", "counter", "Operations posted, by NIC and kind.");
        for (i, n) in self.nics.iter().enumerate() {
            for (kind, v) in [("write", n.posted.writes), ("read", n.posted.reads), ("send", n.posted.sends)] {
                let _ = writeln!(s, "{p}_ops_posted_total{{nic=\"{i}\",kind=\"{kind}\"}} {v}");
            }
        }
        type Field = fn(&NicStats) -> u64;
        let per_nic: [(&str, &str, Field); 4] = [
            ("bytes_posted_total", "Bytes posted, by NIC.", |n| n.bytes_posted),
            ("ops_completed_total", "Operations completed (ok or not), by NIC.", |n| n.completed),
            ("messages_in_total", "Two-sided messages received, by NIC.", |n| n.messages_in),
            ("posts_busy_total", "Posts refused for now (retried), by NIC.", |n| n.busy),
        ];
        for (name, text, get) in per_nic {
            help(&mut s, name, "counter", text);
            for (i, n) in self.nics.iter().enumerate() {
                let _ = writeln!(s, "{p}_{name}{{nic=\"{i}\"}} {}", get(n));
            }
        }
        help(&mut s, "receives_posted", "gauge", "Receive buffers posted now, by NIC.");
        for (i, n) in self.nics.iter().enumerate() {
            let _ = writeln!(s, "{p}_receives_posted{{nic=\"{i}\"}} {}", n.receives_posted);
        }
        help(&mut s, "errors_total", "counter", "Failed operations, by NIC and kind.");
        for (i, n) in self.nics.iter().enumerate() {
            for (k, kind) in ERROR_KINDS.iter().enumerate() {
                let _ = writeln!(s, "{p}_errors_total{{nic=\"{i}\",kind=\"{kind}\"}} {}", n.errors.0[k]);
            }
        }
        help(&mut s, "imms_total", "counter", "Immediates written (out) and received (in), by NIC.");
        for (i, n) in self.nics.iter().enumerate() {
            let _ = writeln!(s, "{p}_imms_total{{nic=\"{i}\",direction=\"out\"}} {}", n.imms_out);
            let _ = writeln!(s, "{p}_imms_total{{nic=\"{i}\",direction=\"in\"}} {}", n.imms_in);
        }
        let name_of = |peer: &PeerStats| peer.label.clone().unwrap_or_else(|| peer.address.to_string());
        help(&mut s, "peer_bytes_posted_total", "counter", "Bytes posted to each peer.");
        for peer in &self.peers {
            let _ = writeln!(s, "{p}_peer_bytes_posted_total{{peer=\"{}\"}} {}", name_of(peer), peer.bytes_posted);
        }
        help(&mut s, "peer_requests_total", "counter", "Requests to each peer that ended, by outcome.");
        for peer in &self.peers {
            let n = name_of(peer);
            let _ = writeln!(s, "{p}_peer_requests_total{{peer=\"{n}\",outcome=\"ok\"}} {}", peer.requests_ok);
            let _ = writeln!(s, "{p}_peer_requests_total{{peer=\"{n}\",outcome=\"failed\"}} {}", peer.requests_failed);
        }
        help(&mut s, "peer_errors_total", "counter", "Failed operations to each peer, by kind.");
        for peer in &self.peers {
            for (k, kind) in ERROR_KINDS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{p}_peer_errors_total{{peer=\"{}\",kind=\"{kind}\"}} {}",
                    name_of(peer),
                    peer.errors.0[k]
                );
            }
        }
        help(&mut s, "peer_expired_total", "counter", "Requests to each peer that expired.");
        for peer in &self.peers {
            let _ = writeln!(s, "{p}_peer_expired_total{{peer=\"{}\"}} {}", name_of(peer), peer.expired);
        }
        help(&mut s, "peer_in_flight", "gauge", "Requests in flight to each peer.");
        for peer in &self.peers {
            let _ = writeln!(s, "{p}_peer_in_flight{{peer=\"{}\"}} {}", name_of(peer), peer.in_flight);
        }
        help(&mut s, "peer_oldest_in_flight_seconds", "gauge", "Age of the oldest request in flight to each peer.");
        for peer in &self.peers {
            let age = peer.oldest_in_flight.map_or(0.0, |d| d.as_secs_f64());
            let _ = writeln!(s, "{p}_peer_oldest_in_flight_seconds{{peer=\"{}\"}} {age}", name_of(peer));
        }
        help(&mut s, "in_flight", "gauge", "Requests in flight.");
        let _ = writeln!(s, "{p}_in_flight {}", self.in_flight);
        help(
            &mut s,
            "request_seconds",
            "summary",
            "Request completion time, by kind; kind imm: immediate counters here, from arming to the count reached.",
        );
        for (kind, h) in self.latency.kinds() {
            for q in [0.5, 0.9, 0.99] {
                let v = h.percentile(q).map_or(0.0, |d| d.as_secs_f64());
                let _ = writeln!(s, "{p}_request_seconds{{kind=\"{kind}\",quantile=\"{q}\"}} {v}");
            }
            let _ = writeln!(s, "{p}_request_seconds_sum{{kind=\"{kind}\"}} {}", h.sum_ns as f64 / 1e9);
            let _ = writeln!(s, "{p}_request_seconds_count{{kind=\"{kind}\"}} {}", h.count);
        }
        s
    }

    /// A text table: one line per NIC and per peer, and the latency
    /// percentiles.
    pub fn table(&self) -> String {
        let us = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1e6));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<6} {:>9} {:>9} {:>8} {:>12} {:>10} {:>7} {:>8} {:>8} {:>6}",
            "nic", "writes", "reads", "sends", "bytes", "completed", "errors", "imm out", "imm in", "busy"
        );
        for (i, n) in self.nics.iter().enumerate() {
            let _ = writeln!(
                s,
                "{i:<6} {:>9} {:>9} {:>8} {:>12} {:>10} {:>7} {:>8} {:>8} {:>6}",
                n.posted.writes,
                n.posted.reads,
                n.posted.sends,
                n.bytes_posted,
                n.completed,
                n.errors.total(),
                n.imms_out,
                n.imms_in,
                n.busy
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>9} {:>12} {:>9} {:>7} {:>7} {:>9} {:>10} {:>7}",
            "peer", "ops", "bytes", "requests", "failed", "errors", "in flight", "oldest us", "expired"
        );
        for p in &self.peers {
            let name = p.label.clone().unwrap_or_else(|| {
                let a = p.address.to_string();
                if a.len() > 22 {
                    format!("{}..", &a[..20])
                } else {
                    a
                }
            });
            let _ = writeln!(
                s,
                "{name:<24} {:>9} {:>12} {:>9} {:>7} {:>7} {:>9} {:>10} {:>7}",
                p.posted.total(),
                p.bytes_posted,
                p.requests_ok + p.requests_failed,
                p.requests_failed,
                p.errors.total(),
                p.in_flight,
                us(p.oldest_in_flight),
                p.expired
            );
        }
        let pk = &self.packed;
        if pk.requests + pk.served > 0 {
            let _ = writeln!(s, "packed: {} requests, {} chunks sent, {} served", pk.requests, pk.chunks, pk.served);
        }
        for (kind, h) in self.latency.kinds() {
            if h.count() > 0 {
                let what = if kind == "imm" { "counters" } else { "requests" };
                let _ = writeln!(
                    s,
                    "{kind} {what}: {} | us p50 {} p90 {} p99 {} max {}",
                    h.count(),
                    us(h.percentile(0.5)),
                    us(h.percentile(0.9)),
                    us(h.percentile(0.99)),
                    us(h.max())
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        for ns in [1u64, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1000, 1023, 1024, 1025, 1 << 40] {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            last = b;
            assert!(
                bucket_floor(b) <= ns && ns < bucket_floor(b + 1).max(bucket_floor(b) + 1),
                "{ns}: {} {}",
                bucket_floor(b),
                bucket_floor(b + 1)
            );
            // At most 1/8 relative width above 8 ns.
            if ns >= 8 {
                assert!((bucket_floor(b + 1) - bucket_floor(b)) * 8 <= bucket_floor(b) + 8, "{ns}");
            }
        }
    }

    #[test]
    fn percentiles_within_an_eighth() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.percentile(q).unwrap().as_secs_f64() * 1e6;
            assert!(got >= want && got <= want * 1.125 + 1.0, "q {q}: {got}");
        }
        assert_eq!(h.max(), Some(Duration::from_micros(1000)));
        assert_eq!(h.buckets().iter().map(|b| b.1).sum::<u64>(), 1000);
    }
}
