//! Fault tests on the emulated cluster (`scripts/cluster/netns.sh`): one
//! network namespace per node, one veth link per NIC, libfabric tcp over
//! them. As root only: without it (or without `ip`) each test prints why
//! it skipped; `STRAIT_REQUIRE_CLUSTER=1` turns the skip into a failure.
//!
//! Every process of a node runs inside its namespace: the test binary
//! re-runs itself there (`cluster_node_process`) and talks to this one over
//! stdin and stdout. Every test removes its namespaces when it ends, and
//! checks that none is left.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::LineChild;
use strait::{Access, MrDesc, PollMode, Provider, TransferEngine};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster/netns.sh");

/// Whether the emulated cluster can be built here, or why not.
fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces, veth links and qdiscs need it)".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Err(format!("no `{tool}` (package iproute2)"));
        }
    }
    Ok(())
}

/// One cluster at a time: the timing assertions assume the machine's
/// cores are this test's.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Skips (printing why) unless the cluster can be built.
fn skip() -> bool {
    match available() {
        Ok(()) => false,
        Err(reason) => {
            if std::env::var("STRAIT_REQUIRE_CLUSTER").is_ok_and(|v| v == "1") {
                panic!("STRAIT_REQUIRE_CLUSTER=1 but the emulated cluster is unavailable: {reason}");
            }
            common::skipped("emulated-cluster fault tests", &reason);
            true
        }
    }
}

fn script(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash").arg(SCRIPT).args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("netns.sh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(String::from)
        .collect()
}

/// An emulated cluster, removed when dropped.
struct Cluster {
    prefix: String,
}

impl Cluster {
    fn up(name: &str, args: &[&str]) -> Cluster {
        let prefix = format!("st{}{name}", std::process::id() % 10_000);
        // A run killed earlier may have left this prefix behind.
        let _ = script(&["down", "--prefix", &prefix]);
        let mut all = vec!["up", "--prefix", prefix.as_str()];
        all.extend_from_slice(args);
        script(&all).unwrap_or_else(|e| panic!("building the cluster: {e}"));
        Cluster { prefix }
    }

    fn ns(&self, node: u32) -> String {
        format!("{}-n{node}", self.prefix)
    }

    fn link(&self, node: u32, nic: u32, state: &str) {
        script(&["link", "--prefix", &self.prefix, &node.to_string(), &nic.to_string(), state]).unwrap();
    }

    /// Starts `role` of `cluster_node_process` inside `node`'s namespace.
    fn spawn(&self, node: u32, role: &str, env: &[(&str, String)]) -> LineChild {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)])
            .arg(exe)
            .args(["--exact", "cluster_node_process", "--nocapture", "--test-threads=1"])
            .env("STRAIT_CLUSTER_ROLE", role);
        for (k, v) in env {
            cmd.env(k, v);
        }
        LineChild::spawn(&mut cmd)
    }

    /// SIGKILLs every process inside `node`'s namespace.
    fn kill_node(&self, node: u32) {
        let out = Command::new("ip").args(["netns", "pids", &self.ns(node)]).output().unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let r = script(&["down", "--prefix", &self.prefix]);
        let left = namespaces_with(&self.prefix);
        if !std::thread::panicking() {
            r.expect("removing the cluster");
            assert!(left.is_empty(), "namespaces left behind: {left:?}");
        }
    }
}

fn node_engine(nics: usize, timeout: Duration) -> TransferEngine {
    let interfaces: Vec<String> = (0..nics).map(|k| format!("nic{k}")).collect();
    TransferEngine::builder()
        .provider(Provider::Tcp)
        .interface(interfaces.join(","))
        .poll_mode(PollMode::default())
        .request_timeout(timeout)
        .build()
        .unwrap_or_else(|e| panic!("an engine on {interfaces:?}: {e}"))
}

fn read_line() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// The node side. `target`: registers `STRAIT_CLUSTER_SLOTS` slots of
/// `STRAIT_CLUSTER_SLOT` bytes, prints the descriptor, and on each `check
/// N` line waits for N immediates (value 9) and prints the digest of every
/// slot. `writer`: reads target descriptors, then on `write T SEQ` writes
/// slot SEQ's pattern to target T (immediate 9) and prints its outcome and
/// its time when it completes; `stream T MS` writes small requests to T
/// every `MS` ms until a `stop` line, printing each outcome.
#[test]
fn cluster_node_process() {
    let Ok(role) = std::env::var("STRAIT_CLUSTER_ROLE") else { return };
    let nics: usize = std::env::var("STRAIT_CLUSTER_NICS").unwrap().parse().unwrap();
    let slot: u64 = std::env::var("STRAIT_CLUSTER_SLOT").unwrap().parse().unwrap();
    let slots: u64 = std::env::var("STRAIT_CLUSTER_SLOTS").unwrap().parse().unwrap();
    let engine = node_engine(nics, Duration::from_secs(2));
    match role.as_str() {
        "target" => {
            let region = engine.alloc(slot * slots, Access::REMOTE_WRITE).unwrap();
            println!("DESC {}", region.descriptor());
            loop {
                let l = read_line();
                let Some(args) = l.strip_prefix("check ") else { return };
                let (n, ms) = args.split_once(' ').unwrap_or((args, "60000"));
                let n: u64 = n.parse().unwrap();
                let c = engine.expect_imm(9, n).unwrap();
                let r = c.wait_timeout(Duration::from_millis(ms.parse().unwrap()));
                let digests: Vec<String> = (0..slots)
                    .map(|i| {
                        let b = region.to_vec(i * slot, slot).unwrap();
                        format!("{:x}", b.iter().fold(0u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)))
                    })
                    .collect();
                println!("CHECKED {r:?} {}", digests.join(","));
            }
        }
        _ => {
            let n: usize = std::env::var("STRAIT_CLUSTER_TARGETS").unwrap().parse().unwrap();
            let targets: Vec<MrDesc> = (0..n).map(|_| read_line().parse().unwrap()).collect();
            let src = engine.alloc(slot * slots, Access::LOCAL).unwrap();
            for i in 0..slots {
                src.write_at(i * slot, &common::pattern(slot as usize, i)).unwrap();
            }
            let start = Instant::now();
            loop {
                let l = read_line();
                let words: Vec<&str> = l.split_whitespace().collect();
                match words.as_slice() {
                    ["write", t, seq] => {
                        let (t, seq): (usize, u64) = (t.parse().unwrap(), seq.parse().unwrap());
                        let r = engine.write(&src, seq * slot, &targets[t], seq * slot, slot, Some(9)).unwrap().wait();
                        println!("WROTE {seq} {}", r.map_or_else(|e| format!("err {e}"), |()| "ok".into()));
                    }
                    ["stream", t, every] => {
                        let (t, every): (usize, u64) = (t.parse().unwrap(), every.parse().unwrap());
                        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let stopper = stop.clone();
                        let waiter = std::thread::spawn(move || {
                            read_line();
                            stopper.store(true, std::sync::atomic::Ordering::Relaxed);
                        });
                        let mut seq = 0u64;
                        let mut pending = Vec::new();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let at = start.elapsed().as_millis();
                            let s = seq % slots;
                            let tr = engine.write(&src, s * slot, &targets[t], s * slot, slot, None).unwrap();
                            let posted = Instant::now();
                            tr.on_complete(move |r| {
                                let took = posted.elapsed().as_millis();
                                let what = match r {
                                    Ok(()) => "ok".to_string(),
                                    Err(e) => format!("err {e}"),
                                };
                                println!("REQ {seq} at {at} took {took} {what}");
                            });
                            pending.push(tr);
                            seq += 1;
                            std::thread::sleep(Duration::from_millis(every));
                        }
                        waiter.join().unwrap();
                        for t in &pending {
                            let _ = t.wait_timeout(Duration::from_secs(10));
                        }
                        println!("STREAMED {seq}");
                    }
                    _ => return,
                }
            }
        }
    }
}

fn env(nics: usize, slot: u64, slots: u64, targets: usize) -> Vec<(&'static str, String)> {
    vec![
        ("STRAIT_CLUSTER_NICS", nics.to_string()),
        ("STRAIT_CLUSTER_SLOT", slot.to_string()),
        ("STRAIT_CLUSTER_SLOTS", slots.to_string()),
        ("STRAIT_CLUSTER_TARGETS", targets.to_string()),
    ]
}

/// One request outcome of a `stream`: (submitted at ms, took ms, ok, error).
fn parse_req(line: &str) -> (u64, u64, bool, String) {
    // "SEQ at AT took TOOK ok|err ..."
    let w: Vec<&str> = line.splitn(6, ' ').collect();
    (w[2].parse().unwrap(), w[4].parse().unwrap(), w[5] == "ok", w[5].to_string())
}

/// NIC 1 of the writer's node goes down for 5 s in the middle of a stream
/// of small writes (each goes whole to one NIC pair; consecutive ones
/// alternate): the writes on NIC 1 fail within the request timeout (2 s)
/// naming it, the writes on NIC 0 keep succeeding meanwhile, and once the
/// link is back new writes succeed on both. The engine does not route
/// around the dead NIC: writes keep being assigned to it and fail.
#[test]
fn a_link_down_fails_its_requests_within_the_timeout_and_the_other_nic_carries_on() {
    if skip() {
        return;
    }
    let _serial = serial();
    let c = Cluster::up("ld", &["--nodes", "2", "--nics", "2", "--link", "1gbit"]);
    let mut target = c.spawn(1, "target", &env(2, 64 << 10, 16, 1));
    let desc = target.line("DESC ");
    let mut writer = c.spawn(0, "writer", &env(2, 64 << 10, 16, 1));
    writer.say(&desc);
    writer.say("stream 0 20");
    std::thread::sleep(Duration::from_millis(1500));
    let down = Instant::now();
    c.link(0, 1, "down");
    std::thread::sleep(Duration::from_secs(5));
    c.link(0, 1, "up");
    let up = down.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(4));
    writer.say("stop");
    let lines = writer.lines_until("REQ ", "STREAMED");
    let reqs: Vec<(u64, u64, bool, String)> = lines.iter().map(|l| parse_req(l)).collect();
    let first_at = reqs.iter().map(|r| r.0).min().unwrap();
    let down_at = first_at + 1500;
    let up_at = down_at + up;
    let during: Vec<_> = reqs.iter().filter(|r| r.0 > down_at + 200 && r.0 + 200 < up_at).collect();
    let ok_during = during.iter().filter(|r| r.2).count();
    let failed: Vec<_> = reqs.iter().filter(|r| !r.2).collect();
    eprintln!(
        "link down {}..{} ms: {} requests meanwhile, {} ok; {} failed in all, slowest failure {} ms",
        down_at,
        up_at,
        during.len(),
        ok_during,
        failed.len(),
        failed.iter().map(|r| r.1).max().unwrap_or(0)
    );
    assert!(ok_during * 3 >= during.len(), "the other NIC's writes stopped too: {ok_during} of {}", during.len());
    assert!(!failed.is_empty(), "no write failed while its link was down");
    for f in &failed {
        assert!(f.1 <= 2000 + 1500, "a write failed only after {} ms (timeout 2 s): {}", f.1, f.3);
        assert!(f.3.contains("NIC 1"), "the failure does not name the NIC: {}", f.3);
    }
    // Once the link is back (and the engine has reset its path), writes
    // succeed again, on both NICs.
    let after: Vec<_> = reqs.iter().filter(|r| r.0 > up_at + 2500).collect();
    assert!(after.len() >= 10, "too few writes after the link came back");
    assert!(after.iter().all(|r| r.2), "writes still fail after the link came back: {:?}", after.iter().find(|r| !r.2));
}

/// 1% loss and 1 ms of delay on the target's link: 24 writes of 256 KiB
/// with an immediate each all land byte-exact, and exactly 24 immediates
/// arrive (tcp retransmits; the engine adds no loss and no duplicates).
#[test]
fn loss_and_delay_on_a_link_change_no_byte_and_no_immediate() {
    if skip() {
        return;
    }
    let _serial = serial();
    let delay_ok = Command::new("sh").args(["-c", "command -v iptables && command -v python3"]).output();
    let mut args = vec!["--nodes", "2", "--nics", "1", "--link", "1gbit", "--loss", "1%"];
    if delay_ok.is_ok_and(|o| o.status.success()) {
        args.extend(["--delay", "1ms"]);
    } else {
        common::skipped("the 1 ms delay of the loss test", "no iptables or python3 (package iptables)");
    }
    let c = Cluster::up("ls", &args);
    let (slot, slots) = (256u64 << 10, 24u64);
    let mut target = c.spawn(1, "target", &env(1, slot, slots, 1));
    let desc = target.line("DESC ");
    let mut writer = c.spawn(0, "writer", &env(1, slot, slots, 1));
    writer.say(&desc);
    target.say(&format!("check {slots}"));
    for seq in 0..slots {
        writer.say(&format!("write 0 {seq}"));
        assert_eq!(writer.line(&format!("WROTE {seq} ")), "ok");
    }
    let checked = target.line("CHECKED ");
    let (result, digests) = checked.split_once(' ').unwrap();
    assert_eq!(result, "Ok(())", "the immediates");
    let want: Vec<String> = (0..slots)
        .map(|i| {
            let b = common::pattern(slot as usize, i);
            format!("{:x}", b.iter().fold(0u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)))
        })
        .collect();
    assert_eq!(digests, want.join(","), "a slot's bytes differ");
    // No more immediates than writes: a second check of one more times out.
    target.say("check 1 1500");
    let extra = target.line("CHECKED ");
    assert!(extra.starts_with("Err(Timeout"), "an extra immediate arrived: {extra}");
}

/// Three nodes: node 0 writes to nodes 1 and 2; node 2 is SIGKILLed. Its
/// writes fail within the bound; node 1's keep succeeding.
#[test]
fn a_killed_node_fails_its_peers_requests_within_the_bound_and_no_other() {
    if skip() {
        return;
    }
    let _serial = serial();
    let c = Cluster::up("kn", &["--nodes", "3", "--nics", "2", "--link", "1gbit"]);
    let (slot, slots) = (256u64 << 10, 8u64);
    let mut t1 = c.spawn(1, "target", &env(2, slot, slots, 1));
    let mut t2 = c.spawn(2, "target", &env(2, slot, slots, 1));
    let (d1, d2) = (t1.line("DESC "), t2.line("DESC "));
    let mut writer = c.spawn(0, "writer", &env(2, slot, slots, 2));
    writer.say(&d1);
    writer.say(&d2);
    for t in 0..2 {
        writer.say(&format!("write {t} 0"));
        assert_eq!(writer.line("WROTE 0 "), "ok");
    }
    c.kill_node(2);
    drop(t2);
    let killed = Instant::now();
    writer.say("write 1 1");
    let r = writer.line("WROTE 1 ");
    let took = killed.elapsed();
    assert!(r.starts_with("err "), "a write to the killed node: {r}");
    assert!(took < Duration::from_secs(5), "the write to the killed node failed after {took:?}");
    for seq in 2..6 {
        writer.say(&format!("write 0 {seq}"));
        assert_eq!(writer.line(&format!("WROTE {seq} ")), "ok", "node 1 is affected");
    }
    eprintln!("a killed node's write failed in {took:?}; node 1 unaffected");
}
