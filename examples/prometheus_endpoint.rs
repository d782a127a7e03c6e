//! Serving an engine's stats to Prometheus: a tiny HTTP endpoint in the
//! application (the library only renders the text,
//! `EngineStats::prometheus`).
//!
//! ```sh
//! cargo run --release --example prometheus_endpoint                 # serves http://127.0.0.1:9464/metrics until Ctrl-C
//! cargo run --release --example prometheus_endpoint -- --once       # serves one scrape (made by itself) and exits
//! ```
//!
//! Two engines on loopback keep writing to each other in the background so
//! that the counters move; every scrape takes a fresh snapshot. Point a
//! Prometheus scrape job (or `curl`) at the address printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strait::{Access, Provider, TransferEngine};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let once = std::env::args().any(|a| a == "--once");
    let provider = Provider::Tcp;
    let engine = TransferEngine::builder().provider(provider).interface("lo").build()?;
    let peer = TransferEngine::builder().provider(provider).interface("lo").build()?;
    engine.label_peer(peer.address(), "peer-0");

    // A workload, so that there is something to see.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (engine, stop) = (engine.clone(), stop.clone());
        let src = engine.alloc(1 << 20, Access::LOCAL)?;
        let dst = peer.alloc(1 << 20, Access::REMOTE_WRITE)?.descriptor().clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let writes: Vec<_> =
                    (0..16).filter_map(|i| engine.write(&src, 0, &dst, 0, 64 << 10, Some(i)).ok()).collect();
                for w in writes {
                    let _ = w.wait_timeout(Duration::from_secs(10));
                }
            }
        })
    };

    let listener = TcpListener::bind(if once { "127.0.0.1:0" } else { "127.0.0.1:9464" })?;
    let address = listener.local_addr()?;
    println!("serving http://{address}/metrics");
    if once {
        std::thread::sleep(Duration::from_millis(200));
        let scraper = std::thread::spawn(move || scrape(&address.to_string()));
        serve(&engine, listener.accept()?.0)?;
        let body = scraper.join().map_err(|_| "the scrape panicked")??;
        println!("{body}");
        for metric in ["strait_ops_posted_total", "strait_request_seconds_count", "strait_peer_requests_total"] {
            if !body.contains(metric) {
                return Err(format!("the scrape lacks {metric}").into());
            }
        }
    } else {
        for stream in listener.incoming() {
            if let Err(e) = serve(&engine, stream?) {
                eprintln!("scrape failed: {e}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.join().map_err(|_| "the workload panicked")?;
    Ok(())
}

/// Answers one HTTP request: `GET /metrics` with a fresh snapshot, 404
/// for anything else.
fn serve(engine: &TransferEngine, mut stream: TcpStream) -> Result<(), Box<dyn std::error::Error>> {
    let mut request_line = String::new();
    let mut reader = BufReader::new(stream.try_clone()?);
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let (status, body) = if request_line.starts_with("GET /metrics") {
        ("200 OK", engine.stats()?.prometheus("strait"))
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// What a scraper gets from `GET /metrics` at `address`.
fn scrape(address: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(address).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("scrape answered {head}"));
    }
    Ok(body.to_string())
}
