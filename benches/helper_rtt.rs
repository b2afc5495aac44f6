//! Helper-protocol call round trip against a raw Unix-socket ping-pong of the same
//! bytes, measured in the same run, and calls per second with 1, 4 and 16 threads.
//!
//! Run: `cargo bench --bench helper_rtt` (VMHOST_BENCH_ITERS to change the count).

// Removed however the bench ends (a panic too), like the tests' scratch directories.
#[allow(dead_code)]
#[path = "../src/test_dir.rs"]
mod test_dir;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmhost::client;
use vmhost::server::{Mux, Server};
use vmhost::wire::{self, msg};

const ID: &str = "vm-0123456789ab";

fn iters() -> usize {
    std::env::var("VMHOST_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The bytes of an InstanceID request and its answer.
fn frames() -> (Vec<u8>, Vec<u8>) {
    let mut req = Vec::new();
    wire::write_frame(&mut req, msg::INSTANCE_ID, &[], wire::DEFAULT_MAX_FRAME).unwrap();
    let mut enc = wire::Encoder::response();
    enc.string(ID);
    let mut resp = Vec::new();
    wire::write_frame(&mut resp, msg::RESPONSE, enc.as_bytes(), wire::DEFAULT_MAX_FRAME).unwrap();
    (req, resp)
}

/// Raw ping-pong: the server reads the request bytes and writes the answer bytes.
fn raw_rtt_ns(dir: &std::path::Path, n: usize) -> f64 {
    let (req, resp) = frames();
    let path = dir.join("raw.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (rl, rr) = (req.len(), resp.clone());
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; rl];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&rr).unwrap();
        }
    });
    let mut c = UnixStream::connect(&path).unwrap();
    let mut buf = vec![0u8; resp.len()];
    let mut samples = Vec::new();
    for round in 0..6 {
        let start = Instant::now();
        for _ in 0..n {
            c.write_all(&req).unwrap();
            c.read_exact(&mut buf).unwrap();
        }
        if round > 0 {
            samples.push(start.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    drop(c);
    server.join().unwrap();
    median(samples)
}

fn start_server(dir: &std::path::Path) -> Server {
    let mut mux = Mux::new();
    mux.register(msg::INSTANCE_ID, |_, dec| {
        dec.finish()?;
        Ok(wire::Response::InstanceId { id: ID.into() }.into())
    });
    let server = Server::bind(dir.join("helper.sock"), Arc::new(mux)).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve());
    server
}

fn helper_rtt_ns(server: &Server, n: usize) -> f64 {
    let c = client::connect_to(server.socket_path(), Duration::from_secs(5)).unwrap();
    let mut samples = Vec::new();
    for round in 0..6 {
        let start = Instant::now();
        for _ in 0..n {
            let r = c.call(msg::INSTANCE_ID, &[]).unwrap();
            assert_eq!(r.fields().len(), 4 + ID.len());
        }
        if round > 0 {
            samples.push(start.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    median(samples)
}

fn calls_per_sec(server: &Server, threads: usize, n: usize) -> f64 {
    let c = Arc::new(client::connect_to(server.socket_path(), Duration::from_secs(5)).unwrap());
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let c = c.clone();
            thread::spawn(move || {
                for _ in 0..n / threads {
                    c.call(msg::INSTANCE_ID, &[]).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    (n / threads * threads) as f64 / start.elapsed().as_secs_f64()
}

/// The real `vmhost helper` process: InstanceID answered (NotRunning without an
/// instance: an Error frame) across processes.
fn real_helper_rtt_ns(n: usize) -> f64 {
    std::env::set_var("VMHOST_HELPER_PATH", env!("CARGO_BIN_EXE_vmhost"));
    let c = client::spawn_helper().unwrap();
    let mut samples = Vec::new();
    for round in 0..6 {
        let start = Instant::now();
        for _ in 0..n {
            assert!(c.call(msg::INSTANCE_ID, &[]).is_err());
        }
        if round > 0 {
            samples.push(start.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    c.close().unwrap();
    median(samples)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of tests; there are none.
    }
    let n = iters();
    let scratch = test_dir::TempDir::new("rttbench");
    let dir = scratch.path();
    let server = start_server(dir);

    // Interleave the two so that machine noise hits both alike.
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..3 {
        raw.push(raw_rtt_ns(dir, n));
        ours.push(helper_rtt_ns(&server, n));
    }
    let (raw, ours) = (median(raw), median(ours));
    println!("helper call round trip (InstanceID, {n} calls x 5 rounds x 3, median)");
    println!("  raw Unix-socket ping-pong, same bytes   : {:>8.2} us", raw / 1000.0);
    println!("  vmhost client -> server (in-process)     : {:>8.2} us", ours / 1000.0);
    println!("  ratio                                    : {:>8.2}x  (target <= 1.5x)", ours / raw);
    let real = real_helper_rtt_ns(n);
    println!("  vmhost client -> `vmhost helper` process : {:>8.2} us  (Error-frame answer)", real / 1000.0);
    println!("calls per second, one client shared by N threads");
    for threads in [1, 4, 16] {
        let cps = calls_per_sec(&server, threads, n * 2);
        println!("  {threads:>2} threads: {cps:>10.0} calls/s");
    }
    server.close();
}
