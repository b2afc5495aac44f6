//! `query-status` round trips per second against one real QEMU: vmhost's QMP client
//! against Python's `qemu.qmp` (asyncio `QMPClient`, and its synchronous `legacy`
//! wrapper), on the same QEMU in the same run, alternating, median of 3.
//!
//! Run: `cargo bench --bench qmp_rate` (installs `qemu.qmp` with pip when missing;
//! needs qemu-system-x86_64). VMHOST_BENCH_ITERS sets the round trips per measurement.

// Removed however the bench ends (a panic too), like the tests' scratch directories.
#[allow(dead_code)]
#[path = "../src/test_dir.rs"]
mod test_dir;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmhost::qmp::{cmd, Client};

const PY_ASYNC: &str = r#"
import asyncio, sys, time
from qemu.qmp import QMPClient
async def main(sock, n):
    c = QMPClient('bench')
    await c.connect(sock)
    for _ in range(200):
        await c.execute('query-status')
    t = time.perf_counter()
    for _ in range(n):
        r = await c.execute('query-status')
        assert r['running']
    dt = time.perf_counter() - t
    await c.disconnect()
    print(n / dt)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

const PY_LEGACY: &str = r#"
import sys, time
from qemu.qmp.legacy import QEMUMonitorProtocol
sock, n = sys.argv[1], int(sys.argv[2])
c = QEMUMonitorProtocol(sock)
c.connect()
for _ in range(200):
    c.cmd('query-status')
t = time.perf_counter()
for _ in range(n):
    r = c.cmd('query-status')
    assert r['running']
dt = time.perf_counter() - t
c.close()
print(n / dt)
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ours(sock: &std::path::Path, n: usize) -> f64 {
    let stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let c = Client::connect(stream, Duration::from_secs(10)).unwrap();
    for _ in 0..200 {
        c.execute(&cmd::QueryStatus, Duration::from_secs(10)).unwrap();
    }
    let start = Instant::now();
    for _ in 0..n {
        assert!(c.execute(&cmd::QueryStatus, Duration::from_secs(10)).unwrap().running);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    c.close();
    // QEMU notices the hang-up asynchronously; give it a moment before the next client.
    std::thread::sleep(Duration::from_millis(100));
    rate
}

/// The floor: one thread writing the command and reading lines until its reply, no
/// library at all.
fn raw(sock: &std::path::Path, n: usize) -> f64 {
    use std::io::{BufRead, BufReader, Write};
    let mut w = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    let mut one = || {
        w.write_all(b"{\"execute\": \"query-status\", \"id\": 1}\n").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
        }
    };
    for _ in 0..200 {
        one();
    }
    let start = Instant::now();
    for _ in 0..n {
        one();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(r);
    std::thread::sleep(Duration::from_millis(100));
    rate
}

fn python(script: &str, sock: &std::path::Path, n: usize) -> f64 {
    let out = Command::new("python3").arg("-c").arg(script).arg(sock).arg(n.to_string()).output().unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(100));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let have = Command::new("python3").args(["-c", "import qemu.qmp"]).stderr(Stdio::null()).status();
    if !have.is_ok_and(|s| s.success()) {
        eprintln!("installing Python's qemu.qmp with pip for the reference measurement");
        let st = Command::new("python3").args(["-m", "pip", "install", "-q", "qemu.qmp"]).status().unwrap();
        assert!(st.success(), "pip install qemu.qmp failed");
    }
    let n: usize = std::env::var("VMHOST_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let scratch = test_dir::TempDir::new("qmpbench");
    let dir = scratch.path();
    let sock = dir.join("qmp.sock");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _qemu = KillOnDrop(
        Command::new("qemu-system-x86_64")
            .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install -y --no-install-recommends qemu-system-x86)"),
    );
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut a, mut b, mut c, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        f.push(raw(&sock, n));
        a.push(ours(&sock, n));
        b.push(python(PY_ASYNC, &sock, n));
        c.push(python(PY_LEGACY, &sock, n));
    }
    let (a, b, c, f) = (median(a), median(b), median(c), median(f));
    println!("QMP query-status round trips per second, one QEMU (-M none), {n} calls, median of 3");
    println!("  raw socket, no library (the floor) : {f:>9.0} /s");
    println!("  vmhost qmp::Client                 : {a:>9.0} /s   {:.2}x of the floor", a / f);
    println!("  Python qemu.qmp QMPClient (asyncio): {b:>9.0} /s   vmhost is {:.2}x", a / b);
    println!("  Python qemu.qmp legacy (sync)      : {c:>9.0} /s   vmhost is {:.2}x", a / c);
}
