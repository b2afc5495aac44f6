//! Connections between host programs and guest programs through the agent's tunnel, on
//! one real guest (QEMU, the default busybox image) shared by the tests here: guest
//! busybox `nc` connecting to `host.internal:PORT`, 16 MiB both ways checked byte for
//! byte, several connections at once, a guest that connects before the host accepts,
//! either side closing first, an Accept ended by a close from another thread, and a host
//! program connecting to a port a guest program listens on.
//!
//! Busybox `nc` shuts its writing side at the end of its input, and exits at the end of
//! what it reads.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmhost::{Image, Instance, InstanceOptions};

/// The guest the tests share (the tests use distinct ports).
fn vm(test: &str) -> Option<&'static Instance> {
    static VM: OnceLock<Instance> = OnceLock::new();
    if !common::vm_ready(test) {
        return None;
    }
    Some(VM.get_or_init(|| {
        let opts = InstanceOptions { memory_mb: 256, ..Default::default() };
        Instance::new_in_process(Image::Default, opts).expect("boot the shared guest")
    }))
}

/// Runs `script` in the guest with `sh -c`, in the background; its output and exit
/// come back from the returned thread.
fn guest(vm: &'static Instance, script: &str) -> std::thread::JoinHandle<(i32, String, String)> {
    let script = script.to_string();
    std::thread::spawn(move || {
        let out = vm.command("sh").arg("-c").arg(&script).output().expect("run in the guest");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

fn hex_sha256(data: &[u8]) -> String {
    vmhost::image::digest::Digest::sha256_of(data).hex().to_string()
}

#[test]
fn a_guest_program_reaches_a_host_listener_by_name() {
    let Some(vm) = vm("a_guest_program_reaches_a_host_listener_by_name") else { return };
    let listener = vm.listen(":7001").unwrap();
    assert_eq!(listener.local_addr().unwrap().to_string(), "10.42.0.1:7001");
    let g = guest(vm, "grep host.internal /etc/hosts && echo hello from the guest | nc host.internal 7001");
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(conn.local_addr().unwrap().to_string(), "10.42.0.1:7001");
    assert!(peer.ip().to_string().starts_with("10.42.0."), "{peer}");
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the guest\n");
    drop(conn);
    let (code, out, err) = g.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("10.42.0.1\thost.internal"), "{out}");
}

#[test]
fn sixteen_mib_each_way_arrive_intact() {
    let Some(vm) = vm("sixteen_mib_each_way_arrive_intact") else { return };
    // 16 MiB that no simple pattern hides an error in.
    let data = common::noise(16 << 20, 0x9E37_79B9_7F4A_7C15);
    let want = hex_sha256(&data);
    // Guest to host.
    let listener = vm.listen(":7002").unwrap();
    let g = guest(vm, "head -c 16777216 /dev/urandom > /tmp/sent && sha256sum < /tmp/sent && nc host.internal 7002 < /tmp/sent");
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    drop(conn);
    let (code, out, err) = g.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(got.len(), 16 << 20);
    assert_eq!(out.split_whitespace().next().unwrap(), hex_sha256(&got), "guest to host");
    // Host to guest.
    let g = guest(vm, "nc host.internal 7002 | sha256sum");
    let (conn, _) = listener.accept().unwrap();
    (&conn).write_all(&data).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let (code, out, err) = g.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.split_whitespace().next().unwrap(), want, "host to guest");
}

#[test]
fn many_connections_at_once_and_before_accept() {
    let Some(vm) = vm("many_connections_at_once_and_before_accept") else { return };
    let listener = vm.listen(":7003").unwrap();
    // Eight guest programs connect before the host accepts any.
    let g = guest(
        vm,
        "for i in 1 2 3 4 5 6 7 8; do (echo conn $i | nc host.internal 7003 > /tmp/reply$i) & done; wait; cat /tmp/reply*",
    );
    std::thread::sleep(Duration::from_secs(2));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (conn, _) = listener.accept().unwrap();
            s.spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while (&conn).read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let text = String::from_utf8(line).unwrap();
                (&conn).write_all(format!("ack {text}\n").as_bytes()).unwrap();
                conn.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                (&conn).read_to_end(&mut rest).unwrap();
            });
        }
    });
    let (code, out, err) = g.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, (1..=8).map(|i| format!("ack conn {i}")).collect::<Vec<_>>());
}

#[test]
fn either_side_closing_is_seen_by_the_other() {
    let Some(vm) = vm("either_side_closing_is_seen_by_the_other") else { return };
    let listener = vm.listen(":7004").unwrap();
    // The guest closes first: the host reads the end.
    let g = guest(vm, "echo bye | nc host.internal 7004");
    let (conn, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    (&conn).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye\n");
    assert_eq!((&conn).read(&mut [0u8; 8]).unwrap(), 0, "the end stays the end");
    drop(conn);
    assert_eq!(g.join().unwrap().0, 0);
    // The host closes first: the guest's nc sees the end and exits.
    let g = guest(vm, "nc host.internal 7004 < /dev/zero > /dev/null; echo nc ended");
    let (conn, _) = listener.accept().unwrap();
    let mut b = [0u8; 4096];
    (&conn).read_exact(&mut b).unwrap();
    conn.close().unwrap();
    let (code, out, err) = g.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "nc ended\n"), "{err}");
}

#[test]
fn a_close_from_another_thread_ends_a_blocked_accept() {
    let Some(vm) = vm("a_close_from_another_thread_ends_a_blocked_accept") else { return };
    let listener = vm.listen(":7005").unwrap();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| listener.accept().map(|_| ()));
        std::thread::sleep(Duration::from_millis(500));
        listener.close().unwrap();
        let e = waiting.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    });
    // And the guest is refused now.
    let (code, _, _) = guest(vm, "echo x | nc host.internal 7005").join().unwrap();
    assert_ne!(code, 0);
}

#[test]
fn a_host_program_connects_to_a_guest_port() {
    let Some(vm) = vm("a_host_program_connects_to_a_guest_port") else { return };
    let g = guest(vm, "echo from the guest server | nc -l -p 7006 > /tmp/heard; cat /tmp/heard");
    // Until the guest listens, a connection is refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let conn = loop {
        match vm.connect(7006) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("refused"), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(conn.peer_addr().unwrap().to_string(), "127.0.0.1:7006");
    (&conn).write_all(b"from the host\n").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    (&conn).read_to_string(&mut got).unwrap();
    assert_eq!(got, "from the guest server\n");
    drop(conn);
    let (code, out, err) = g.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "from the host\n"), "{err}");
}

#[test]
fn the_instance_closing_wakes_every_waiter() {
    let test = "the_instance_closing_wakes_every_waiter";
    if !common::vm_ready(test) {
        return;
    }
    // A guest of its own: this one is closed.
    let vm = Instance::new_in_process(Image::Default, InstanceOptions::default()).unwrap();
    let listener = vm.listen(":7100").unwrap();
    let idle = vm.listen(":7101").unwrap();
    std::thread::scope(|outer| {
        let _g = outer.spawn(|| vm.command("sh").arg("-c").arg("sleep 600 | nc host.internal 7100").output());
        let (conn, _) = listener.accept().unwrap();
        std::thread::scope(|s| {
            let reading = s.spawn(|| (&conn).read(&mut [0u8; 16]).map_err(|e| e.to_string()));
            let accepting = s.spawn(|| idle.accept().map(|_| ()).map_err(|e| e.to_string()));
            std::thread::sleep(Duration::from_millis(500));
            vm.answer(&vmhost::wire::Request::InstanceClose {}).unwrap();
            let r = reading.join().unwrap();
            assert!(r.is_err(), "a pending read ends with an error, not data: {r:?}");
            let a = accepting.join().unwrap();
            assert!(a.is_err(), "a pending accept ends: {a:?}");
        });
        // And the handles are gone.
        assert!((&conn).read(&mut [0u8; 16]).is_err());
    });
}

#[test]
fn a_published_port_takes_host_clients_to_the_guest_program() {
    let Some(vm) = vm("a_published_port_takes_host_clients_to_the_guest_program") else { return };
    let addr = vm.publish("127.0.0.1:0".parse().unwrap(), 7300).unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "loopback unless asked");
    let g = guest(vm, "echo from the guest | nc -l -p 7300 > /tmp/got7300; cat /tmp/got7300");
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"from a host client\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        let _ = c.read_to_string(&mut got);
        // Closed at once until the guest listens.
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got, "from the guest\n");
    let (code, out, err) = g.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "from a host client\n"), "{err}");
}

#[test]
fn vmhost_run_publishes_with_dash_p() {
    let test = "vmhost_run_publishes_with_dash_p";
    if !common::vm_ready(test) {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(common::vmhost_bin())
        .args(["run", "-p", &format!("{port}:8000"), "--", "sh", "-c", "echo served | nc -l -p 8000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let got = loop {
        let mut got = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.read_to_string(&mut got);
        }
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got, "served\n");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `wget -T` ends a request that gets no answer, with the usual message: the default
/// image's busybox has wget's timeout (Debian's busybox-static crashed on `-T`).
#[test]
fn the_default_images_wget_gives_up_after_its_timeout() {
    let Some(vm) = vm("the_default_images_wget_gives_up_after_its_timeout") else { return };
    let listener = vm.listen(":7501").unwrap();
    std::thread::scope(|s| {
        // Accepted and never answered: only the timeout ends wget. (A wget that never
        // connects leaves the accept waiting: the close below ends it.)
        let accepted = s.spawn(|| listener.accept().map(|(conn, _)| conn));
        let (code, out, err) =
            guest(vm, "wget -q -T 2 -O - http://host.internal:7501/silent; echo \"exit $?\"").join().unwrap();
        listener.close().unwrap();
        assert_eq!((code, out.as_str()), (0, "exit 1\n"), "{err}");
        assert!(err.contains("download timed out"), "{err}");
        assert!(accepted.join().unwrap().is_ok(), "wget connected");
    });
}

#[test]
fn the_default_images_wget_fetches_from_a_host_listener_by_name() {
    let Some(vm) = vm("the_default_images_wget_fetches_from_a_host_listener_by_name") else { return };
    let listener = vm.listen(":7500").unwrap();
    // With -T, as scripts write it (Debian's own busybox-static crashed on it).
    let g = guest(vm, "wget -q -T 60 -O - http://host.internal:7500/page");
    let (conn, _) = listener.accept().unwrap();
    let mut request = Vec::new();
    let mut b = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") {
        let n = (&conn).read(&mut b).unwrap();
        assert!(n > 0, "the request ended early: {}", String::from_utf8_lossy(&request));
        request.extend_from_slice(&b[..n]);
    }
    let request = String::from_utf8_lossy(&request).into_owned();
    assert!(request.starts_with("GET /page HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("Host: host.internal:7500"), "{request}");
    (&conn).write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello, wget\n").unwrap();
    drop(conn);
    let (code, out, err) = g.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "hello, wget\n"), "{err}");
}

#[test]
fn the_network_messages_work_through_the_helper_process() {
    let test = "the_network_messages_work_through_the_helper_process";
    if !common::vm_ready(test) {
        return;
    }
    // The real helper binary, spoken to over its socket (every message encoded and
    // decoded as the protocol says), not the in-process transport.
    std::env::set_var("VMHOST_HELPER_PATH", common::vmhost_bin());
    let vm = Instance::new_with_helper(Image::Default, InstanceOptions::default()).unwrap();
    let listener = vm.listen(":7600").unwrap();
    assert_eq!(listener.local_addr().unwrap().to_string(), "10.42.0.1:7600");
    std::thread::scope(|s| {
        let g =
            s.spawn(|| vm.command("sh").arg("-c").arg("echo ping | nc host.internal 7600").output().unwrap());
        let (conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "10.42.0.1");
        let mut got = String::new();
        (&conn).read_to_string(&mut got).unwrap();
        assert_eq!(got, "ping\n");
        (&conn).write_all(b"pong\n").unwrap();
        drop(conn);
        assert!(g.join().unwrap().status.success());
        // The other way, and a close from another thread ending an accept.
        let server = s.spawn(|| vm.command("sh").arg("-c").arg("echo hi | nc -l -p 7601").output().unwrap());
        let conn = loop {
            match vm.connect(7601) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        conn.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        (&conn).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi\n");
        drop(conn);
        assert!(server.join().unwrap().status.success());
        let waiting = s.spawn(|| listener.accept().map(|_| ()));
        std::thread::sleep(Duration::from_millis(300));
        listener.close().unwrap();
        assert!(waiting.join().unwrap().is_err());
    });
    drop(listener);
    vm.close().unwrap();
}

#[test]
fn read_and_write_timeouts_give_up_without_losing_bytes() {
    let Some(vm) = vm("read_and_write_timeouts_give_up_without_losing_bytes") else { return };
    let listener = vm.listen(":7700").unwrap();
    // The guest says nothing for a while, then a line; it never reads what it is sent
    // (its nc writes into a pipe nobody reads), so writes fill the window and wait.
    let g = guest(vm, "(sleep 2; echo late) | nc host.internal 7700 | sleep 8");
    let (conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert_eq!(conn.read_timeout().unwrap(), Some(Duration::from_millis(300)));
    let e = (&conn).read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    // The line that comes later is all there: a timed-out read took nothing.
    conn.set_read_timeout(None).unwrap();
    let mut line = [0u8; 5];
    (&conn).read_exact(&mut line).unwrap();
    assert_eq!(&line, b"late\n");
    assert!(conn.set_read_timeout(Some(Duration::ZERO)).is_err(), "zero is refused, as std does");
    conn.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    let e = loop {
        match (&conn).write(&chunk) {
            Ok(n) => assert!(n > 0),
            Err(e) => break e,
        }
        assert!(started.elapsed() < Duration::from_secs(60), "writes never waited");
    };
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    drop(conn);
    g.join().unwrap();
}
