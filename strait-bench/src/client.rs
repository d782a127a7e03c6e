//! The client side (`connect`, and the parent of `loopback`): runs every
//! workload against a server over its engine, then the baselines, and
//! collects the rows.

use std::collections::VecDeque;
use std::io::{IsTerminal, Read as _, Write as _};
use std::net::{IpAddr, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

use strait::{Access, EngineAddress, MemoryRegion, MrDesc, PagedLayout, PollMode, Transfer, TransferEngine};

use crate::proto::{Channel, Driver, Echo, Msg, RawEnds, PROTOCOL};
use crate::raw::{self, Kind, Piece, RawEnd};
use crate::report::{Report, Row, RAW, STRAIT};
use crate::units::{format_size, percentile};
use crate::EngineOptions;

/// Immediate values of the ping-pong workloads; stream workloads use tags
/// from 1000 up, one per point.
pub const PING: u32 = 1;
/// See [`PING`].
pub const PONG: u32 = 2;
const FIRST_TAG: u32 = 1000;
/// How long a server may take to confirm what it received.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// The workloads, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Write,
    Paged,
    Read,
    ImmLatency,
    SendLatency,
    Kv,
}

impl Workload {
    pub const ALL: [Workload; 6] =
        [Workload::Write, Workload::Paged, Workload::Read, Workload::ImmLatency, Workload::SendLatency, Workload::Kv];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Paged => "paged",
            Workload::Read => "read",
            Workload::ImmLatency => "imm_latency",
            Workload::SendLatency => "send_latency",
            Workload::Kv => "kv",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().replace('-', "_");
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s || w.name().strip_suffix("_latency").is_some_and(|n| s == format!("{n}_lat")))
            .ok_or_else(|| format!("unknown workload {s:?} (write, paged, read, imm_latency, send_latency, kv)"))
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub workloads: Vec<Workload>,
    pub sizes: Vec<u64>,
    pub read_sizes: Vec<u64>,
    pub page_sizes: Vec<u64>,
    pub pages: u32,
    pub message_sizes: Vec<u64>,
    pub depth: usize,
    pub duration: Duration,
    pub iters: u64,
    /// Measurements per bandwidth point (strait and raw alternating); the
    /// median is reported, with the spread.
    pub repeat: u32,
    pub raw: bool,
    pub tcp: bool,
    pub tcp_streams: usize,
    pub progress: bool,
    /// The `kv` workload's request.
    pub kv: crate::kv::KvSpec,
    /// Take the engine's stats after the run.
    pub stats: bool,
}

impl Plan {
    /// Bytes each side's region needs for every workload of the plan.
    pub fn region_len(&self) -> u64 {
        let paged = self.page_sizes.iter().max().copied().unwrap_or(0) * 2 * self.pages as u64;
        [
            self.sizes.iter().max().copied().unwrap_or(0),
            self.read_sizes.iter().max().copied().unwrap_or(0),
            self.message_sizes.iter().max().copied().unwrap_or(0),
            paged,
            1 << 20,
        ]
        .into_iter()
        .max()
        .unwrap_or(1 << 20)
    }

    /// Checks what the server and the providers can do.
    pub fn validate(&self) -> Result<(), String> {
        if self.depth == 0 {
            return Err("--depth must be at least 1".into());
        }
        if let Some(m) = self.message_sizes.iter().find(|&&m| m > raw::RECEIVE_LEN) {
            return Err(format!(
                "send sizes are limited to {} (got {})",
                format_size(raw::RECEIVE_LEN),
                format_size(*m)
            ));
        }
        Ok(())
    }
}

struct Server {
    engine: EngineAddress,
    desc: MrDesc,
    ip: IpAddr,
    nics: usize,
    provider: String,
}

/// A connected client.
pub struct Client {
    plan: Plan,
    ch: Channel,
    engine: TransferEngine,
    region: MemoryRegion,
    server: Server,
    raw: Option<RawEnd>,
    rows: Vec<Row>,
    next_tag: u32,
    tty: bool,
    /// The engine's polling mode, as the report records it.
    poll: String,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Client {
    /// Opens the engine (and raw endpoints) and introduces itself.
    pub fn connect(server: &str, options: &EngineOptions, plan: Plan) -> Result<Self, String> {
        plan.validate()?;
        let stream = TcpStream::connect(server).map_err(|e| format!("connecting to {server}: {e}"))?;
        let ip = stream.peer_addr().map_err(err)?.ip();
        let mut ch = Channel::new(stream).map_err(err)?;
        let engine = options.build()?;
        let region_len = plan.region_len();
        let region = engine.alloc(region_len, Access::REMOTE_READ_WRITE).map_err(err)?;
        // The raw baseline is plain libfabric: it has no verbs path, and on
        // a verbs engine it would measure another transport.
        let raw_possible = engine.provider() != strait::ProviderKind::Verbs;
        if plan.raw && !raw_possible {
            eprintln!("raw baseline skipped: plain libfabric has no verbs path (compare with perftest's ib_write_bw)");
        }
        let mut raw = if plan.raw && raw_possible {
            Some(RawEnd::open(options.provider, options.interface.as_deref(), options.nics, region_len)?)
        } else {
            None
        };
        ch.send(&Msg::Hello {
            protocol: PROTOCOL,
            engine: engine.address().to_string(),
            desc: region.descriptor().to_string(),
            region_len,
            raw: raw.as_ref().map(|r| RawEnds { address: r.address().to_string(), desc: r.descriptor().to_string() }),
        })?;
        let (engine_hex, desc_hex, raw_ends, nics, provider) = ch.expect("welcome", |m| match m {
            Msg::Welcome { engine, desc, raw, nics, provider } => Some((engine, desc, raw, nics, provider)),
            _ => None,
        })?;
        let server = Server {
            engine: EngineAddress::from_str(&engine_hex).map_err(err)?,
            desc: MrDesc::from_str(&desc_hex).map_err(err)?,
            ip,
            nics,
            provider,
        };
        if let (Some(r), Some(ends)) = (raw.as_mut(), raw_ends) {
            r.connect(
                &EngineAddress::from_str(&ends.address).map_err(err)?,
                MrDesc::from_str(&ends.desc).map_err(err)?,
            )?;
        } else if raw.is_some() {
            return Err("the server did not open raw endpoints".into());
        }
        let tty = plan.progress && std::io::stderr().is_terminal();
        let poll = match options.poll {
            PollMode::Busy => "busy".to_string(),
            PollMode::Adaptive { spin } => format!("adaptive:{}us", spin.as_micros()),
        };
        Ok(Client { plan, ch, engine, region, server, raw, rows: Vec::new(), next_tag: FIRST_TAG, tty, poll })
    }

    fn progress(&self, text: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{text}");
            let _ = std::io::stderr().flush();
        }
    }

    fn tag(&mut self) -> u32 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Runs the plan; returns the report (also sent to the server).
    pub fn run(mut self) -> Result<Report, String> {
        self.warm_up()?;
        let mut tcp_sizes = Vec::new();
        for w in self.plan.workloads.clone() {
            match w {
                Workload::Write => {
                    for size in self.plan.sizes.clone() {
                        self.stream_point(w, size, None)?;
                        tcp_sizes.push(size);
                    }
                }
                Workload::Paged => {
                    for page in self.plan.page_sizes.clone() {
                        self.stream_point(w, page * self.plan.pages as u64, Some(page))?;
                    }
                }
                Workload::Read => {
                    for size in self.plan.read_sizes.clone() {
                        self.stream_point(w, size, None)?;
                    }
                }
                Workload::ImmLatency => self.latency_point(w, 0)?,
                Workload::Kv => self.kv_point()?,
                Workload::SendLatency => {
                    for size in self.plan.message_sizes.clone() {
                        self.latency_point(w, size)?;
                    }
                }
            }
        }
        // The kernel TCP baseline goes last, so that its socket traffic (and
        // its threads) cannot disturb any engine or raw measurement.
        if self.plan.tcp {
            for size in tcp_sizes {
                for streams in [1, self.plan.tcp_streams] {
                    self.progress(&format!("write tcp-{streams} {}", format_size(size)));
                    let runs = (0..self.plan.repeat).map(|_| self.tcp(size, streams)).collect::<Result<_, _>>()?;
                    self.rows.push(median(runs));
                    if self.plan.tcp_streams == 1 {
                        break;
                    }
                }
            }
        }
        self.progress("");
        let report = Report {
            tool: "strait-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            provider: self.server.provider.clone(),
            client_nics: self.engine.nic_count(),
            server_nics: self.server.nics,
            depth: self.plan.depth,
            pages: self.plan.pages,
            duration: self.plan.duration.as_secs_f64(),
            repeat: self.plan.repeat,
            poll: self.poll.clone(),
            rows: self.rows,
            stats: None,
            stats_table: None,
        };
        let mut report = report;
        if self.plan.stats {
            let s = self.engine.stats().map_err(|e| format!("engine stats: {e}"))?;
            report.stats = Some(crate::report::stats_json(&s));
            report.stats_table = Some(s.table());
        }
        self.ch.send(&Msg::Report { report: Box::new(report.clone()) })?;
        self.ch.send(&Msg::Bye)?;
        Ok(report)
    }

    /// The `kv` workload: strait's KV push and its two baselines, each
    /// `repeat` times, alternating; the medians are reported.
    fn kv_point(&mut self) -> Result<(), String> {
        let spec = self.plan.kv.clone();
        let label = format!(
            "{} {} tok {} TP {}:{} {}",
            spec.preset,
            spec.tokens,
            spec.layout,
            spec.prefill_tp,
            spec.decode_tp,
            if spec.layerwise { "layer-wise" } else { "whole" }
        );
        self.progress(&format!("kv {label}: setting up"));
        let kv = self.kv_setup(0, &spec)?;
        let bytes = kv.bytes()?;
        // Heterogeneous TP: the same bytes moved by a same-TP (1:1) push,
        // the figure the split is measured against (where the split moves
        // the same bytes: not where heads or latents are replicated).
        let same_tp = if spec.prefill_tp != 1 || spec.decode_tp != 1 {
            self.progress(&format!("kv {label}: setting up the same-TP baseline"));
            let same = crate::kv::KvSpec { prefill_tp: 1, decode_tp: 1, ..spec.clone() };
            let kv = self.kv_setup(1, &same)?;
            (kv.bytes()? == bytes).then_some(kv)
        } else {
            None
        };
        let mut runs: [Vec<Row>; 4] = Default::default();
        let kv_row = |driver: &str, r: crate::kv::KvRun| {
            let mut row = row(Workload::Kv, driver, bytes, None, 1, r.seconds);
            row.label = Some(label.clone());
            row.requests = Some(r.requests);
            row.layer_us = Some(r.seconds * 1e6 / spec.layers as f64);
            row.cpu_us_per_layer = Some(r.cpu_per_layer * 1e6);
            row
        };
        // One unmeasured round first: connections and first touches.
        for measured in std::iter::once(false).chain(std::iter::repeat_n(true, self.plan.repeat as usize)) {
            self.progress(&format!("kv {label}: strait"));
            let run = self.kv_push(0, &kv)?;
            self.progress(&format!("kv {label}: contiguous"));
            let contiguous = kv.contiguous()?;
            self.progress(&format!("kv {label}: per-block"));
            let per_block = kv.per_block()?;
            let same = match &same_tp {
                Some(same) => {
                    self.progress(&format!("kv {label}: same-TP"));
                    Some(self.kv_push(1, same)?)
                }
                None => None,
            };
            if measured {
                runs[0].push(kv_row(STRAIT, run));
                runs[1].push(kv_row("contiguous", contiguous));
                if let Some(p) = per_block {
                    runs[2].push(kv_row("per-block", p));
                }
                if let Some(s) = same {
                    runs[3].push(kv_row("same-TP", s));
                }
            }
        }
        for r in runs.into_iter().filter(|r| !r.is_empty()) {
            self.rows.push(median(r));
        }
        Ok(())
    }

    /// Builds KV setup number `setup` for `spec` on both ends.
    fn kv_setup(&mut self, setup: usize, spec: &crate::kv::KvSpec) -> Result<crate::kv::KvClient, String> {
        let (mut kv, senders) = crate::kv::KvClient::new(&self.engine, spec.clone())?;
        self.ch.send(&Msg::KvSetup { setup, spec: spec.clone(), senders })?;
        let decoders = self.ch.expect("KV ready", |m| match m {
            Msg::KvReady { decoders } => Some(decoders),
            _ => None,
        })?;
        kv.set_decoders(&decoders)?;
        Ok(kv)
    }

    /// One request of setup `setup`, pushed by strait and waited for on
    /// both ends.
    fn kv_push(&mut self, setup: usize, kv: &crate::kv::KvClient) -> Result<crate::kv::KvRun, String> {
        self.ch.send(&Msg::KvExpect { setup })?;
        let requests = self.ch.expect("KV requests", |m| match m {
            Msg::KvRequests { requests } => Some(requests),
            _ => None,
        })?;
        let run = kv.strait(&requests)?;
        self.ch.send(&Msg::KvWait { setup })?;
        if let Some(e) = self.ch.expect("KV done", |m| match m {
            Msg::KvDone { error } => Some(error),
            _ => None,
        })? {
            return Err(format!("the decoder's request failed: {e}"));
        }
        Ok(run)
    }

    /// First contact on every path (connection set-up on tcp takes many
    /// retries), so that no measured point pays for it.
    fn warm_up(&mut self) -> Result<(), String> {
        self.progress("warming up");
        let quick = Duration::from_millis(50);
        let (plan_duration, plan_depth) = (self.plan.duration, self.plan.depth);
        self.plan.duration = quick;
        self.plan.depth = self.plan.depth.min(4);
        let result = (|| {
            self.strait_stream(Workload::Write, 64 << 10, None)?;
            if self.raw.is_some() {
                self.raw_stream(Workload::Write, 64 << 10, None)?;
            }
            Ok::<_, String>(())
        })();
        self.plan.duration = plan_duration;
        self.plan.depth = plan_depth;
        result.map(|_| ())
    }

    fn stream_point(&mut self, w: Workload, size: u64, page: Option<u64>) -> Result<(), String> {
        let label = format!("{} {}", w.name(), format_size(page.unwrap_or(size)));
        let (mut strait, mut raw) = (Vec::new(), Vec::new());
        for run in 1..=self.plan.repeat {
            self.progress(&format!("{label} strait (run {run})"));
            let row = self.strait_stream(w, size, page)?;
            self.progress(&format!("{label} strait {:.3} GB/s", row.gbytes_per_s()));
            strait.push(row);
            if self.raw.is_some() {
                self.progress(&format!("{label} raw (run {run})"));
                raw.push(self.raw_stream(w, size, page)?);
            }
        }
        self.rows.push(median(strait));
        if !raw.is_empty() {
            self.rows.push(median(raw));
        }
        Ok(())
    }

    /// Confirms with the server that `count` immediates `tag` arrived.
    fn confirm(&mut self, driver: Driver, tag: u32, count: u64) -> Result<(), String> {
        self.ch.send(&Msg::Finished { driver, tag, count })?;
        let seen = self.ch.expect("counted", |m| match m {
            Msg::Counted { seen } => Some(seen),
            _ => None,
        })?;
        if seen != count {
            return Err(format!("the server counted {seen} immediates of {count} sent ({driver:?}, tag {tag})"));
        }
        Ok(())
    }

    fn strait_stream(&mut self, w: Workload, size: u64, page: Option<u64>) -> Result<Row, String> {
        let tag = self.tag();
        let depth = self.plan.depth;
        let pages: Vec<u32> = (0..self.plan.pages).map(|i| 2 * i).collect();
        let submit = |e: &TransferEngine| -> strait::Result<Transfer> {
            match (w, page) {
                (Workload::Paged, Some(page)) => e.write_paged(
                    &self.region,
                    &self.server.desc,
                    PagedLayout::contiguous(page),
                    pages.clone(),
                    pages.clone(),
                    Some(tag),
                ),
                (Workload::Read, _) => e.read(&self.region, 0, &self.server.desc, 0, size),
                _ => e.write(&self.region, 0, &self.server.desc, 0, size, Some(tag)),
            }
        };
        let mut inflight: VecDeque<Transfer> = VecDeque::with_capacity(depth);
        let mut ops = 0u64;
        let start = Instant::now();
        let deadline = start + self.plan.duration;
        while Instant::now() < deadline {
            if inflight.len() == depth {
                inflight.pop_front().map(|t| t.wait()).transpose().map_err(err)?;
            }
            inflight.push_back(submit(&self.engine).map_err(err)?);
            ops += 1;
        }
        for t in inflight {
            t.wait().map_err(err)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        if w != Workload::Read {
            self.confirm(Driver::Strait, tag, ops)?;
        }
        Ok(row(w, STRAIT, size, page, ops, seconds))
    }

    fn raw_stream(&mut self, w: Workload, size: u64, page: Option<u64>) -> Result<Row, String> {
        let tag = self.tag();
        let (depth, duration) = (self.plan.depth, self.plan.duration);
        let raw = self.raw.as_mut().ok_or("no raw endpoints")?;
        let nics = raw.nic_count();
        let template: Vec<Piece> = match page {
            Some(page) => (0..self.plan.pages as u64)
                .map(|i| Piece {
                    nic: i as usize % nics,
                    src_offset: 2 * i * page,
                    dst_offset: 2 * i * page,
                    len: page,
                })
                .collect(),
            None => vec![Piece { nic: 0, src_offset: 0, dst_offset: 0, len: size }],
        };
        let (kind, imm) = if w == Workload::Read { (Kind::Read, None) } else { (Kind::Write, Some(tag)) };
        let (ops, elapsed) = raw.stream(kind, &template, imm, depth, duration)?;
        if w != Workload::Read {
            self.confirm(Driver::Raw, tag, ops)?;
        }
        Ok(row(w, RAW, size, page, ops, elapsed.as_secs_f64()))
    }

    fn latency_point(&mut self, w: Workload, size: u64) -> Result<(), String> {
        let kind = if w == Workload::ImmLatency { Echo::Imm } else { Echo::Send };
        let warm = (self.plan.iters / 10).max(10);
        let total = self.plan.iters + warm;
        let label = format!("{} {}", w.name(), format_size(size.max(1)));
        self.progress(&format!("{label} strait"));
        self.ch.send(&Msg::Echo { driver: Driver::Strait, kind, size, iters: total })?;
        let mut rtt = Vec::with_capacity(total as usize);
        let counter = match kind {
            Echo::Imm => Some(self.engine.expect_imm(PONG, 1).map_err(err)?),
            Echo::Send => None,
        };
        let timeout = Duration::from_secs(10);
        let start = Instant::now();
        for _ in 0..total {
            let t0 = Instant::now();
            match &counter {
                Some(c) => {
                    let _sent = self.engine.write_imm(&self.server.desc, PING).map_err(err)?;
                    c.wait_timeout(timeout).map_err(err)?;
                    c.rearm(1).map_err(err)?;
                }
                None => {
                    let _sent = self.engine.send(&self.server.engine, &self.region, 0, size).map_err(err)?;
                    self.engine.recv_timeout(timeout).map_err(err)?;
                }
            }
            rtt.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        let seconds = start.elapsed().as_secs_f64();
        self.ch.expect("echoed", |m| matches!(m, Msg::Echoed).then_some(()))?;
        self.rows.push(latency_row(w, STRAIT, size, &mut rtt[warm as usize..].to_vec(), seconds));

        if self.raw.is_some() {
            self.progress(&format!("{label} raw"));
            let raw = self.raw.as_mut().ok_or("no raw endpoints")?;
            self.ch.send(&Msg::Echo { driver: Driver::Raw, kind, size, iters: total })?;
            let imm = (kind == Echo::Imm).then_some((PING, PONG));
            rtt.clear();
            let start = Instant::now();
            for _ in 0..total {
                let t0 = Instant::now();
                raw.ping(imm, size)?;
                rtt.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            let seconds = start.elapsed().as_secs_f64();
            self.ch.expect("echoed", |m| matches!(m, Msg::Echoed).then_some(()))?;
            self.rows.push(latency_row(w, RAW, size, &mut rtt[warm as usize..].to_vec(), seconds));
        }
        Ok(())
    }

    /// Kernel TCP: `streams` connections to the server, each writing
    /// `size`-byte chunks until the duration has passed; timed until the
    /// server confirms it has read everything.
    fn tcp(&mut self, size: u64, streams: usize) -> Result<Row, String> {
        self.ch.send(&Msg::TcpListen { streams })?;
        let port = self.ch.expect("tcp port", |m| match m {
            Msg::TcpPort { port } => Some(port),
            _ => None,
        })?;
        let conns = (0..streams)
            .map(|_| TcpStream::connect((self.server.ip, port)).map_err(|e| format!("tcp baseline: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let chunk = vec![0xa5u8; size as usize];
        let duration = self.plan.duration;
        let start = Instant::now();
        let sent: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = conns
                .into_iter()
                .map(|mut c| {
                    let chunk = &chunk;
                    s.spawn(move || {
                        let mut sent = 0u64;
                        while start.elapsed() < duration {
                            c.write_all(chunk)?;
                            sent += chunk.len() as u64;
                        }
                        c.shutdown(std::net::Shutdown::Write)?;
                        // Wait for the server to close its side.
                        let _ = c.read(&mut [0u8; 1]);
                        Ok::<u64, std::io::Error>(sent)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| "tcp thread panicked".to_string())?.map_err(err))
                .sum::<Result<u64, String>>()
        })?;
        let received = self.ch.expect("tcp count", |m| match m {
            Msg::TcpCount { bytes } => Some(bytes),
            _ => None,
        })?;
        let seconds = start.elapsed().as_secs_f64();
        if received != sent {
            return Err(format!("tcp baseline: sent {sent} bytes, the server read {received}"));
        }
        Ok(Row {
            workload: "write".into(),
            driver: format!("tcp-{streams}"),
            size,
            page_size: None,
            ops: sent / size,
            bytes: sent,
            seconds,
            rtt_p50_us: None,
            rtt_p90_us: None,
            rtt_p99_us: None,
            spread: None,
            label: None,
            requests: None,
            layer_us: None,
            cpu_us_per_layer: None,
        })
    }
}

/// The run with the median bandwidth, with the spread of all runs.
fn median(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.gbytes_per_s().total_cmp(&b.gbytes_per_s()));
    let spread = (runs.len() > 1).then(|| (runs[0].gbytes_per_s(), runs[runs.len() - 1].gbytes_per_s()));
    let mut row = runs.swap_remove(runs.len() / 2);
    row.spread = spread;
    row
}

fn row(w: Workload, driver: &str, size: u64, page: Option<u64>, ops: u64, seconds: f64) -> Row {
    Row {
        workload: w.name().into(),
        driver: driver.into(),
        size,
        page_size: page,
        ops,
        bytes: ops * size,
        seconds,
        rtt_p50_us: None,
        rtt_p90_us: None,
        rtt_p99_us: None,
        spread: None,
        label: None,
        requests: None,
        layer_us: None,
        cpu_us_per_layer: None,
    }
}

fn latency_row(w: Workload, driver: &str, size: u64, rtt: &mut [f64], seconds: f64) -> Row {
    rtt.sort_by(f64::total_cmp);
    Row {
        workload: w.name().into(),
        driver: driver.into(),
        size,
        page_size: None,
        ops: rtt.len() as u64,
        bytes: rtt.len() as u64 * size * 2,
        seconds,
        rtt_p50_us: Some(percentile(rtt, 0.5)),
        rtt_p90_us: Some(percentile(rtt, 0.9)),
        rtt_p99_us: Some(percentile(rtt, 0.99)),
        spread: None,
        label: None,
        requests: None,
        layer_us: None,
        cpu_us_per_layer: None,
    }
}
