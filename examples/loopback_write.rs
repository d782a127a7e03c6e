//! Two engines in one process, over libfabric tcp on loopback: the writer
//! sends 16 MiB with an immediate across 2 NICs to a 1-NIC reader, which
//! waits for the immediate and checks every byte.
//!
//! `cargo run --release --example loopback_write [-- tcp|shm]`

use std::time::{Duration, Instant};

use strait::{Access, Provider, TransferEngine};

fn main() -> strait::Result<()> {
    let provider: Provider = std::env::args().nth(1).as_deref().unwrap_or("tcp").parse()?;
    let engine = |nics| TransferEngine::builder().provider(provider).interface("lo").nics(nics).build();
    let writer = engine(2)?;
    let reader = engine(1)?;
    println!("writer: {} NICs, address {}", writer.nic_count(), writer.address());
    println!("reader: {} NIC,  address {}", reader.nic_count(), reader.address());

    const LEN: u64 = 16 << 20;
    let inbox = reader.alloc(LEN, Access::REMOTE_WRITE)?;
    // The descriptor travels as bytes, as it would between processes.
    let wire = inbox.descriptor().to_bytes();
    let descriptor = strait::MrDesc::from_bytes(&wire)?;
    println!("descriptor: {} bytes", wire.len());

    let outbox = writer.alloc(LEN, Access::LOCAL)?;
    let pattern: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
    outbox.write_at(0, &pattern)?;

    // The first operation to a new peer sets up the connection: do it once
    // before timing.
    let hello = reader.expect_imm(1, 1)?;
    writer.write_imm(&descriptor, 1)?.wait_timeout(Duration::from_secs(30))?;
    hello.wait_timeout(Duration::from_secs(30))?;

    const ROUNDS: u64 = 8;
    let arrived = reader.expect_imm(0xC0FFEE, ROUNDS)?;
    let start = Instant::now();
    for _ in 0..ROUNDS {
        writer.write(&outbox, 0, &descriptor, 0, LEN, Some(0xC0FFEE))?.wait_timeout(Duration::from_secs(30))?;
    }
    arrived.wait_timeout(Duration::from_secs(30))?;
    let elapsed = start.elapsed() / ROUNDS as u32;
    let landed = inbox.to_vec(0, LEN)?;
    assert!(landed == pattern, "destination differs from the source");
    println!(
        "wrote {} MiB with immediate {:#x} over {}, {ROUNDS} times one after another: {:.2?} each ({:.2} GB/s); \
         {ROUNDS} immediates received, all bytes verified",
        LEN >> 20,
        0xC0FFEE,
        writer.provider(),
        elapsed,
        LEN as f64 / elapsed.as_secs_f64() / 1e9
    );
    Ok(())
}
