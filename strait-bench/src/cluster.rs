//! `strait-bench cluster`: runs a workload on an emulated cluster built on
//! this machine by `scripts/cluster/netns.sh` (embedded here): one network
//! namespace per node, one veth link per NIC with its own address and
//! qdiscs (tbf rate, delay, loss), libfabric tcp over them.
//!
//! * `-- connect ARGS`: `serve` on node 1 and `connect ARGS` on node 0 (the
//!   loopback workloads: write, paged, read, latencies), each engine with
//!   one NIC per link of its node.
//! * `-- moe ARGS`, `-- weights ARGS`: their rank processes spread over the
//!   nodes, process `i` on node `i mod nodes`.
//!
//! The cluster is removed when the run ends, fails, or is interrupted
//! (SIGINT, SIGTERM, SIGHUP); a run after a killed one first removes what
//! the killed one left under the same `--prefix`. A `--json` file of the
//! workload gets the cluster's parameters under `"cluster"`.

use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::EngineOptions;

const NETNS_SH: &str = include_str!("../../scripts/cluster/netns.sh");
const NFQ_DELAY_PY: &str = include_str!("../../scripts/cluster/nfq_delay.py");

/// Set by the signal handler: the run is to stop and clean up.
static STOP: AtomicBool = AtomicBool::new(false);

/// The emulated cluster and what runs on it.
#[derive(Args, Debug, Clone, Serialize)]
pub struct ClusterArgs {
    /// Nodes (namespaces).
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// NICs (links) per node: one count, or one per node ("4,2"; the last
    /// repeats).
    #[arg(long, default_value = "1")]
    pub nics: String,
    /// Rate of every link, both directions (tc units: 2gbit, 400mbit).
    #[arg(long)]
    pub link: Option<String>,
    /// One-way delay of packets into each node (20us, 1ms).
    #[arg(long)]
    pub delay: Option<String>,
    /// Loss of packets into each node, percent.
    #[arg(long)]
    pub loss: Option<String>,
    /// flat (one switch, any NIC reaches any) or rails (NIC k reaches NIC k).
    #[arg(long, default_value = "flat")]
    pub fabric: String,
    /// Name prefix of the namespaces.
    #[arg(long, default_value = "sbc")]
    pub prefix: String,
    /// A fault at a time after the workload starts: "2s link NODE NIC
    /// down|up", "1s impair NODE NIC --loss 1% --delay 1ms", "3s kill
    /// NODE". Repeatable.
    #[arg(long = "fault")]
    pub faults: Vec<String>,
    /// The workload: `connect ARGS`, `moe ARGS` or `weights ARGS`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

impl ClusterArgs {
    fn nic_counts(&self) -> Result<Vec<usize>, String> {
        let counts: Vec<usize> = self
            .nics
            .split(',')
            .map(|n| n.trim().parse().map_err(|_| format!("--nics {:?}: counts, comma-separated", self.nics)))
            .collect::<Result<_, _>>()?;
        if counts.iter().any(|&n| n == 0 || n > 16) {
            return Err("--nics: 1 to 16 per node".into());
        }
        Ok(counts)
    }
}

/// NICs of `node`.
fn nics_of(counts: &[usize], node: u32) -> usize {
    counts[(node as usize).min(counts.len() - 1)]
}

/// Node `node`'s engine options: tcp over its links.
pub fn node_options(base: &EngineOptions, nics: usize) -> EngineOptions {
    EngineOptions {
        provider: strait::Provider::Tcp,
        nics,
        interface: Some((0..nics).map(|k| format!("nic{k}")).collect::<Vec<_>>().join(",")),
        efa_fabric: Default::default(),
        gpu: None,
        poll: base.poll,
        pack_below: base.pack_below,
    }
}

/// Where the rank processes of `moe` and `weights` run: set by `cluster`
/// for the workload it starts, as `PREFIX;NODES;NICS`.
const PLACEMENT: &str = "STRAIT_BENCH_CLUSTER";

/// For `moe` and `weights`: the command that starts rank process `i`
/// (on node `i mod nodes` when run under `cluster`, else here) and the
/// engine options to give it.
pub fn rank_command(exe: &std::path::Path, i: usize, options: &EngineOptions) -> (Command, EngineOptions) {
    let placement = std::env::var(PLACEMENT).ok().and_then(|p| {
        let mut it = p.split(';');
        let (prefix, nodes, nics) = (it.next()?.to_string(), it.next()?.parse::<u32>().ok()?, it.next()?.to_string());
        let counts: Vec<usize> = nics.split(',').filter_map(|n| n.parse().ok()).collect();
        (!counts.is_empty() && nodes > 0).then_some((prefix, nodes, counts))
    });
    match placement {
        Some((prefix, nodes, counts)) => {
            let node = i as u32 % nodes;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &format!("{prefix}-n{node}")]).arg(exe);
            (cmd, node_options(options, nics_of(&counts, node)))
        }
        None => (Command::new(exe), options.clone()),
    }
}

/// The embedded scripts, written to a private directory.
struct Scripts {
    dir: std::path::PathBuf,
}

impl Scripts {
    fn write() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("strait-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::fs::write(dir.join("netns.sh"), NETNS_SH).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("nfq_delay.py"), NFQ_DELAY_PY).map_err(|e| e.to_string())?;
        Ok(Scripts { dir })
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("bash")
            .arg(self.dir.join("netns.sh"))
            .args(args)
            .output()
            .map_err(|e| format!("running netns.sh: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("netns.sh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster while it is up: removed on drop.
struct Up<'a> {
    scripts: &'a Scripts,
    prefix: String,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        match self.scripts.run(&["down", "--prefix", &self.prefix]) {
            Ok(_) => eprintln!("strait-bench cluster: removed the emulated cluster ({})", self.prefix),
            Err(e) => eprintln!("strait-bench cluster: removing the emulated cluster: {e}"),
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// One scheduled fault.
#[derive(Debug, Clone)]
struct Fault {
    at: Duration,
    words: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num.parse().map_err(|_| format!("bad time {s:?} (e.g. 2s, 500ms)"))?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        _ => return Err(format!("bad time unit in {s:?} (s, ms, us)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    let words: Vec<String> = s.split_whitespace().map(String::from).collect();
    let bad =
        || format!("--fault {s:?}: \"AT link NODE NIC down|up\", \"AT impair NODE NIC OPTIONS\" or \"AT kill NODE\"");
    if words.len() < 3 {
        return Err(bad());
    }
    let at = parse_duration(&words[0])?;
    match words[1].as_str() {
        "link" if words.len() == 5 => {}
        "impair" if words.len() >= 4 => {}
        "kill" if words.len() == 3 => {}
        _ => return Err(bad()),
    }
    Ok(Fault { at, words: words[1..].to_vec() })
}

/// Runs `cluster`: builds it, runs the workload with its faults, removes it.
pub fn run(base: &EngineOptions, args: &ClusterArgs) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("strait-bench cluster must run as root: it creates network namespaces, veth links and \
                    traffic-control qdiscs (try sudo)"
            .into());
    }
    let counts = args.nic_counts()?;
    let faults = args.faults.iter().map(|f| parse_fault(f)).collect::<Result<Vec<_>, _>>()?;
    let (workload, rest) = args.command.split_first().ok_or("no workload given (connect, moe or weights)")?;
    if !["connect", "moe", "weights"].contains(&workload.as_str()) {
        return Err(format!("unknown workload {workload:?} (connect, moe or weights)"));
    }
    if workload == "connect" && args.nodes < 2 {
        return Err("connect needs 2 nodes at least".into());
    }
    let scripts = Scripts::write()?;
    let _ = scripts.run(&["down", "--prefix", &args.prefix]);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let nodes = args.nodes.to_string();
    let mut up_args =
        vec!["up", "--prefix", args.prefix.as_str(), "--nodes", nodes.as_str(), "--nics", args.nics.as_str()];
    up_args.extend(["--fabric", args.fabric.as_str()]);
    for (flag, v) in [("--link", &args.link), ("--delay", &args.delay), ("--loss", &args.loss)] {
        if let Some(v) = v {
            up_args.extend([flag, v.as_str()]);
        }
    }
    scripts.run(&up_args)?;
    let up = Up { scripts: &scripts, prefix: args.prefix.clone() };
    eprintln!(
        "strait-bench cluster: {} nodes, NICs {}, {} fabric, link {}, delay {}, loss {} (namespaces {}-n*)",
        args.nodes,
        args.nics,
        args.fabric,
        args.link.as_deref().unwrap_or("unlimited"),
        args.delay.as_deref().unwrap_or("none"),
        args.loss.as_deref().unwrap_or("none"),
        args.prefix
    );
    let exe = std::env::current_exe().map_err(|e| format!("finding strait-bench itself: {e}"))?;
    let mut server = None;
    let mut client = match workload.as_str() {
        "connect" => {
            let (child, addr) = start_server(&exe, &up.prefix, &node_options(base, nics_of(&counts, 1)))?;
            server = Some(child);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &format!("{}-n0", up.prefix)])
                .arg(&exe)
                .arg("connect")
                .arg(addr)
                .args(node_options(base, nics_of(&counts, 0)).to_args())
                .args(rest);
            cmd.spawn().map_err(|e| format!("starting the client: {e}"))?
        }
        w => Command::new(&exe)
            .arg(w)
            .args(rest)
            .env(PLACEMENT, format!("{};{};{}", up.prefix, args.nodes, args.nics))
            .spawn()
            .map_err(|e| format!("starting {w}: {e}"))?,
    };
    let status = supervise(&mut client, &faults, &up);
    if let Some(mut s) = server {
        let _ = s.kill();
        let _ = s.wait();
    }
    let status = status?;
    if let Some(path) = json_path(rest) {
        annotate(&path, args)?;
    }
    drop(up);
    if !status.success() {
        return Err(format!("the workload failed: {status}"));
    }
    Ok(())
}

/// Starts `serve` on node 1; returns it and the address it listens on.
fn start_server(exe: &std::path::Path, prefix: &str, options: &EngineOptions) -> Result<(Child, String), String> {
    use std::io::BufRead;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-n1")])
        .arg(exe)
        .args(["serve", "--bind", "10.77.0.2", "--port", "0", "--quiet"])
        .args(options.to_args())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?;
    let mut out = std::io::BufReader::new(child.stdout.take().ok_or("no server stdout")?);
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    match line.trim().strip_prefix("strait-bench serve: listening on ") {
        Some(a) => Ok((child, a.to_string())),
        None => {
            let _ = child.kill();
            Err(format!("the server did not start (it printed {:?})", line.trim()))
        }
    }
}

/// Waits for the workload, applying the faults on time; on a signal, kills
/// it and returns an error (the cluster is removed by the caller's drop).
fn supervise(child: &mut Child, faults: &[Fault], up: &Up<'_>) -> Result<ExitStatus, String> {
    let start = Instant::now();
    let mut next = 0;
    let mut order: Vec<&Fault> = faults.iter().collect();
    order.sort_by_key(|f| f.at);
    loop {
        if STOP.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("interrupted".into());
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        while next < order.len() && start.elapsed() >= order[next].at {
            let f = order[next];
            next += 1;
            let r = apply(f, up);
            eprintln!(
                "strait-bench cluster: at {:.2} s: {} ({})",
                start.elapsed().as_secs_f64(),
                f.words.join(" "),
                r.map_or_else(|e| format!("failed: {e}"), |()| "done".into())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn apply(f: &Fault, up: &Up<'_>) -> Result<(), String> {
    let w: Vec<&str> = f.words.iter().map(String::as_str).collect();
    match w[0] {
        "kill" => {
            let ns = format!("{}-n{}", up.prefix, w[1].trim_start_matches('n'));
            let out = Command::new("ip").args(["netns", "pids", &ns]).output().map_err(|e| e.to_string())?;
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let pid: libc::pid_t = pid.parse().map_err(|_| format!("bad pid {pid}"))?;
                // SAFETY: kill has no memory-safety preconditions; the pids
                // are those of processes inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            Ok(())
        }
        cmd => {
            let mut args = vec![cmd, "--prefix", up.prefix.as_str()];
            args.extend_from_slice(&w[1..]);
            up.scripts.run(&args).map(|_| ())
        }
    }
}

fn json_path(rest: &[String]) -> Option<std::path::PathBuf> {
    let i = rest.iter().position(|a| a == "--json")?;
    rest.get(i + 1).map(std::path::PathBuf::from)
}

/// Adds the cluster's parameters to the workload's JSON.
fn annotate(path: &std::path::Path, args: &ClusterArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let cluster = serde_json::json!({
        "nodes": args.nodes,
        "nics": args.nics,
        "fabric": args.fabric,
        "link": args.link,
        "delay": args.delay,
        "loss": args.loss,
        "faults": args.faults,
    });
    if let Some(map) = v.as_object_mut() {
        map.insert("cluster".into(), cluster);
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
}
