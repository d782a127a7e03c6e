//! strait-bench end to end: loopback over tcp and shm with both baselines,
//! serve and connect started as separate processes, JSON and SVG output,
//! `info`, and argument errors. Short durations: these check that the tool
//! works, not how fast.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_strait-bench");
const QUICK: &[&str] = &["--duration", "0.05", "--iters", "50", "--no-progress"];

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("run strait-bench");
    if !out.status.success() {
        panic!(
            "strait-bench {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("strait-bench-test-{}-{name}", std::process::id()))
}

/// Checks the JSON report: every workload present, positive figures, and
/// the drivers expected.
fn check_json(path: &PathBuf, drivers: &[&str]) {
    let text = std::fs::read_to_string(path).expect("JSON written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["tool"], "strait-bench");
    assert!(v["poll"].as_str().is_some_and(|p| p == "busy" || p.starts_with("adaptive:")), "poll mode in {text}");
    let rows = v["rows"].as_array().expect("rows");
    for workload in ["write", "paged", "read", "imm_latency", "send_latency"] {
        assert!(rows.iter().any(|r| r["workload"] == workload), "no {workload} rows in {text}");
    }
    for d in drivers {
        assert!(rows.iter().any(|r| r["driver"] == *d), "no {d} rows in {text}");
    }
    for r in rows {
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
        if r["workload"].as_str().unwrap().ends_with("latency") {
            let p50 = r["rtt_p50_us"].as_f64().unwrap();
            let p90 = r["rtt_p90_us"].as_f64().unwrap();
            assert!(p50 > 0.0 && p50 <= p90 && p90 <= r["rtt_p99_us"].as_f64().unwrap(), "{r}");
        } else {
            assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
        }
    }
}

fn check_svg(path: &PathBuf, lines: usize) {
    let text = std::fs::read_to_string(path).expect("SVG written");
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let polylines = doc.descendants().filter(|n| n.has_tag_name("polyline")).count();
    assert_eq!(polylines, lines, "one line per configuration in {text}");
}

#[test]
fn loopback_tcp_with_both_baselines_writes_json_and_svg() {
    let (json, svg) = (temp("tcp.json"), temp("tcp.svg"));
    let mut args = vec!["loopback", "--provider", "tcp", "--nics", "2", "--server-nics", "1", "--sizes", "4K,1M"];
    args.extend(QUICK);
    args.extend(["--json", json.to_str().unwrap(), "--plot", svg.to_str().unwrap()]);
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for table in ["== write", "== paged", "== read", "== imm_latency", "== send_latency", "strait/raw", "tcp-2 GB/s"] {
        assert!(stdout.contains(table), "{table} missing from:\n{stdout}");
    }
    check_json(&json, &["strait", "raw", "tcp-1", "tcp-2"]);
    // write: strait, raw, tcp-1, tcp-2; read: strait, raw.
    check_svg(&svg, 6);
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(svg);
}

#[test]
fn loopback_shm_with_both_baselines() {
    let json = temp("shm.json");
    let mut args = vec!["loopback", "--provider", "shm", "--sizes", "64K"];
    args.extend(QUICK);
    args.extend(["--json", json.to_str().unwrap()]);
    let out = run(&args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("| shm |"));
    check_json(&json, &["strait", "raw", "tcp-1", "tcp-2"]);
    let _ = std::fs::remove_file(json);
}

#[test]
fn serve_and_connect_as_separate_processes() {
    let mut server = Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1", "--port", "0", "--provider", "tcp", "--interface", "lo", "--nics", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start server");
    let mut stdout = BufReader::new(server.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr = first.trim().strip_prefix("strait-bench serve: listening on ").expect("address line").to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{first}");

    let mut args =
        vec!["connect", &addr, "--provider", "tcp", "--interface", "lo", "--sizes", "64K", "--baseline", "raw"];
    args.extend(QUICK);
    let client = run(&args);
    let client_out = String::from_utf8_lossy(&client.stdout);
    assert!(client_out.contains("client 1 NIC(s) -> server 2 NIC(s)"), "{client_out}");

    let status = server.wait().unwrap();
    let mut server_out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut server_out).unwrap();
    assert!(status.success(), "server: {status}\n{server_out}");
    // Both ends print the results.
    assert!(server_out.contains("== write") && server_out.contains("== send_latency"), "{server_out}");
}

#[test]
fn info_reports_providers_and_unavailable_backends() {
    let out = run(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tcp   available"), "{text}");
    assert!(text.contains("efa   unavailable"), "{text}");
    // Either a device line per verbs device, or the reason there is none
    // (here: no kernel RDMA support, or no device).
    let verbs = text.lines().find(|l| l.trim_start().starts_with("verbs ")).expect("a verbs line");
    let devices = std::path::Path::new("/sys/class/infiniband").read_dir().map(|d| d.count()).unwrap_or(0);
    if devices == 0 {
        let reason_given = verbs.contains("unavailable: no verbs devices") || verbs.contains("libibverbs not found");
        assert!(reason_given, "{text}");
    } else {
        assert!(verbs.contains("available"), "{text}");
    }
    // CUDA's line: the driver and GPUs, or why there is none.
    let cuda = text.lines().find(|l| l.starts_with("CUDA: ")).expect("a CUDA line");
    match strait::cuda::probe() {
        Ok(_) => assert!(cuda.contains("driver"), "{text}"),
        Err(e) => assert!(cuda.contains(&e.to_string()), "{text}"),
    }
    assert!(text.contains("GPU -> NIC map"), "{text}");
}

#[test]
fn bad_arguments_are_reported() {
    for args in [
        &["loopback", "--workloads", "bogus"][..],
        &["loopback", "--sizes", "4X"],
        &["loopback", "--baseline", "ucx"],
        &["loopback", "--message-sizes", "1M"],
        &["connect", "127.0.0.1:1", "--provider", "tcp", "--interface", "lo"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("strait-bench: "), "{args:?}: {err}");
    }
}

#[test]
fn kv_workload_with_its_baselines() {
    for extra in
        [&["--layout", "nhd"][..], &["--tp", "2:1", "--kv-whole"], &["--kv-preset", "deepseek-v3", "--tp", "1:2"]]
    {
        let json = temp("kv.json");
        let mut args = vec!["loopback", "--provider", "tcp", "--workloads", "kv", "--prompt-tokens", "256"];
        args.extend(["--baseline", "none", "--json", json.to_str().unwrap()]);
        args.extend(QUICK);
        args.extend(extra);
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("== kv") && stdout.contains("contiguous"), "{stdout}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows = v["rows"].as_array().unwrap();
        let drivers: Vec<&str> = rows.iter().filter_map(|r| r["driver"].as_str()).collect();
        assert!(drivers.contains(&"strait") && drivers.contains(&"contiguous"), "{drivers:?}");
        // The per-block baseline runs where a block's K or V is contiguous
        // (same TP); the same-TP one where a TP split moves the same bytes
        // (not MLA's replicated latents).
        assert_eq!(drivers.contains(&"per-block"), extra == ["--layout", "nhd"], "{drivers:?}");
        assert_eq!(drivers.contains(&"same-TP"), extra == ["--tp", "2:1", "--kv-whole"], "{drivers:?}");
        for r in rows {
            assert!(r["bytes"].as_u64().unwrap() > 0 && r["seconds"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["cpu_us_per_layer"].as_f64().is_some() && r["label"].as_str().is_some(), "{r}");
        }
        let _ = std::fs::remove_file(&json);
    }
    let out = Command::new(BIN).args(["loopback", "--workloads", "kv", "--kv-preset", "gpt-9"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown KV preset"));
}

#[test]
fn moe_workload_with_its_baseline() {
    let (json, svg) = (temp("moe.json"), temp("moe.svg"));
    let args = [
        "moe",
        "--provider",
        "tcp",
        "--ranks",
        "2",
        "--tokens",
        "16",
        "--hidden",
        "256",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--iters",
        "3",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ];
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("== moe") && stdout.contains("naive") && stdout.contains("DeepEP"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in rows {
        assert!(
            r["p50_us"].as_f64().unwrap() > 0.0 && r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap(),
            "{r}"
        );
    }
    assert!(v["receive_bytes"].as_u64().unwrap() > 0);
    roxmltree::Document::parse(&std::fs::read_to_string(&svg).unwrap()).expect("well-formed SVG");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    let out = Command::new(BIN).args(["moe", "--provider", "tcp", "--ranks", "3", "--experts", "8"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("multiple"));
}

#[test]
fn weights_workload_with_its_baseline() {
    let json = temp("weights.json");
    for mode in ["direct", "broadcast"] {
        let args = [
            "weights",
            "--provider",
            "tcp",
            "--sources",
            if mode == "direct" { "2" } else { "1" },
            "--dests",
            "2",
            "--total-mib",
            "8",
            "--hidden",
            "256",
            "--steps",
            "2",
            "--mode",
            mode,
            "--json",
            json.to_str().unwrap(),
        ];
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("== weights") && stdout.contains("naive"), "{stdout}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows.iter().all(|r| r["ms"].as_f64().unwrap() > 0.0), "{rows:?}");
        assert!(v["plan_writes"].as_u64().unwrap() > 0 && v["dest_bytes"].as_u64().unwrap() > 0);
    }
    let _ = std::fs::remove_file(&json);
    let out = Command::new(BIN).args(["weights", "--mode", "tree"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--mode"));
}

#[test]
fn cluster_refuses_an_unknown_workload_and_bad_arguments() {
    let out = Command::new(BIN).args(["cluster", "--", "dance"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // As root the workload is refused; otherwise the missing root is.
    assert!(err.contains("unknown workload") || err.contains("must run as root"), "{err}");
}

#[test]
fn stats_after_a_run() {
    let json = temp("stats.json");
    let args = [
        "loopback",
        "--provider",
        "tcp",
        "--workloads",
        "write",
        "--sizes",
        "64K",
        "--baseline",
        "none",
        "--stats",
        "--json",
        json.to_str().unwrap(),
    ];
    let mut all = args.to_vec();
    all.extend(QUICK);
    let out = run(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("== engine stats (client)") && stdout.contains("write requests:"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let s = &v["stats"];
    assert!(s["nics"][0]["posted"]["writes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["in_flight"].as_u64(), Some(0), "{s}");
    let peer = &s["peers"][0];
    assert!(peer["requests_ok"].as_u64().unwrap() > 0 && peer["requests_failed"].as_u64() == Some(0), "{peer}");
    assert!(s["latency"]["write"]["count"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_file(&json);
}
