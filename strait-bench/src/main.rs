//! `strait-bench`: strait's benchmark tool. Run `serve` on one node and
//! `connect` on another (the way `ib_write_bw` or `fi_rma_bw` run), or
//! `loopback` for both on this machine; `info` tells what this machine
//! offers. See `strait-bench --help`.

mod client;
mod cluster;
mod kv;
mod moe;
mod proto;
mod raw;
mod report;
mod server;
mod units;
mod weights;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use strait::{PollMode, Provider, TransferEngine};

use crate::client::{Client, Plan};
use crate::report::Report;
use crate::server::ServeOptions;

/// Benchmarks strait between two processes: single writes, paged writes,
/// reads, write-with-immediate and send/recv latency, against plain
/// libfabric and kernel TCP baselines measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "strait-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open an engine, print how to reach it, and serve one client (or
    /// every client with --forever) until interrupted.
    Serve {
        #[command(flatten)]
        engine: EngineArgs,
        /// Address of the side channel (TCP) to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
        /// Port of the side channel (0: any free port).
        #[arg(long, default_value_t = 18515)]
        port: u16,
        /// Keep serving after the first client.
        #[arg(long)]
        forever: bool,
        /// Print only the address line (no results).
        #[arg(long)]
        quiet: bool,
    },
    /// Run the workloads against a server started with `serve`.
    Connect {
        /// The server's side channel, HOST:PORT, as `serve` printed it.
        server: String,
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run server and client as two processes on this machine (tcp on the
    /// loopback interface unless --provider says otherwise).
    Loopback {
        #[command(flatten)]
        engine: EngineArgs,
        /// NICs of the server's engine (default: --nics).
        #[arg(long)]
        server_nics: Option<usize>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// What this machine offers: providers, NICs, GPUs, and why a backend
    /// is unavailable.
    Info,
    /// MoE dispatch and combine between --ranks processes on this machine
    /// (tcp on the loopback interface unless --provider says otherwise),
    /// against a naive all-to-all of one message per copy, same run.
    Moe {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        moe: moe::MoeArgs,
    },
    /// RL weight transfer between --sources and --dests processes on this
    /// machine (tcp on the loopback interface unless --provider says
    /// otherwise): a resharding push (or a chain broadcast), first step
    /// and replayed steps, against a naive push in the same run.
    Weights {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        weights: weights::WeightsArgs,
    },
    /// Runs a workload on an emulated cluster built on this machine (as
    /// root): a network namespace per node, a veth link per NIC with its
    /// own rate, delay and loss, faults on a schedule. `-- connect ARGS`
    /// runs serve on node 1 and connect on node 0; `-- moe ARGS` and `--
    /// weights ARGS` spread their rank processes over the nodes.
    Cluster {
        #[command(flatten)]
        cluster: cluster::ClusterArgs,
    },
    /// One rank of `weights` (started by it).
    #[command(hide = true)]
    WeightsRank {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        weights: weights::WeightsArgs,
        #[arg(long)]
        role: String,
        #[arg(long)]
        rank: u32,
    },
    /// One rank of `moe` (started by it).
    #[command(hide = true)]
    MoeRank {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        moe: moe::MoeArgs,
        #[arg(long)]
        rank: u32,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Poll {
    /// Spin briefly, then sleep on the completion queue (default; right
    /// for machines where the two ends share cores).
    Adaptive,
    /// Never sleep (one core per engine).
    Busy,
}

#[derive(Args, Debug, Clone)]
struct EngineArgs {
    /// Provider: auto (efa, else verbs, else tcp), efa, verbs, tcp, shm.
    #[arg(long, default_value = "auto")]
    provider: Provider,
    /// NICs (endpoints) of this end's engine.
    #[arg(long, default_value_t = 1)]
    nics: usize,
    /// tcp: the interface to use (e.g. lo, eth0). loopback defaults to lo.
    #[arg(long)]
    interface: Option<String>,
    /// EFA: the fabric to open, efa (default) or efa-direct.
    #[arg(long, default_value = "efa")]
    efa_fabric: strait::EfaFabric,
    /// Use the RDMA NICs nearest to this GPU (see `info` for the map).
    #[arg(long)]
    gpu: Option<usize>,
    /// Worker polling mode.
    #[arg(long, value_enum, default_value = "adaptive")]
    poll: Poll,
    /// Adaptive polling: microseconds to keep spinning after the last
    /// piece of work before sleeping.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Pack strided copies and paged writes whose runs average fewer
    /// bytes than this (K, M: binary units; 0: never); the default is the
    /// provider's (tcp: 64K, others: never). See EngineBuilder::packing.
    #[arg(long)]
    pack_below: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Workloads to run, comma-separated: write, paged, read, imm-lat,
    /// send-lat, kv (not in the default list: it moves a model's KV cache).
    #[arg(long, default_value = "write,paged,read,imm-lat,send-lat")]
    workloads: String,
    /// Message sizes of single writes (K, M, G are binary units).
    #[arg(long, default_value = "4K,64K,256K,1M,4M,16M,64M")]
    sizes: String,
    /// Sizes of reads.
    #[arg(long, default_value = "64K,1M,16M")]
    read_sizes: String,
    /// Page sizes of paged writes.
    #[arg(long, default_value = "1K,4K,16K,64K")]
    page_sizes: String,
    /// Pages per paged write (scattered: no two adjacent).
    #[arg(long, default_value_t = 64)]
    pages: u32,
    /// Message sizes of the send/recv ping-pong (at most 64 KiB).
    #[arg(long, default_value = "64,4K")]
    message_sizes: String,
    /// Requests kept in flight by the bandwidth workloads.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Measurement time per point, seconds.
    #[arg(long, default_value_t = 0.5)]
    duration: f64,
    /// Runs per bandwidth point, strait and raw alternating: the median is
    /// reported (JSON has the spread).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Round trips per latency point.
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    /// Baselines run in the same invocation: raw (plain libfabric), tcp
    /// (kernel TCP streams), both (default) or none.
    #[arg(long, default_value = "raw,tcp")]
    baseline: String,
    /// Streams of the multi-stream TCP baseline (default: --nics, at least 2).
    #[arg(long)]
    tcp_streams: Option<usize>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw bandwidth against message size as SVG into this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    no_progress: bool,
    /// kv: model preset: llama3-8b (32 layers, 8 KV heads, head dim 128),
    /// qwen3-32b (64 layers, 8, 128), deepseek-v3 (MLA, 61 layers, latent
    /// 576); bf16, 16-token blocks (64 for MLA).
    #[arg(long, default_value = "llama3-8b")]
    kv_preset: String,
    /// kv: tokens of the request.
    #[arg(long, default_value_t = 4096)]
    prompt_tokens: u64,
    /// kv: cache layout: vllm ([2, blocks, block, heads, dim] per layer),
    /// nhd, hnd (FlashInfer); mla is implied by deepseek-v3.
    #[arg(long, default_value = "vllm")]
    layout: String,
    /// kv: prefill and decode tensor-parallel sizes, P:D.
    #[arg(long, default_value = "1:1")]
    tp: String,
    /// kv: submit all layers at once instead of layer by layer.
    #[arg(long)]
    kv_whole: bool,
    /// Print the client engine's stats (per NIC and peer counters,
    /// request latency percentiles) after the run, and put them in the JSON.
    #[arg(long)]
    stats: bool,
}

/// How to open an engine (and the raw baseline's endpoints).
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub provider: Provider,
    pub nics: usize,
    pub interface: Option<String>,
    pub efa_fabric: strait::EfaFabric,
    pub gpu: Option<usize>,
    pub poll: PollMode,
    pub pack_below: Option<u64>,
}

impl EngineOptions {
    fn from_args(a: &EngineArgs) -> Result<Self, String> {
        let pack_below = match a.pack_below.as_deref().map(str::trim) {
            Some("0") => Some(0),
            other => other.map(crate::units::parse_size).transpose()?,
        };
        Ok(EngineOptions {
            provider: a.provider,
            nics: a.nics,
            interface: a.interface.clone(),
            efa_fabric: a.efa_fabric,
            gpu: a.gpu,
            poll: match a.poll {
                Poll::Adaptive => PollMode::Adaptive { spin: Duration::from_micros(a.spin_us) },
                Poll::Busy => PollMode::Busy,
            },
            pack_below,
        })
    }

    /// Builds the engine.
    pub fn build(&self) -> Result<TransferEngine, String> {
        let mut b = TransferEngine::builder()
            .provider(self.provider)
            .nics(self.nics)
            .poll_mode(self.poll)
            .efa_fabric(self.efa_fabric);
        if let Some(g) = self.gpu {
            b = b.for_gpu(g);
        }
        if let Some(i) = &self.interface {
            b = b.interface(i.clone());
        }
        if let Some(p) = self.pack_below {
            b = b.packing(p);
        }
        b.build().map_err(|e| format!("opening the engine: {e}"))
    }

    fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--provider".into(), self.provider.to_string(), "--nics".into(), self.nics.to_string()];
        if let Some(i) = &self.interface {
            v.extend(["--interface".into(), i.clone()]);
        }
        if self.efa_fabric != strait::EfaFabric::default() {
            v.extend(["--efa-fabric".into(), self.efa_fabric.name().into()]);
        }
        if let Some(g) = self.gpu {
            v.extend(["--gpu".into(), g.to_string()]);
        }
        match self.poll {
            PollMode::Busy => v.extend(["--poll".into(), "busy".into()]),
            PollMode::Adaptive { spin } => v.extend(["--spin-us".into(), spin.as_micros().to_string()]),
        }
        if let Some(p) = self.pack_below {
            v.extend(["--pack-below".into(), p.to_string()]);
        }
        v
    }
}

impl RunArgs {
    fn plan(&self, nics: usize) -> Result<Plan, String> {
        let baselines: Vec<&str> = self.baseline.split(',').map(str::trim).collect();
        for b in &baselines {
            if !["raw", "tcp", "none", "both", ""].contains(b) {
                return Err(format!("unknown baseline {b:?} (raw, tcp, both, none)"));
            }
        }
        let has = |name: &str| baselines.contains(&name) || baselines.contains(&"both");
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            return Err("--duration must be a positive number of seconds".into());
        }
        Ok(Plan {
            workloads: self
                .workloads
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()?,
            sizes: units::parse_sizes(&self.sizes)?,
            read_sizes: units::parse_sizes(&self.read_sizes)?,
            page_sizes: units::parse_sizes(&self.page_sizes)?,
            pages: self.pages.max(1),
            message_sizes: units::parse_sizes(&self.message_sizes)?,
            depth: self.depth,
            duration: Duration::from_secs_f64(self.duration),
            iters: self.iters.max(1),
            repeat: self.repeat.max(1),
            raw: has("raw"),
            tcp: has("tcp"),
            tcp_streams: self.tcp_streams.unwrap_or(nics.max(2)),
            progress: !self.no_progress,
            stats: self.stats,
            kv: {
                let (p, d) = self.tp.split_once(':').ok_or("--tp is P:D, e.g. 2:1")?;
                let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("bad --tp {:?}", self.tp));
                let layout = if self.kv_preset == "deepseek-v3" { "mla" } else { self.layout.as_str() };
                crate::kv::KvSpec::preset(
                    &self.kv_preset,
                    layout,
                    self.prompt_tokens,
                    (parse(p)?, parse(d)?),
                    !self.kv_whole,
                )?
            },
        })
    }

    fn output(&self, report: &Report) -> Result<(), String> {
        print!("{}", report.tables());
        if let Some(table) = &report.stats_table {
            print!("\n== engine stats (client)\n{table}");
        }
        if let Some(path) = &self.json {
            let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("\nJSON: {}", path.display());
        }
        if let Some(path) = &self.plot {
            std::fs::write(path, report.svg()).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("plot: {}", path.display());
        }
        Ok(())
    }
}

/// An address of this machine that another node can probably reach: the
/// first non-loopback IPv4 address that is up, else 127.0.0.1.
pub fn reachable_ip() -> IpAddr {
    let mut found = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs; each
    // node and its sockaddr are valid until then.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0 && ifa.ifa_flags & libc::IFF_LOOPBACK as u32 == 0;
            if up && !ifa.ifa_addr.is_null() && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

fn connect(server: &str, engine: &EngineArgs, run: &RunArgs) -> Result<(), String> {
    let options = EngineOptions::from_args(engine)?;
    let plan = run.plan(options.nics)?;
    let report = Client::connect(server, &options, plan)?.run()?;
    run.output(&report)
}

/// Starts `serve` as a child process on 127.0.0.1, reads its address line,
/// and runs the client against it.
/// Engine options for processes on this machine: tcp stays on `lo`.
fn loopback_options(engine: &EngineArgs) -> Result<EngineOptions, String> {
    let mut options = EngineOptions::from_args(engine)?;
    if options.interface.is_none() && matches!(options.provider, Provider::Auto | Provider::Tcp) {
        options.interface = Some("lo".into());
    }
    Ok(options)
}

fn loopback(engine: &EngineArgs, server_nics: Option<usize>, run: &RunArgs) -> Result<(), String> {
    let options = loopback_options(engine)?;
    let plan = run.plan(options.nics)?;
    let server_options = EngineOptions { nics: server_nics.unwrap_or(options.nics), ..options.clone() };
    let exe = std::env::current_exe().map_err(|e| format!("finding strait-bench itself: {e}"))?;
    let mut child = Command::new(exe)
        .args(["serve", "--bind", "127.0.0.1", "--port", "0", "--quiet"])
        .args(server_options.to_args())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the server process: {e}"))?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no server stdout")?);
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    let addr = line.trim().strip_prefix("strait-bench serve: listening on ").map(str::to_owned);
    let result = match addr {
        Some(addr) => {
            // Keep reading (and discarding) the rest so the child never blocks.
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            Client::connect(&addr, &options, plan).and_then(Client::run)
        }
        None => Err(format!("the server process did not start (it printed {:?})", line.trim())),
    };
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let report = result?;
    if !status.success() {
        return Err(format!("the server process failed: {status}"));
    }
    run.output(&report)
}

fn info() {
    println!("strait-bench {}", env!("CARGO_PKG_VERSION"));
    match strait::probe::libfabric_library() {
        Ok(path) => println!("libfabric: {path}"),
        Err(e) => println!("libfabric: unavailable: {e}"),
    }
    match strait::probe::libibverbs_library() {
        Ok(path) => println!("libibverbs: {path}"),
        Err(e) => println!("libibverbs: unavailable: {e}"),
    }
    for r in strait::probe::probe() {
        let name = r.kind.to_string();
        match r.domains {
            Ok(domains) if domains.is_empty() => println!("  {name:<5} unavailable: no domains"),
            Ok(domains) if r.kind == strait::ProviderKind::Verbs => {
                // One line per device: its port, or why it is unusable.
                println!("  {name:<5} available:");
                for (_, device) in domains {
                    println!("        {device}");
                }
            }
            Ok(domains) => {
                let list: Vec<String> = domains.iter().map(|(p, d)| format!("{d} ({p})")).collect();
                println!("  {name:<5} available: {}", list.join(", "));
            }
            Err(e) => println!("  {name:<5} unavailable: {e}"),
        }
    }
    // CUDA through the driver, loaded at run time: a machine without one
    // says why, as a normal condition.
    match strait::cuda::probe() {
        Err(e) => println!("CUDA: {e} (device memory unavailable; host memory only)"),
        Ok(info) => {
            println!(
                "CUDA: driver {} ({} GPU(s)); device memory is staged over tcp/shm",
                info.driver_version_string(),
                info.gpus.len()
            );
            for g in &info.gpus {
                println!(
                    "  GPU {}: {}, {:.1} GiB, PCI {}",
                    g.ordinal,
                    g.name,
                    g.memory as f64 / (1u64 << 30) as f64,
                    g.pci
                );
            }
        }
    }
    match strait::topology::Topology::discover() {
        Err(e) => println!("GPU -> NIC map: unavailable: {e}"),
        Ok(t) if t.gpus.is_empty() => println!(
            "GPU -> NIC map: empty: no NVIDIA GPU in /sys/bus/pci/devices ({} RDMA NIC(s) in /sys/class/infiniband)",
            t.nics.len()
        ),
        Ok(t) if t.nics.is_empty() => {
            println!("GPU -> NIC map: empty: {} GPU(s) but no RDMA NIC in /sys/class/infiniband", t.gpus.len())
        }
        Ok(t) => {
            println!("GPU -> NIC map (nearest RDMA NICs; --gpu N uses them):");
            for (g, (nics, near)) in t.gpu_nic_map() {
                println!("  GPU {g} ({}): {} ({near:?})", t.gpus[g].pci.address, nics.join(", "));
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Serve { engine, bind, port, forever, quiet } => EngineOptions::from_args(engine).and_then(|o| {
            server::serve(&o, &ServeOptions { bind: *bind, port: *port, forever: *forever, quiet: *quiet })
        }),
        Cmd::Connect { server, engine, run } => connect(server, engine, run),
        Cmd::Loopback { engine, server_nics, run } => loopback(engine, *server_nics, run),
        Cmd::Info => {
            info();
            Ok(())
        }
        Cmd::Moe { engine, moe } => loopback_options(engine).and_then(|o| moe::run(&o, moe)),
        Cmd::Cluster { cluster } => cluster::run(
            &EngineOptions {
                provider: Provider::Tcp,
                nics: 1,
                interface: None,
                efa_fabric: Default::default(),
                gpu: None,
                poll: PollMode::default(),
                pack_below: None,
            },
            cluster,
        ),
        Cmd::Weights { engine, weights } => loopback_options(engine).and_then(|o| weights::run(&o, weights)),
        Cmd::WeightsRank { engine, weights, role, rank } => {
            EngineOptions::from_args(engine).and_then(|o| weights::rank_main(&o, weights, role, *rank))
        }
        Cmd::MoeRank { engine, moe, rank } => {
            EngineOptions::from_args(engine).and_then(|o| moe::rank_main(&o, moe, *rank))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
