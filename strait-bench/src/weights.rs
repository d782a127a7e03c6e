//! `strait-bench weights`: an RL weight push between S source and D
//! destination processes on this machine, against a naive push in the
//! same run.
//!
//! The model is synthetic: `layers` transformer layers of hidden size
//! `--hidden` in bf16 (qkv `[3h, h]`, o `[h, h]`, up and gate `[4h, h]`,
//! down `[h, 4h]`, two norms `[h]`) and an embedding `[32000, h]`, as many
//! layers as fit in `--total-mib`. Sources hold FSDP dim-0 shards
//! (`--mode direct`) or the whole model (`--mode broadcast`, one source
//! typically); destinations hold tensor-parallel shares: qkv, up, gate and
//! the embedding split along dim 0, o and down along dim 1 (strided), the
//! norms replicated (broadcast: every destination the same shares).
//!
//! Each step, every rank starts when the parent says so; a step's time is
//! the slowest rank's. The first step is reported with the planning
//! (`connect`) added. The naive baseline: source 0 holds every full tensor
//! (its gather not timed) and writes each, whole, to every destination's
//! staging copy of the full model; each destination then cuts its shares
//! out of it (what an engine's `load_weights` does).

use std::io::{BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use strait::weights::{plan, Mode, PlanConfig, Role, TensorSpec, WeightsConfig, WeightsRank, WeightsRankDesc};
use strait::{Access, MrDesc};

use crate::moe::read_tagged;
use crate::EngineOptions;

/// The model and the run.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct WeightsArgs {
    /// Source processes (trainer ranks).
    #[arg(long, default_value_t = 4)]
    pub sources: u32,
    /// Destination processes (inference ranks).
    #[arg(long, default_value_t = 4)]
    pub dests: u32,
    /// Model size, MiB (bf16).
    #[arg(long, default_value_t = 1024)]
    pub total_mib: u64,
    /// Hidden size.
    #[arg(long, default_value_t = 2048)]
    pub hidden: u64,
    /// direct (resharding plan) or broadcast (chain).
    #[arg(long, default_value = "direct")]
    pub mode: String,
    /// Plan chunk (KiB): replicated bytes are balanced, and broadcast
    /// parts cut, in pieces of at most this.
    #[arg(long, default_value_t = 4096)]
    pub chunk_kib: u64,
    /// Steps replayed after the first.
    #[arg(long, default_value_t = 3)]
    pub steps: u32,
    /// Baseline: naive (source 0 writes every full tensor to every
    /// destination) or none.
    #[arg(long, default_value = "naive")]
    pub baseline: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl WeightsArgs {
    fn to_args(&self) -> Vec<String> {
        vec![
            "--sources".into(),
            self.sources.to_string(),
            "--dests".into(),
            self.dests.to_string(),
            "--total-mib".into(),
            self.total_mib.to_string(),
            "--hidden".into(),
            self.hidden.to_string(),
            "--mode".into(),
            self.mode.clone(),
            "--steps".into(),
            self.steps.to_string(),
            "--chunk-kib".into(),
            self.chunk_kib.to_string(),
            "--baseline".into(),
            self.baseline.clone(),
        ]
    }

    fn mode(&self) -> Result<Mode, String> {
        match self.mode.as_str() {
            "direct" => Ok(Mode::Direct),
            "broadcast" => Ok(Mode::Broadcast),
            m => Err(format!("unknown --mode {m:?} (direct, broadcast)")),
        }
    }

    fn config(&self) -> Result<WeightsConfig, String> {
        Ok(WeightsConfig {
            plan: PlanConfig { chunk: self.chunk_kib.max(1) << 10 },
            mode: self.mode()?,
            timeout: Duration::from_secs(120),
            ..WeightsConfig::default()
        })
    }
}

/// How a destination holds a tensor.
#[derive(Clone, Copy)]
enum Tp {
    Column,
    Row,
    Replicated,
}

/// (name, shape, destination split) of the synthetic model.
fn model(a: &WeightsArgs) -> Vec<(String, Vec<u64>, Tp)> {
    let h = a.hidden;
    let mut out = vec![("embed".to_string(), vec![32_000, h], Tp::Column)];
    let layer_bytes = 2 * (3 * h * h + h * h + 3 * 4 * h * h + 2 * h);
    let left = (a.total_mib << 20).saturating_sub(2 * 32_000 * h);
    for l in 0..(left / layer_bytes).max(1) {
        for (n, shape, tp) in [
            ("qkv", vec![3 * h, h], Tp::Column),
            ("o", vec![h, h], Tp::Row),
            ("up", vec![4 * h, h], Tp::Column),
            ("gate", vec![4 * h, h], Tp::Column),
            ("down", vec![h, 4 * h], Tp::Row),
            ("attn_norm", vec![h], Tp::Replicated),
            ("mlp_norm", vec![h], Tp::Replicated),
        ] {
            out.push((format!("layers.{l}.{n}"), shape, tp));
        }
    }
    out
}

fn specs(a: &WeightsArgs, role: Role, rank: u32) -> Vec<TensorSpec> {
    let broadcast = a.mode == "broadcast";
    model(a)
        .into_iter()
        .map(|(name, shape, tp)| match role {
            Role::Source if broadcast || shape.len() < 2 => TensorSpec::replicated(name, 2, &shape),
            Role::Source => TensorSpec::chunk(name, 2, &shape, 0, rank, a.sources),
            Role::Destination => {
                let (r, n) = if broadcast { (0, 1) } else { (rank, a.dests) };
                match tp {
                    Tp::Column => TensorSpec::chunk(name, 2, &shape, 0, r, n),
                    Tp::Row => TensorSpec::chunk(name, 2, &shape, 1, r, n),
                    Tp::Replicated => TensorSpec::replicated(name, 2, &shape),
                }
            }
        })
        .collect()
}

/// One rank's timings, milliseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RankTimes {
    connect_ms: f64,
    steps_ms: Vec<f64>,
    naive_ms: Vec<f64>,
}

/// One line of the result table.
#[derive(Debug, Serialize)]
pub struct WeightsRow {
    pub driver: String,
    pub what: String,
    pub ms: f64,
    /// Model bytes over the time (each destination gets its shares).
    pub gbytes_per_s: f64,
    pub vs_strait: f64,
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
pub struct WeightsReport {
    pub provider: String,
    pub args: WeightsArgs,
    pub tensors: usize,
    pub model_bytes: u64,
    /// Bytes every destination receives per step, in all.
    pub dest_bytes: u64,
    /// Planned writes per step (broadcast: parts times destinations).
    pub plan_writes: usize,
    pub rows: Vec<WeightsRow>,
}

/// The parent: spawns the ranks, runs the steps, reports.
pub fn run(options: &EngineOptions, args: &WeightsArgs) -> Result<(), String> {
    args.mode()?;
    if !["naive", "none"].contains(&args.baseline.as_str()) {
        return Err(format!("unknown --baseline {:?} (naive, none)", args.baseline));
    }
    let src: Vec<Vec<TensorSpec>> = (0..args.sources).map(|r| specs(args, Role::Source, r)).collect();
    let dst: Vec<Vec<TensorSpec>> = (0..args.dests).map(|r| specs(args, Role::Destination, r)).collect();
    let plan_writes = match args.mode()? {
        Mode::Direct => plan(&src, &dst, &args.config()?.plan).map_err(|e| e.to_string())?.writes().count(),
        Mode::Broadcast => {
            let b = strait::weights::plan_broadcast(&src, &dst, &args.config()?.plan).map_err(|e| e.to_string())?;
            b.parts.len() * args.dests as usize
        }
    };
    let exe = std::env::current_exe().map_err(|e| format!("finding strait-bench itself: {e}"))?;
    let mut children = Vec::new();
    for (role, n) in [("source", args.sources), ("destination", args.dests)] {
        for r in 0..n {
            // Process i (sources, then destinations) runs on node i of an
            // emulated cluster (`strait-bench cluster`), else here.
            let (mut cmd, rank_options) = crate::cluster::rank_command(&exe, children.len(), options);
            let mut child = cmd
                .arg("weights-rank")
                .args(["--role", role, "--rank", &r.to_string()])
                .args(args.to_args())
                .args(rank_options.to_args())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting {role} {r}: {e}"))?;
            let out = BufReader::new(child.stdout.take().ok_or("no rank stdout")?);
            children.push((child, out));
        }
    }
    let result = (|| {
        let mut lines = Vec::new();
        for (i, (_, out)) in children.iter_mut().enumerate() {
            lines.push(read_tagged(out, "WHELLO ").map_err(|e| format!("rank process {i}: {e}"))?);
        }
        let say = |children: &mut Vec<(std::process::Child, BufReader<std::process::ChildStdout>)>, line: &str| {
            for (child, _) in children.iter_mut() {
                let stdin = child.stdin.as_mut().ok_or("no rank stdin")?;
                writeln!(stdin, "{line}").map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        for l in &lines {
            say(&mut children, l)?;
        }
        // Steps: everyone connected, then a `go` per step (and per naive
        // step), each answered with `WDONE`.
        let naive = if args.baseline == "naive" { 1 + args.steps } else { 0 };
        for _ in 0..(1 + args.steps + naive) {
            for (i, (_, out)) in children.iter_mut().enumerate() {
                read_tagged(out, "WREADY").map_err(|e| format!("rank process {i}: {e}"))?;
            }
            say(&mut children, "go")?;
        }
        let mut times = Vec::new();
        for (i, (_, out)) in children.iter_mut().enumerate() {
            let line = read_tagged(out, "WTIMES ").map_err(|e| format!("rank process {i}: {e}"))?;
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
    let report = report(options, args, &dst, plan_writes, &times);
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nJSON: {}", path.display());
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(
    options: &EngineOptions,
    args: &WeightsArgs,
    dst: &[Vec<TensorSpec>],
    plan_writes: usize,
    times: &[RankTimes],
) -> WeightsReport {
    let slowest = |pick: fn(&RankTimes) -> &Vec<f64>, i: usize| times.iter().map(|t| pick(t)[i]).fold(0.0, f64::max);
    let dest_bytes: u64 = dst.iter().flatten().map(|s| s.share_bytes()).sum();
    let model_bytes: u64 = dst[0].iter().map(|s| s.full_bytes()).sum();
    let connect = times.iter().map(|t| t.connect_ms).fold(0.0, f64::max);
    let steps = times[0].steps_ms.len();
    let first = slowest(|t| &t.steps_ms, 0) + connect;
    let replay = median((1..steps).map(|i| slowest(|t| &t.steps_ms, i)).collect());
    let mut rows = vec![
        WeightsRow {
            driver: "strait".into(),
            what: "first step + plan".into(),
            ms: first,
            gbytes_per_s: 0.0,
            vs_strait: 0.0,
        },
        WeightsRow {
            driver: "strait".into(),
            what: "replayed step".into(),
            ms: replay,
            gbytes_per_s: 0.0,
            vs_strait: 1.0,
        },
    ];
    let naive_n = times[0].naive_ms.len();
    if naive_n > 1 {
        let naive = median((1..naive_n).map(|i| slowest(|t| &t.naive_ms, i)).collect());
        rows.push(WeightsRow {
            driver: "naive".into(),
            what: "replayed step".into(),
            ms: naive,
            gbytes_per_s: 0.0,
            vs_strait: 0.0,
        });
    }
    for r in &mut rows {
        r.gbytes_per_s = dest_bytes as f64 / (r.ms * 1e6);
        r.vs_strait = r.ms / replay;
    }
    WeightsReport {
        provider: options.provider.to_string(),
        args: args.clone(),
        tensors: dst[0].len(),
        model_bytes,
        dest_bytes,
        plan_writes,
        rows,
    }
}

fn table(r: &WeightsReport) -> String {
    let a = &r.args;
    let mut s = format!(
        "\n== weights: {} push, {} sources -> {} destinations, {} tensors, {:.0} MiB model, {:.0} MiB into destinations per step | {} | plan: {} writes\n",
        a.mode,
        a.sources,
        a.dests,
        r.tensors,
        r.model_bytes as f64 / 1048576.0,
        r.dest_bytes as f64 / 1048576.0,
        r.provider,
        r.plan_writes
    );
    s += &format!("{:<8} {:<18} {:>10} {:>8} {:>10}\n", "driver", "what", "ms", "GB/s", "ms/strait");
    for row in &r.rows {
        s += &format!(
            "{:<8} {:<18} {:>10.1} {:>8.3} {:>10.2}\n",
            row.driver, row.what, row.ms, row.gbytes_per_s, row.vs_strait
        );
    }
    s += &format!("(step times: the slowest rank's; replayed: median of {} steps)\n", a.steps);
    s
}

fn line(buf: &mut String) -> Result<&str, String> {
    buf.clear();
    std::io::stdin().read_line(buf).map_err(|e| e.to_string())?;
    Ok(buf.trim())
}

fn ready() -> Result<(), String> {
    println!("WREADY");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut buf = String::new();
    line(&mut buf)?;
    Ok(())
}

/// A child: one source or destination.
pub fn rank_main(options: &EngineOptions, args: &WeightsArgs, role: &str, rank: u32) -> Result<(), String> {
    let role = match role {
        "source" => Role::Source,
        "destination" => Role::Destination,
        r => return Err(format!("unknown role {r:?}")),
    };
    let engine = options.build()?;
    let config = args.config()?;
    let me = WeightsRank::alloc(&engine, config, role, rank, specs(args, role, rank)).map_err(|e| e.to_string())?;
    // The naive baseline's memory: source 0's full tensors, each
    // destination's staging copy of the full model.
    let full: Vec<(String, Vec<u64>)> = model(args).into_iter().map(|(n, s, _)| (n, s)).collect();
    let full_bytes: u64 = full.iter().map(|(_, s)| 2 * s.iter().product::<u64>()).sum();
    let naive_on = args.baseline == "naive" && (role == Role::Destination || rank == 0);
    let staging = if naive_on {
        let access = if role == Role::Destination { Access::REMOTE_WRITE } else { Access::LOCAL };
        Some(engine.alloc(full_bytes, access).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let staging_desc = staging.as_ref().filter(|_| role == Role::Destination).map(|s| s.descriptor().to_string());
    println!("WHELLO {} {}", me.descriptor(), staging_desc.unwrap_or_else(|| "-".into()));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut descs = Vec::new();
    let mut stagings: Vec<Option<MrDesc>> = Vec::new();
    let mut buf = String::new();
    for _ in 0..args.sources + args.dests {
        let l = line(&mut buf)?;
        let (d, s) = l.split_once(' ').ok_or("bad hello line")?;
        let d: WeightsRankDesc = d.parse().map_err(|e: strait::Error| e.to_string())?;
        if d.role == Role::Destination {
            stagings.push(if s == "-" { None } else { Some(s.parse().map_err(|e: strait::Error| e.to_string())?) });
        }
        descs.push(d);
    }
    let t = Instant::now();
    let mut group = me.connect(&descs).map_err(|e| e.to_string())?;
    let mut times = RankTimes { connect_ms: t.elapsed().as_secs_f64() * 1e3, ..Default::default() };
    for step in 1..=u64::from(1 + args.steps) {
        if role == Role::Source {
            // New weights every step (not timed).
            let (region, _, _) = group.local().tensor(0).map_err(|e| e.to_string())?;
            region.write_at(0, &[step as u8; 64]).map_err(|e| e.to_string())?;
        }
        ready()?;
        let t = Instant::now();
        match role {
            Role::Source => group.push(step),
            Role::Destination => group.wait(step),
        }
        .map_err(|e| e.to_string())?;
        times.steps_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if args.baseline == "naive" {
        let specs = specs(args, role, rank);
        // A destination's cut of each full tensor into its share.
        let cuts = if role == Role::Destination {
            let whole: Vec<TensorSpec> = full.iter().map(|(n, s)| TensorSpec::replicated(n.as_str(), 2, s)).collect();
            Some(
                plan(&[whole], std::slice::from_ref(&specs), &PlanConfig { chunk: u64::MAX })
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for (_, s) in &full {
            offsets.push(at);
            at += 2 * s.iter().product::<u64>();
        }
        for _ in 0..=args.steps {
            let counter = match role {
                Role::Destination => Some(engine.expect_imm(7, full.len() as u64).map_err(|e| e.to_string())?),
                Role::Source => None,
            };
            ready()?;
            let t = Instant::now();
            if role == Role::Source && rank == 0 {
                let src = staging.as_ref().expect("source 0 holds the full model");
                let mut posted = Vec::new();
                for d in stagings.iter().flatten() {
                    for (i, (_, s)) in full.iter().enumerate() {
                        let len = 2 * s.iter().product::<u64>();
                        posted.push(
                            engine.write(src, offsets[i], d, offsets[i], len, Some(7)).map_err(|e| e.to_string())?,
                        );
                    }
                }
                for p in posted {
                    p.wait().map_err(|e| e.to_string())?;
                }
            }
            if let (Some(c), Some(cuts)) = (counter, &cuts) {
                c.wait().map_err(|e| e.to_string())?;
                let from = staging.as_ref().expect("a destination's staging");
                for w in cuts.writes() {
                    let (region, base, _) = group.local().tensor(w.dst_tensor as usize).map_err(|e| e.to_string())?;
                    let c = w.copy;
                    for r in 0..c.rows {
                        let src_at = offsets[w.src_tensor as usize] + c.src_offset + r * c.src_stride;
                        // SAFETY: both ranges are inside their regions
                        // (the plan keeps copies inside the shares), and
                        // nothing else touches them during the step.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                from.as_ptr().add(src_at as usize),
                                region.as_ptr().add((base + c.dst_offset + r * c.dst_stride) as usize),
                                c.row_len as usize,
                            );
                        }
                    }
                }
            }
            times.naive_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("WTIMES {}", serde_json::to_string(&times).map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(())
}
