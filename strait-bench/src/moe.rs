//! `strait-bench moe`: expert-parallel dispatch and combine between R rank
//! processes on this machine, against a naive all-to-all in the same run:
//! each rank sends every (token, expert) copy as its own two-sided message
//! (and every expert output back the same way).
//!
//! The parent spawns the ranks (`strait-bench moe-rank`), passes every
//! rank's descriptor to every rank over stdin, and collects each rank's
//! timings from stdout. An iteration's time for a phase is the slowest
//! rank's (the collective is done when the last rank is); p50 and p99 are
//! over iterations.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use strait::moe::{MoeConfig, MoeDtype, MoeRank, MoeRankDesc};
use strait::{Access, EngineAddress, TransferEngine};

use crate::EngineOptions;

/// The shape and the run.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct MoeArgs {
    /// Ranks (processes).
    #[arg(long, default_value_t = 4)]
    pub ranks: u32,
    /// Tokens per rank per call (decode: 128; prefill: e.g. 4096).
    #[arg(long, default_value_t = 128)]
    pub tokens: u32,
    /// Hidden size (elements, bf16).
    #[arg(long, default_value_t = 7168)]
    pub hidden: u32,
    /// Experts in all (a multiple of --ranks).
    #[arg(long, default_value_t = 256)]
    pub experts: u32,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    pub top_k: u32,
    /// Measured iterations (after 3 warm-up ones).
    #[arg(long, default_value_t = 30)]
    pub iters: u32,
    /// Baseline: naive (one message per copy) or none.
    #[arg(long, default_value = "naive")]
    pub baseline: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Draw p50/p99 per phase and driver as SVG into this file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

const WARMUP: u32 = 3;

impl MoeArgs {
    fn config(&self) -> MoeConfig {
        MoeConfig {
            timeout: Duration::from_secs(30),
            ..MoeConfig::new(self.ranks, self.experts, self.top_k, self.tokens, self.hidden, MoeDtype::Bf16)
        }
    }

    fn to_args(&self) -> Vec<String> {
        vec![
            "--ranks".into(),
            self.ranks.to_string(),
            "--tokens".into(),
            self.tokens.to_string(),
            "--hidden".into(),
            self.hidden.to_string(),
            "--experts".into(),
            self.experts.to_string(),
            "--top-k".into(),
            self.top_k.to_string(),
            "--iters".into(),
            self.iters.to_string(),
            "--baseline".into(),
            self.baseline.clone(),
        ]
    }
}

/// One rank's timings, microseconds per measured iteration.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RankTimes {
    dispatch: Vec<f64>,
    combine: Vec<f64>,
    naive_dispatch: Vec<f64>,
    naive_combine: Vec<f64>,
}

/// One line of the result table.
#[derive(Debug, Serialize)]
pub struct MoeRow {
    pub driver: String,
    pub phase: String,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Bytes of (token, expert) copies one rank sends, over the p50 time.
    pub gbytes_per_s: f64,
    pub vs_strait: f64,
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
pub struct MoeReport {
    pub provider: String,
    pub args: MoeArgs,
    /// Receive memory per rank (bytes): counts, pool and combine regions.
    pub receive_bytes: u64,
    /// DeepEP low-latency's receive buffers for the same shape.
    pub deepep_receive_bytes: u64,
    pub rows: Vec<MoeRow>,
}

/// The parent: spawns the ranks and reports.
pub fn run(options: &EngineOptions, args: &MoeArgs) -> Result<(), String> {
    let c = args.config();
    c.validate().map_err(|e| e.to_string())?;
    if !["naive", "none"].contains(&args.baseline.as_str()) {
        return Err(format!("unknown --baseline {:?} (naive, none)", args.baseline));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding strait-bench itself: {e}"))?;
    let mut children = Vec::new();
    for r in 0..args.ranks {
        let (mut cmd, rank_options) = crate::cluster::rank_command(&exe, r as usize, options);
        let mut child = cmd
            .arg("moe-rank")
            .args(["--rank", &r.to_string()])
            .args(args.to_args())
            .args(rank_options.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting rank {r}: {e}"))?;
        let out = BufReader::new(child.stdout.take().ok_or("no rank stdout")?);
        children.push((child, out));
    }
    let result = (|| {
        let mut lines = Vec::new();
        for (r, (_, out)) in children.iter_mut().enumerate() {
            lines.push(read_tagged(out, "MOEHELLO ").map_err(|e| format!("rank {r}: {e}"))?);
        }
        for (child, _) in &mut children {
            let stdin = child.stdin.as_mut().ok_or("no rank stdin")?;
            for l in &lines {
                writeln!(stdin, "{l}").map_err(|e| e.to_string())?;
            }
        }
        let mut times = Vec::new();
        for (r, (_, out)) in children.iter_mut().enumerate() {
            let line = read_tagged(out, "MOETIMES ").map_err(|e| format!("rank {r}: {e}"))?;
            times.push(serde_json::from_str::<RankTimes>(&line).map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(times)
    })();
    for (mut child, _) in children {
        if result.is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    let times = result?;
    let report = report(options, args, &c, &times);
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nJSON: {}", path.display());
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&report)).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// The rest of the next line of a rank process that starts with `tag`
/// (other lines are skipped); an error if it exits first.
pub(crate) fn read_tagged(out: &mut impl BufRead, tag: &str) -> Result<String, String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("exited early (see its stderr above)".into());
        }
        if let Some(rest) = line.trim().strip_prefix(tag) {
            return Ok(rest.to_string());
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Picks one phase's timings of a rank.
type Pick = fn(&RankTimes) -> &Vec<f64>;

fn report(options: &EngineOptions, args: &MoeArgs, c: &MoeConfig, times: &[RankTimes]) -> MoeReport {
    let bytes = f64::from(args.tokens) * f64::from(args.top_k) * f64::from(c.token_bytes);
    let phase = |pick: Pick| -> Option<(f64, f64)> {
        let n = times.iter().map(|t| pick(t).len()).min()?;
        if n == 0 {
            return None;
        }
        let mut slowest: Vec<f64> = (0..n).map(|i| times.iter().map(|t| pick(t)[i]).fold(0.0, f64::max)).collect();
        slowest.sort_by(|a, b| a.total_cmp(b));
        Some((percentile(&slowest, 0.5), percentile(&slowest, 0.99)))
    };
    let mut rows = Vec::new();
    let cases: [(&str, &str, Pick); 4] = [
        ("strait", "dispatch", |t| &t.dispatch),
        ("strait", "combine", |t| &t.combine),
        ("naive", "dispatch", |t| &t.naive_dispatch),
        ("naive", "combine", |t| &t.naive_combine),
    ];
    let base: Vec<Option<(f64, f64)>> = vec![phase(cases[0].2), phase(cases[1].2)];
    for (i, (driver, ph, pick)) in cases.iter().enumerate() {
        if let Some((p50, p99)) = phase(*pick) {
            let strait = base[i % 2].map_or(p50, |b| b.0);
            rows.push(MoeRow {
                driver: driver.to_string(),
                phase: ph.to_string(),
                p50_us: p50,
                p99_us: p99,
                gbytes_per_s: bytes / (p50 * 1e3),
                vs_strait: p50 / strait,
            });
        }
    }
    MoeReport {
        provider: options.provider.to_string(),
        args: args.clone(),
        receive_bytes: c.memory().receive(),
        deepep_receive_bytes: strait::moe::deepep_low_latency_receive_bytes(
            u64::from(args.experts),
            u64::from(args.tokens),
            u64::from(args.hidden),
        ),
        rows,
    }
}

fn table(r: &MoeReport) -> String {
    let a = &r.args;
    let mut s = format!(
        "\n== moe: dispatch and combine, {} ranks x {} tokens, hidden {} bf16, {} experts, top-{} | {} | p50/p99 of {} iterations (slowest rank each)\n",
        a.ranks, a.tokens, a.hidden, a.experts, a.top_k, r.provider, a.iters
    );
    s += &format!(
        "{:<8} {:<9} {:>10} {:>10} {:>8} {:>10}\n",
        "driver", "phase", "p50 us", "p99 us", "GB/s", "p50/strait"
    );
    for row in &r.rows {
        s += &format!(
            "{:<8} {:<9} {:>10.1} {:>10.1} {:>8.3} {:>10.2}\n",
            row.driver, row.phase, row.p50_us, row.p99_us, row.gbytes_per_s, row.vs_strait
        );
    }
    s += &format!(
        "receive memory per rank: {:.1} MB (DeepEP low-latency, same shape: {:.1} MB)\n",
        r.receive_bytes as f64 / 1e6,
        r.deepep_receive_bytes as f64 / 1e6
    );
    s
}

fn svg(r: &MoeReport) -> String {
    let (w, h, left, bottom) = (640.0, 360.0, 70.0, 40.0);
    let max = r.rows.iter().map(|x| x.p99_us).fold(1.0, f64::max);
    let bar = (w - left - 20.0) / (r.rows.len().max(1) as f64 * 2.0 + 1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"{left}\" y=\"16\">strait-bench moe ({} ranks, {}): p50 (solid) and p99 (light), us</text>\n",
        r.args.ranks, r.provider
    );
    for (i, row) in r.rows.iter().enumerate() {
        let x = left + bar * (2.0 * i as f64 + 1.0);
        for (v, opacity) in [(row.p99_us, 0.35), (row.p50_us, 1.0)] {
            let bh = (h - bottom - 30.0) * v / max;
            let color = if row.driver == "strait" { "#1f77b4" } else { "#d62728" };
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{bh:.1}\" fill=\"{color}\" fill-opacity=\"{opacity}\"/>\n",
                h - bottom - bh
            );
        }
        s += &format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\">{} {}</text>\n<text x=\"{x:.1}\" y=\"{:.1}\">{:.0}</text>\n",
            h - bottom + 14.0,
            row.driver,
            row.phase,
            h - bottom + 28.0,
            row.p50_us
        );
    }
    s + "</svg>\n"
}

/// A child: rank `rank` of the group.
pub fn rank_main(options: &EngineOptions, args: &MoeArgs, rank: u32) -> Result<(), String> {
    let c = args.config();
    let engine = {
        let mut b = TransferEngine::builder()
            .provider(options.provider)
            .nics(options.nics)
            .poll_mode(options.poll)
            .receive_buffers(512, c.token_bytes as usize + 64);
        if let Some(i) = &options.interface {
            b = b.interface(i.clone());
        }
        b.build().map_err(|e| format!("opening the engine: {e}"))?
    };
    let me = MoeRank::new(&engine, c, rank).map_err(|e| e.to_string())?;
    println!("MOEHELLO {} {}", me.descriptor(), engine.address());
    let mut descs = Vec::new();
    let mut addrs = Vec::new();
    let mut line = String::new();
    for _ in 0..args.ranks {
        line.clear();
        std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
        let (d, a) = line.trim().split_once(' ').ok_or("bad hello line")?;
        descs.push(d.parse::<MoeRankDesc>().map_err(|e| e.to_string())?);
        addrs.push(a.parse::<EngineAddress>().map_err(|e| e.to_string())?);
    }
    let mut group = me.connect(&descs).map_err(|e| e.to_string())?;
    let (x, idx, w) = routing(&c, rank);
    let mut times = RankTimes::default();
    for i in 0..WARMUP + args.iters {
        let t0 = Instant::now();
        let d = group.dispatch(&x, &idx, &w).map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let _y = group.combine(&d.expert_x, &d.handle).map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        if i >= WARMUP {
            times.dispatch.push((t1 - t0).as_secs_f64() * 1e6);
            times.combine.push((t2 - t1).as_secs_f64() * 1e6);
        }
    }
    if args.baseline == "naive" {
        let mut naive = Naive::new(&engine, &c, rank, addrs, &x)?;
        for i in 0..WARMUP + args.iters {
            let (d, cmb) = naive.iteration(i, &idx, &w)?;
            if i >= WARMUP {
                times.naive_dispatch.push(d);
                times.naive_combine.push(cmb);
            }
        }
    }
    println!("MOETIMES {}", serde_json::to_string(&times).map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(())
}

/// Seeded random top-k routing and values for one rank.
fn routing(c: &MoeConfig, rank: u32) -> (Vec<u8>, Vec<i32>, Vec<f32>) {
    let mut s = (u64::from(rank) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (t, k) = (c.max_tokens as usize, c.top_k as usize);
    let mut idx = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut chosen: Vec<i32> = Vec::with_capacity(k);
        while chosen.len() < k {
            let e = (next() % u64::from(c.experts)) as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        idx.extend(chosen);
    }
    let w = vec![1.0 / k as f32; t * k];
    let x = (0..t * c.token_bytes as usize).map(|_| next() as u8).collect();
    (x, idx, w)
}

/// The naive all-to-all: one two-sided message per (token, expert) copy,
/// each way, and one closing message per peer saying how many it sent.
struct Naive {
    engine: TransferEngine,
    c: MoeConfig,
    rank: u32,
    addrs: Vec<EngineAddress>,
    /// Messages to send: header (iteration u32, phase u8, count-or-token
    /// u32, k u8, source rank u8, pad) and a row.
    out: strait::MemoryRegion,
    x: Vec<u8>,
    /// Messages that arrived for a later phase.
    early: Vec<Vec<u8>>,
}

const HEADER: usize = 12;

impl Naive {
    fn new(
        engine: &TransferEngine,
        c: &MoeConfig,
        rank: u32,
        addrs: Vec<EngineAddress>,
        x: &[u8],
    ) -> Result<Self, String> {
        let slots = c.max_tokens as u64 * c.top_k as u64 + c.ranks as u64;
        let out =
            engine.alloc(slots * (HEADER as u64 + c.token_bytes as u64), Access::LOCAL).map_err(|e| e.to_string())?;
        Ok(Naive { engine: engine.clone(), c: *c, rank, addrs, out, x: x.to_vec(), early: Vec::new() })
    }

    fn header(&self, iter: u32, phase: u8, a: u32, k: u8) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(&iter.to_le_bytes());
        h[4] = phase;
        h[5..9].copy_from_slice(&a.to_le_bytes());
        h[9] = k;
        h[10] = self.rank as u8;
        h
    }

    /// Sends `rows` (destination rank, token, k, bytes) as messages, then a
    /// count to every peer; returns the rows other ranks sent here.
    fn exchange(&mut self, iter: u32, phase: u8, rows: &[(u32, u32, u8, &[u8])]) -> Result<Vec<Vec<u8>>, String> {
        let slot = HEADER as u64 + self.c.token_bytes as u64;
        let mut sent = vec![0u32; self.c.ranks as usize];
        let mut posted = Vec::new();
        for (i, &(d, t, k, row)) in rows.iter().enumerate() {
            let at = i as u64 * slot;
            self.out.write_at(at, &self.header(iter, phase, t, k)).map_err(|e| e.to_string())?;
            self.out.write_at(at + HEADER as u64, row).map_err(|e| e.to_string())?;
            let len = (HEADER + row.len()) as u64;
            posted.push(self.engine.send(&self.addrs[d as usize], &self.out, at, len).map_err(|e| e.to_string())?);
            sent[d as usize] += 1;
        }
        for d in (0..self.c.ranks).filter(|&d| d != self.rank) {
            let at = (rows.len() as u64 + u64::from(d)) * slot;
            self.out.write_at(at, &self.header(iter, phase | 0x80, sent[d as usize], 0)).map_err(|e| e.to_string())?;
            posted.push(
                self.engine.send(&self.addrs[d as usize], &self.out, at, HEADER as u64).map_err(|e| e.to_string())?,
            );
        }
        // Receive until every peer's count has arrived and been met.
        let peers = self.c.ranks as usize - 1;
        let (mut closes, mut expected, mut got) = (0usize, 0u64, Vec::new());
        let mut early = std::mem::take(&mut self.early);
        let deadline = Instant::now() + Duration::from_secs(30);
        while closes < peers || (got.len() as u64) < expected {
            let m = match early.pop() {
                Some(m) => m,
                None => self
                    .engine
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .map_err(|e| format!("naive baseline: {e}"))?,
            };
            let (mi, mp) = (u32::from_le_bytes(m[..4].try_into().unwrap()), m[4]);
            if mi != iter || mp & 0x7F != phase {
                self.early.push(m);
                continue;
            }
            if mp & 0x80 != 0 {
                closes += 1;
                expected += u64::from(u32::from_le_bytes(m[5..9].try_into().unwrap()));
            } else {
                got.push(m);
            }
        }
        for t in posted {
            t.wait_timeout(Duration::from_secs(30)).map_err(|e| format!("naive baseline: {e}"))?;
        }
        Ok(got)
    }

    /// One dispatch and one combine (copies to this rank's own experts
    /// stay local); their times in microseconds.
    fn iteration(&mut self, iter: u32, idx: &[i32], w: &[f32]) -> Result<(f64, f64), String> {
        let (k, tb) = (self.c.top_k as usize, self.c.token_bytes as usize);
        let le = self.c.experts / self.c.ranks;
        let x = std::mem::take(&mut self.x);
        let t0 = Instant::now();
        let rows: Vec<(u32, u32, u8, &[u8])> = idx
            .iter()
            .enumerate()
            .filter(|(_, &e)| e >= 0 && e as u32 / le != self.rank)
            .map(|(i, &e)| (e as u32 / le, (i / k) as u32, (i % k) as u8, &x[(i / k) * tb..(i / k + 1) * tb]))
            .collect();
        let received = self.exchange(iter, 1, &rows)?;
        let t1 = Instant::now();
        // The "experts" return each row as it came, to the rank that sent it.
        let back: Vec<(u32, u32, u8, &[u8])> = received
            .iter()
            .map(|m| (u32::from(m[10]), u32::from_le_bytes(m[5..9].try_into().expect("4 bytes")), m[9], &m[HEADER..]))
            .collect();
        let outputs = self.exchange(iter, 2, &back)?;
        let hidden = self.c.hidden as usize;
        let mut y = vec![0f32; self.c.max_tokens as usize * hidden];
        for m in &outputs {
            let (t, kk) = (u32::from_le_bytes(m[5..9].try_into().expect("4 bytes")) as usize, m[9] as usize);
            let weight = w[t * k + kk];
            for (a, b) in y[t * hidden..(t + 1) * hidden].iter_mut().zip(m[HEADER..].chunks_exact(2)) {
                *a += weight * strait::moe::bf16_to_f32(u16::from_le_bytes(b.try_into().expect("2 bytes")));
            }
        }
        std::hint::black_box(&y);
        let t2 = Instant::now();
        self.x = x;
        Ok(((t1 - t0).as_secs_f64() * 1e6, (t2 - t1).as_secs_f64() * 1e6))
    }
}
