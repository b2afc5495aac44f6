//! Connection throughput between host programs and guest programs, through the real
//! helper process, against the agent channel's own file throughput (FsWriteFile and
//! FsReadFile of the same size) in the same run:
//! - guest to host and host to guest over a listener (`Instance::listen`, the guest's
//!   busybox `nc` to `host.internal:PORT`);
//! - the same over a published port (`Instance::publish`, a host `TcpStream` to it, the
//!   guest's `nc -l`);
//! - guest connections per second to a host listener (each a new `nc` in the guest);
//! - for scale, the guest's own `nc` to `nc` over its loopback, the same bytes.
//!
//! Each transfer is timed from the connection's start (accepted, or connected) to the
//! end of its data (read to the end, or the guest's `nc` exited).
//!
//! Run: `cargo bench --bench net_io` (after scripts/setup.sh and a kernel).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use vmhost::{Image, Instance, InstanceOptions};

#[path = "../tests/common/mod.rs"]
mod common;

fn mbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    std::env::set_var("VMHOST_HELPER_PATH", env!("CARGO_BIN_EXE_vmhost"));
    let rounds = 3;
    let size = 64usize << 20;
    let data = common::noise(size, 0x2545_F491_4F6C_DD1D);
    let vm =
        Instance::new_with_helper(Image::Default, InstanceOptions { memory_mb: 512, ..Default::default() })
            .expect("boot");
    let fs = vm.fs();
    let listener = vm.listen(":9000").unwrap();
    let published = vm.publish("127.0.0.1:0".parse().unwrap(), 9001).unwrap();
    let (mut fw, mut fr, mut g2h, mut h2g, mut pg2h, mut ph2g) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut inside = vec![];
    fs.write("/tmp/src", &data).unwrap();
    for _ in 0..rounds {
        // The reference: the agent channel's file transfers.
        let t = Instant::now();
        fs.write("/tmp/big", &data).unwrap();
        fw.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert_eq!(fs.read("/tmp/big").unwrap().len(), size);
        fr.push(t.elapsed().as_secs_f64());

        // The guest's own cost of moving the bytes with nc over TCP: nc to nc on its
        // loopback, the same file (process starts included, a few ms).
        let t = Instant::now();
        let out = vm
            .command("sh")
            .arg("-c")
            // The listening nc's input stays open (a FIFO held by this shell): at the end
            // of its input it would shut its side, and the sending nc would stop there.
            .arg(
                "rm -f /tmp/hold; mkfifo /tmp/hold; (nc -l -p 9100 < /tmp/hold | wc -c > /tmp/n) & \
                 exec 3>/tmp/hold; sleep 0.2; nc 127.0.0.1 9100 < /tmp/src; exec 3>&-; wait; cat /tmp/n",
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), size.to_string(), "guest nc to nc: {out:?}");
        inside.push(t.elapsed().as_secs_f64() - 0.2);

        std::thread::scope(|s| {
            // Guest to host over the listener.
            let g = s.spawn(|| vm.command("sh").arg("-c").arg("nc host.internal 9000 < /tmp/src").output());
            let (conn, _) = listener.accept().unwrap();
            let t = Instant::now();
            let mut got = Vec::with_capacity(size);
            (&conn).read_to_end(&mut got).unwrap();
            g2h.push(t.elapsed().as_secs_f64());
            assert_eq!(got.len(), size);
            drop(conn);
            assert!(g.join().unwrap().unwrap().status.success());

            // Host to guest over the listener.
            let g = s.spawn(|| vm.command("sh").arg("-c").arg("nc host.internal 9000 > /dev/null").output());
            let (conn, _) = listener.accept().unwrap();
            let t = Instant::now();
            (&conn).write_all(&data).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
            assert!(g.join().unwrap().unwrap().status.success());
            h2g.push(t.elapsed().as_secs_f64());
            drop(conn);

            // Guest to host over the published port.
            let g = s.spawn(|| vm.command("sh").arg("-c").arg("nc -l -p 9001 < /tmp/src").output());
            let mut c = connect(&vm, published, 9001);
            let t = Instant::now();
            let mut got = Vec::with_capacity(size);
            c.read_to_end(&mut got).unwrap();
            pg2h.push(t.elapsed().as_secs_f64());
            assert_eq!(got.len(), size, "published, guest to host");
            drop(c);
            assert!(g.join().unwrap().unwrap().status.success());

            // Host to guest over the published port.
            let g = s.spawn(|| vm.command("sh").arg("-c").arg("nc -l -p 9001 > /dev/null").output());
            let mut c = connect(&vm, published, 9001);
            let t = Instant::now();
            c.write_all(&data).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let _ = c.read_to_end(&mut Vec::new());
            assert!(g.join().unwrap().unwrap().status.success());
            ph2g.push(t.elapsed().as_secs_f64());
        });
    }
    // Connections per second: each a new guest `nc`, its line read, closed.
    let n = 100;
    let t = Instant::now();
    std::thread::scope(|s| {
        let script =
            format!("i=0; while [ $i -lt {n} ]; do echo x | nc host.internal 9000; i=$((i+1)); done");
        let vm = &vm;
        let g = s.spawn(move || vm.command("sh").arg("-c").arg(&script).output());
        for _ in 0..n {
            let (conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            (&conn).read_to_end(&mut got).unwrap();
            assert_eq!(got, b"x\n");
        }
        assert!(g.join().unwrap().unwrap().status.success());
    });
    let conns = n as f64 / t.elapsed().as_secs_f64();
    // The guest's own cost of a connection, for scale: `nc` to a closed port, n times.
    let t = Instant::now();
    let script =
        format!("i=0; while [ $i -lt {n} ]; do nc 127.0.0.1 1 < /dev/null 2>/dev/null; i=$((i+1)); done");
    vm.command("sh").arg("-c").arg(&script).output().unwrap();
    let local_conns = n as f64 / t.elapsed().as_secs_f64();

    let (fw, fr) = (common::median(fw), common::median(fr));
    println!("64 MiB, median of {rounds}; the agent channel's file transfers are the reference");
    println!("  agent channel, file write (host to guest)   {:7.1} MB/s", mbs(size, fw));
    println!("  agent channel, file read  (guest to host)   {:7.1} MB/s", mbs(size, fr));
    for (what, v, reference) in [
        ("listener, guest to host                  ", g2h, fr),
        ("listener, host to guest                  ", h2g, fw),
        ("published port (-p), guest to host       ", pg2h, fr),
        ("published port (-p), host to guest       ", ph2g, fw),
    ] {
        let m = common::median(v);
        println!("  {what}  {:7.1} MB/s  ({:.2}x the file transfer)", mbs(size, m), reference / m);
    }
    let inside = common::median(inside);
    println!(
        "  guest nc to guest nc on its loopback          {:7.1} MB/s  (the guest's own TCP and nc, for scale)",
        mbs(size, inside)
    );
    println!("connections per second, guest nc to a host listener: {conns:.1}/s");
    println!("  reference: guest nc to a closed guest port (its own start and exit): {local_conns:.1}/s");
    drop(listener);
    vm.close().unwrap();
}

/// Connects to the published port once a guest program listens on `guest_port` (as
/// the guest's /proc/net/tcp or tcp6 says).
fn connect(vm: &Instance, addr: std::net::SocketAddr, guest_port: u16) -> std::net::TcpStream {
    // Listening, on IPv4 or IPv6 (busybox nc listens on :: where it can).
    let pattern = format!(":{guest_port:04X} 0+:0000 0A");
    let deadline = Instant::now() + Duration::from_secs(60);
    let files = ["/proc/net/tcp", "/proc/net/tcp6"];
    while !vm.command("grep").args(["-Eqs", &pattern]).args(files).status().unwrap().success() {
        assert!(Instant::now() < deadline, "the guest never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::net::TcpStream::connect(addr).unwrap()
}
