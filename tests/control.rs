//! The control protocol: server, client and `vmhost ctl`, against a controller whose VM
//! is a stand-in (the real VM backends plug in behind the same trait).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{vmhost_bin, wait_until, TempDir};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use vmhost::server::control::{ControlClient, ControlServer, VmController};
use vmhost::vm::VmState;

const GUARD: Duration = Duration::from_secs(20);

struct Fake {
    state: Mutex<VmState>,
    stops: AtomicUsize,
    forces: AtomicUsize,
    timeouts: Mutex<Vec<Duration>>,
    release_rx: Receiver<()>,
    exit_rx: Receiver<()>,
}

struct Remote {
    release_tx: Sender<()>,
    exit_tx: Sender<()>,
}

impl VmController for Fake {
    fn state(&self) -> VmState {
        *self.state.lock()
    }
    fn stop(&self, timeout: Duration) -> vmhost::Result<()> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.timeouts.lock().push(timeout);
        *self.state.lock() = VmState::Stopping;
        // Blocks until the test releases it: the answer must not wait for this.
        let _ = self.release_rx.recv_timeout(GUARD);
        *self.state.lock() = VmState::Stopped;
        Ok(())
    }
    fn force_stop(&self) -> vmhost::Result<()> {
        self.forces.fetch_add(1, Ordering::SeqCst);
        let _ = self.release_rx.recv_timeout(GUARD);
        Ok(())
    }
    fn ssh_port(&self) -> u16 {
        2222
    }
    fn backend(&self) -> &str {
        "qemu"
    }
    fn wait(&self) -> vmhost::Result<()> {
        let _ = self.exit_rx.recv();
        Ok(())
    }
}

fn fake() -> (Arc<Fake>, Remote) {
    let (release_tx, release_rx) = crossbeam_channel::unbounded();
    let (exit_tx, exit_rx) = crossbeam_channel::bounded(1);
    let f = Arc::new(Fake {
        state: Mutex::new(VmState::Running),
        stops: AtomicUsize::new(0),
        forces: AtomicUsize::new(0),
        timeouts: Mutex::new(Vec::new()),
        release_rx,
        exit_rx,
    });
    (f, Remote { release_tx, exit_tx })
}

fn exchange(sock: &std::path::Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn methods_and_error_texts_byte_for_byte() {
    let dir = TempDir::new("ctl");
    let (f, remote) = fake();
    let server = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f.clone()).unwrap();
    let sock = server.socket_path().to_path_buf();

    assert_eq!(exchange(&sock, b"{\"method\":\"status\"}\n"), "{\"ok\":true,\"state\":\"running\"}\n");
    assert_eq!(
        exchange(&sock, b"{\"method\":\"info\"}"),
        "{\"ok\":true,\"state\":\"running\",\"ssh_port\":2222,\"backend\":\"qemu\"}\n"
    );
    assert_eq!(
        exchange(&sock, b"{\"method\":\"reboot\"}\n"),
        "{\"ok\":false,\"error\":\"unknown method: reboot\"}\n"
    );
    for bad in [&b"hello\n"[..], b"{\"method\":", b"", b"{}", b"{\"method\":1}", b"[1,2]"] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.write_all(bad).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("{\"ok\":false,\"error\":\"invalid request: "), "{bad:?} -> {out}");
        assert!(out.ends_with("\"}\n"), "{out}");
    }
    // An endless request is cut at the size bound, answered, not read forever.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut big = b"{\"method\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    let _ = s.write_all(&big);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("{\"ok\":false,\"error\":\"invalid request: "), "{out}");

    // The typed client.
    let c = ControlClient::new(&sock);
    let r = c.info().unwrap();
    assert!(r.ok);
    assert_eq!((r.state.as_str(), r.ssh_port, r.backend.as_str()), ("running", 2222, "qemu"));
    assert!(c.is_alive());
    drop(remote);
    drop(server);
}

#[test]
fn stop_answers_at_once_runs_in_background_and_repeats_harmlessly() {
    let dir = TempDir::new("ctlstop");
    let (f, remote) = fake();
    let server = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f.clone()).unwrap();
    let c = ControlClient::new(server.socket_path());

    let r = c.stop(5).unwrap();
    assert!(r.ok);
    assert_eq!(r.state, "stopping");
    assert!(wait_until(GUARD, || f.stops.load(Ordering::SeqCst) == 1));
    // The stop is still running (blocked in the controller); repeating it starts no other.
    let r = c.stop(0).unwrap();
    assert_eq!((r.ok, r.state.as_str()), (true, "stopping"));
    assert_eq!(c.status().unwrap().state, "stopping");
    // force_stop runs beside it, once.
    assert_eq!(c.force_stop().unwrap().state, "stopping");
    assert_eq!(c.force_stop().unwrap().state, "stopping");
    assert!(wait_until(GUARD, || f.forces.load(Ordering::SeqCst) == 1));
    remote.release_tx.send(()).unwrap();
    remote.release_tx.send(()).unwrap();
    assert!(wait_until(GUARD, || f.state() == VmState::Stopped));
    assert_eq!(f.stops.load(Ordering::SeqCst), 1);
    assert_eq!(f.forces.load(Ordering::SeqCst), 1);
    // Once done, a new stop runs again, and <= 0 means 30 s.
    c.stop(-3).unwrap();
    assert!(wait_until(GUARD, || f.stops.load(Ordering::SeqCst) == 2));
    remote.release_tx.send(()).unwrap();
    assert_eq!(*f.timeouts.lock(), vec![Duration::from_secs(5), Duration::from_secs(30)]);
}

#[test]
fn pid_file_and_cleanup_when_the_vm_exits() {
    let dir = TempDir::new("ctlpid");
    let (f, remote) = fake();
    let server = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("vmhost.pid")).unwrap(), std::process::id().to_string());
    let (tx, rx) = crossbeam_channel::bounded(1);
    let server = Arc::new(server);
    let s = server.clone();
    std::thread::spawn(move || tx.send(s.run()).unwrap());
    assert!(ControlClient::new(dir.join("vmhost.sock")).is_alive());
    remote.exit_tx.send(()).unwrap(); // the VM exits
    rx.recv_timeout(GUARD).expect("run returned").unwrap();
    assert!(!dir.join("vmhost.sock").exists());
    assert!(!dir.join("vmhost.pid").exists());
    assert!(!ControlClient::new(dir.join("vmhost.sock")).is_alive());
}

#[test]
fn shutdown_makes_run_return_and_clean_up() {
    let dir = TempDir::new("ctlshut");
    let (f, _remote) = fake();
    let server = Arc::new(ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f).unwrap());
    let s = server.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || tx.send(s.run()).unwrap());
    server.shutdown();
    rx.recv_timeout(GUARD).expect("run returned").unwrap();
    assert!(!dir.join("vmhost.sock").exists() && !dir.join("vmhost.pid").exists());
}

#[test]
fn ctl_command_prints_one_line_and_exits_by_ok() {
    let dir = TempDir::new("ctlcli");
    let (f, remote) = fake();
    let server = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f.clone()).unwrap();
    let sock = server.socket_path().to_path_buf();
    let ctl = |args: &[&str]| Command::new(vmhost_bin()).arg("ctl").arg(&sock).args(args).output().unwrap();

    let out = ctl(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"ok\":true,\"state\":\"running\"}\n");
    let out = ctl(&["info"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"ok\":true,\"state\":\"running\",\"ssh_port\":2222,\"backend\":\"qemu\"}\n"
    );
    let out = ctl(&["stop", "--timeout", "7"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"ok\":true,\"state\":\"stopping\"}\n");
    assert!(wait_until(GUARD, || f.timeouts.lock().first() == Some(&Duration::from_secs(7))));
    let out = ctl(&["force-stop"]);
    assert_eq!(out.status.code(), Some(0));
    remote.release_tx.send(()).unwrap();
    remote.release_tx.send(()).unwrap();
    let out = ctl(&["reboot"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    drop(server);
    let out = ctl(&["status"]);
    assert_eq!(out.status.code(), Some(1), "no server: exit 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmhost.sock"));
}

#[test]
fn ctl_reply_with_ok_false_exits_1() {
    // A host process that answers ok:false (an older or failing one): exit 1, line printed.
    let dir = TempDir::new("ctlfalse");
    let sock = dir.join("vmhost.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"{\"ok\":false,\"error\":\"vm crashed\"}\n").unwrap();
    });
    let out = Command::new(vmhost_bin()).arg("ctl").arg(&sock).arg("status").output().unwrap();
    t.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"ok\":false,\"error\":\"vm crashed\"}\n");
}

#[test]
fn is_alive_means_the_host_answered_ok() {
    // mb's IsAlive checks `ok`: a host that answers, but with an error, is not alive.
    let dir = TempDir::new("ctlalive");
    let sock = dir.join("vmhost.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        for reply in
            [&b"{\"ok\":false,\"error\":\"vm crashed\"}\n"[..], b"{\"ok\":true,\"state\":\"running\"}\n"]
        {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(reply).unwrap();
        }
    });
    let c = ControlClient::new(&sock);
    assert!(!c.is_alive(), "an ok:false reply");
    assert!(c.is_alive(), "an ok:true reply");
    t.join().unwrap();
    drop(dir);
    assert!(!c.is_alive(), "no host at all");
}

#[test]
fn request_keys_match_as_mbs_go_server_matches_them() {
    // encoding/json: keys equal to a field's name ignoring case, the last one winning,
    // unknown keys ignored, null leaving the field as it was.
    let dir = TempDir::new("ctlkeys");
    let (f, _remote) = fake();
    let server = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f.clone()).unwrap();
    let sock = server.socket_path().to_path_buf();
    let running = "{\"ok\":true,\"state\":\"running\"}\n";
    for req in [
        &b"{\"Method\":\"status\"}"[..],
        b"{\"METHOD\":\"status\"}",
        b"{\"method\":\"stop\",\"Method\":\"status\"}",
        b"{\"Method\":\"status\",\"method\":null}",
        b"{\"method\":\"status\",\"extra\":[1,{}]}",
    ] {
        assert_eq!(exchange(&sock, req), running, "{}", String::from_utf8_lossy(req));
    }
    assert_eq!(
        exchange(&sock, b"{\"Method\":\"Status\"}"),
        "{\"ok\":false,\"error\":\"unknown method: Status\"}\n",
        "values are not folded"
    );
    assert_eq!(
        exchange(&sock, b"{\"METHOD\":\"stop\",\"Timeout_Seconds\":7}"),
        "{\"ok\":true,\"state\":\"stopping\"}\n"
    );
    assert!(wait_until(GUARD, || !f.timeouts.lock().is_empty()));
    assert_eq!(f.timeouts.lock()[0], Duration::from_secs(7));
    for bad in [&b"{\"method\":null}"[..], b"{\"method\":\"stop\",\"timeout_seconds\":1.5}"] {
        let out = exchange(&sock, bad);
        assert!(out.starts_with("{\"ok\":false,\"error\":\"invalid request: "), "{out}");
    }
}

#[test]
fn second_start_on_a_live_socket_fails_and_keeps_the_pid_file() {
    let dir = TempDir::new("ctltwice");
    let (f, _remote) = fake();
    let first = ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f.clone()).unwrap();
    let pid = std::fs::read_to_string(dir.join("vmhost.pid")).unwrap();
    assert!(matches!(
        ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), f),
        Err(vmhost::Error::SocketInUse { .. })
    ));
    assert_eq!(std::fs::read_to_string(dir.join("vmhost.pid")).unwrap(), pid, "the live server's pid file");
    assert!(ControlClient::new(first.socket_path()).is_alive());
}
