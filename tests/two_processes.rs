//! Tier 2 across processes: a parent and a child process (this test binary
//! re-run as an ignored test) exchange engine addresses and descriptors over
//! the child's stdin/stdout, then exercise every operation in both
//! directions over libfabric tcp and shm on loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{pattern, TIMEOUT};
use strait::{Access, EngineAddress, MrDesc, PagedLayout, Provider, TransferEngine};

const INBOX: u64 = 8 << 20;
const HALF: u64 = INBOX / 2;
const WRITE_LEN: u64 = (3 << 20) + 5;
const PAGE: u64 = 4096;

fn paged_pages() -> (Vec<u32>, Vec<u32>) {
    let src: Vec<u32> = (0..64).collect();
    let dst: Vec<u32> = (0..64).map(|i| if i % 2 == 0 { 800 + i } else { 1000 - i }).collect();
    (src, dst)
}

fn open(provider: Provider, nics: usize) -> TransferEngine {
    TransferEngine::builder().provider(provider).interface("lo").nics(nics).build().expect("engine")
}

/// What the parent writes, as the child expects to find it.
fn expected_child_inbox() -> Vec<u8> {
    let mut v = vec![0u8; HALF as usize];
    v[..WRITE_LEN as usize].copy_from_slice(&pattern(WRITE_LEN as usize, 1));
    let src = pattern((64 * PAGE) as usize, 2);
    let (sp, dp) = paged_pages();
    for (s, d) in sp.iter().zip(&dp) {
        let to = (*d as u64 * PAGE) as usize;
        let from = (*s as u64 * PAGE) as usize;
        v[to..to + PAGE as usize].copy_from_slice(&src[from..from + PAGE as usize]);
    }
    v
}

/// The child: serves as the target of the parent's operations, then writes
/// back. Run only by `run_pair`.
#[test]
#[ignore = "child process of the two-process tests; run by them"]
fn peer_process() {
    let Ok(provider) = std::env::var("STRAIT_PEER_PROVIDER") else { return };
    let provider: Provider = provider.parse().unwrap();
    let nics: usize = std::env::var("STRAIT_PEER_NICS").unwrap().parse().unwrap();
    let engine = open(provider, nics);
    let inbox = engine.alloc(INBOX, Access::REMOTE_READ_WRITE).unwrap();
    inbox.write_at(HALF, &pattern(HALF as usize, 77)).unwrap();
    let (c_write, c_paged, c_imm) =
        (engine.expect_imm(1, 1).unwrap(), engine.expect_imm(2, 1).unwrap(), engine.expect_imm(3, 5).unwrap());
    let mut out = std::io::stdout().lock();
    writeln!(out, "ADDR {}", engine.address()).unwrap();
    writeln!(out, "DESC {}", inbox.descriptor()).unwrap();
    out.flush().unwrap();

    let mut lines = std::io::stdin().lock().lines();
    let parent_desc = loop {
        let line = lines.next().expect("parent descriptor").unwrap();
        if let Some(hex) = line.strip_prefix("DESC ") {
            break hex.trim().parse::<MrDesc>().unwrap();
        }
    };
    c_write.wait_timeout(TIMEOUT).unwrap();
    c_paged.wait_timeout(TIMEOUT).unwrap();
    c_imm.wait_timeout(TIMEOUT).unwrap();
    let got = inbox.to_vec(0, HALF).unwrap();
    writeln!(out, "CHECK inbox {}", got == expected_child_inbox()).unwrap();
    let message = engine.recv_timeout(TIMEOUT).unwrap();
    writeln!(out, "CHECK message {}", message == pattern(5000, 4)).unwrap();
    out.flush().unwrap();

    // Write back into the parent, with an immediate.
    let outbox = engine.alloc(1 << 20, Access::LOCAL).unwrap();
    outbox.write_at(0, &pattern(1 << 20, 5)).unwrap();
    engine.write(&outbox, 0, &parent_desc, 123, 1 << 20, Some(9)).unwrap().wait_timeout(TIMEOUT).unwrap();
    writeln!(out, "DONE").unwrap();
    out.flush().unwrap();
    // Stay alive (the parent reads our memory) until the parent closes stdin.
    for _ in lines {}
}

fn run_pair(provider: Provider, parent_nics: usize, child_nics: usize) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["peer_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("STRAIT_PEER_PROVIDER", format!("{provider:?}"))
        .env("STRAIT_PEER_NICS", child_nics.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the child");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |prefix: &str| -> String {
        loop {
            let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("child never said {prefix}"));
            // The test harness may print its own text on the same line.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_string();
            }
        }
    };

    let engine = open(provider, parent_nics);
    let child_addr: EngineAddress = next("ADDR ").parse().unwrap();
    assert_eq!(child_addr.nic_count(), child_nics);
    let child_desc: MrDesc = next("DESC ").parse().unwrap();
    let inbox = engine.alloc(2 << 20, Access::REMOTE_WRITE).unwrap();
    let back = engine.expect_imm(9, 1).unwrap();
    writeln!(stdin, "DESC {}", inbox.descriptor()).unwrap();
    stdin.flush().unwrap();

    // Single write with immediate, paged write with immediate, immediates only.
    let src = engine.alloc(WRITE_LEN, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(WRITE_LEN as usize, 1)).unwrap();
    engine.write(&src, 0, &child_desc, 0, WRITE_LEN, Some(1)).unwrap().wait_timeout(TIMEOUT).unwrap();
    let pages = engine.alloc(64 * PAGE, Access::LOCAL).unwrap();
    pages.write_at(0, &pattern((64 * PAGE) as usize, 2)).unwrap();
    let (sp, dp) = paged_pages();
    engine
        .write_paged(&pages, &child_desc, PagedLayout::contiguous(PAGE), sp, dp, Some(2))
        .unwrap()
        .wait_timeout(TIMEOUT)
        .unwrap();
    for _ in 0..5 {
        engine.write_imm(&child_desc, 3).unwrap().wait_timeout(TIMEOUT).unwrap();
    }
    // One-sided read of the child's second half.
    let local = engine.alloc(HALF, Access::LOCAL).unwrap();
    engine.read(&local, 0, &child_desc, HALF, HALF).unwrap().wait_timeout(TIMEOUT).unwrap();
    assert!(local.to_vec(0, HALF).unwrap() == pattern(HALF as usize, 77), "read returned the child's bytes");
    // Two-sided send.
    let msg = engine.alloc(8192, Access::LOCAL).unwrap();
    msg.write_at(0, &pattern(5000, 4)).unwrap();
    engine.send(&child_addr, &msg, 0, 5000).unwrap().wait_timeout(TIMEOUT).unwrap();

    assert_eq!(next("CHECK inbox"), "true", "child saw the written and paged bytes");
    assert_eq!(next("CHECK message"), "true", "child received the message");
    back.wait_timeout(TIMEOUT).unwrap();
    assert!(inbox.to_vec(123, 1 << 20).unwrap() == pattern(1 << 20, 5), "child's write landed");
    next("DONE");
    drop(stdin);
    let status = wait_with_timeout(&mut child, TIMEOUT);
    assert!(status.success(), "child failed: {status}");
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("child did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_one_nic_each() {
    run_pair(Provider::Tcp, 1, 1);
}

#[test]
fn tcp_two_nics_to_four() {
    run_pair(Provider::Tcp, 2, 4);
}

#[test]
fn shm_one_nic_each() {
    run_pair(Provider::Shm, 1, 1);
}

#[test]
fn shm_four_nics_to_two() {
    run_pair(Provider::Shm, 4, 2);
}
