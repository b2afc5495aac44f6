//! The QMP client against a real QEMU (`-M none`: no guest, starts in a blink).

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::Qemu;
use nix::sys::signal::{kill, Signal};
use vmhost::qmp::{cmd, Client, Error};

const T: Duration = Duration::from_secs(20);

macro_rules! qemu_or_skip {
    ($name:literal) => {
        match Qemu::start($name) {
            Some(q) => q,
            None => return,
        }
    };
}

#[test]
fn handshake_version_and_status() {
    let q = qemu_or_skip!("handshake_version_and_status");
    let c = Client::connect(q.stream(), T).unwrap();
    let g = c.server_info();
    assert!(g.qmp.version.qemu.major >= 2, "{:?}", g.qmp.version);
    assert!(g.qmp.capabilities.iter().any(|c| c == "oob"), "{:?}", g.qmp.capabilities);
    let v = c.execute(&cmd::QueryVersion, T).unwrap();
    assert_eq!(v, g.qmp.version);
    let s = c.execute(&cmd::QueryStatus, T).unwrap();
    assert_eq!((s.status.as_str(), s.running), ("running", true));
    assert!(c.is_connected());
}

#[test]
fn qmp_errors_are_typed_and_harmless() {
    let q = qemu_or_skip!("qmp_errors_are_typed_and_harmless");
    let c = Client::connect(q.stream(), T).unwrap();
    match c.execute_raw("no-such-command", None, T) {
        Err(Error::Qmp { command, class, desc }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    match c.execute_raw("human-monitor-command", None, T) {
        Err(Error::Qmp { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("command-line"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    assert!(c.execute(&cmd::QueryStatus, T).unwrap().running);
}

#[test]
fn typed_commands_and_their_events() {
    let q = qemu_or_skip!("typed_commands_and_their_events");
    let c = Client::connect(q.stream(), T).unwrap();
    let events = c.listen(64);
    c.execute(&cmd::Stop, T).unwrap();
    assert_eq!(events.recv_timeout(T).unwrap().event, "STOP");
    assert_eq!(c.execute(&cmd::QueryStatus, T).unwrap().status, "paused");
    c.execute(&cmd::Cont, T).unwrap();
    assert_eq!(events.recv_timeout(T).unwrap().event, "RESUME");
    c.execute(&cmd::SystemReset, T).unwrap();
    let reset = events.recv_timeout(T).unwrap();
    assert_eq!(
        (reset.event.as_str(), reset.data["reason"].as_str()),
        ("RESET", Some("host-qmp-system-reset"))
    );
    assert!(reset.timestamp.to_system_time().is_some());
    c.execute(&cmd::SystemPowerdown, T).unwrap();
    assert_eq!(events.recv_timeout(T).unwrap().event, "POWERDOWN");
    let cmds = c.execute(&cmd::QueryCommands, T).unwrap();
    assert!(cmds.iter().any(|i| i.name == "query-status") && cmds.len() > 50, "{}", cmds.len());
    assert!(c.execute(&cmd::QueryCpusFast, T).unwrap().is_empty(), "-M none has no CPUs");
    assert!(c.execute(&cmd::QueryBlock, T).unwrap().is_empty(), "-nodefaults has no drives");
    let out = c.execute(&cmd::HumanMonitorCommand::new("info version"), T).unwrap();
    assert!(out.starts_with(&c.server_info().qmp.version.qemu.to_string()), "{out}");
    assert_eq!(events.dropped(), 0);
}

#[test]
fn sixteen_threads_execute_at_once_without_crossed_replies() {
    let q = qemu_or_skip!("sixteen_threads_execute_at_once_without_crossed_replies");
    let c = Client::connect(q.stream(), T).unwrap();
    let version = c.server_info().qmp.version.qemu.to_string();
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let (c, version) = (c.clone(), version.clone());
            thread::spawn(move || {
                for i in 0..100 {
                    match (t + i) % 3 {
                        0 => assert!(c.execute(&cmd::QueryStatus, T).unwrap().running),
                        1 => assert_eq!(c.execute(&cmd::QueryVersion, T).unwrap().qemu.to_string(), version),
                        _ => {
                            // An echo: the HMP `print` of a number unique to this call.
                            let n = t * 1000 + i;
                            let out =
                                c.execute(&cmd::HumanMonitorCommand::new(format!("print {n}")), T).unwrap();
                            assert_eq!(out.trim(), format!("{n:#x}"), "reply of another caller");
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(c.unmatched_replies(), 0);
}

#[test]
fn reply_over_one_mebibyte() {
    let q = qemu_or_skip!("reply_over_one_mebibyte");
    let c = Client::connect(q.stream(), T).unwrap();
    // 131072 quadwords of the 16 MiB guest RAM, two per line: 65536 lines, ~3.8 MB.
    let out = c.execute(&cmd::HumanMonitorCommand::new("xp /131072gx 0"), T).unwrap();
    assert!(out.len() > 1 << 20, "{} bytes", out.len());
    assert_eq!(out.lines().count(), 65536);
    assert!(out.lines().last().unwrap().starts_with("00000000000ffff0:"), "{:?}", out.lines().last());
    assert!(c.execute(&cmd::QueryStatus, T).unwrap().running);
}

#[test]
fn qemu_killed_mid_call_fails_callers_and_listeners_at_once() {
    let q = qemu_or_skip!("qemu_killed_mid_call_fails_callers_and_listeners_at_once");
    let c = Client::connect(q.stream(), T).unwrap();
    let events = c.listen(8);
    // Freeze QEMU so the call is surely in flight, then kill it.
    kill(q.pid(), Signal::SIGSTOP).unwrap();
    let c2 = c.clone();
    let call = thread::spawn(move || {
        let start = Instant::now();
        (c2.execute(&cmd::QueryStatus, Duration::from_secs(60)), start.elapsed())
    });
    thread::sleep(Duration::from_millis(200));
    kill(q.pid(), Signal::SIGKILL).unwrap();
    let (result, waited) = call.join().unwrap();
    assert!(matches!(result, Err(Error::Disconnected { .. })), "{result:?}");
    // Hang guard far below the call's own 60 s deadline: the error came from the death.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(matches!(events.recv_timeout(T), Err(Error::Disconnected { .. })));
    assert!(!c.is_connected());
    assert!(matches!(c.execute(&cmd::QueryStatus, T), Err(Error::Disconnected { .. })));
}

#[test]
fn quit_gives_shutdown_event_then_eof() {
    let q = qemu_or_skip!("quit_gives_shutdown_event_then_eof");
    let c = Client::connect(q.stream(), T).unwrap();
    let events = c.listen(8);
    // QEMU may close before or after its reply reaches us: both are fine.
    let r = c.execute(&cmd::Quit, T);
    assert!(matches!(r, Ok(_) | Err(Error::Disconnected { .. })), "{r:?}");
    let ev = events.recv_timeout(T).unwrap();
    assert_eq!((ev.event.as_str(), ev.data["reason"].as_str()), ("SHUTDOWN", Some("host-qmp-quit")));
    match events.recv_timeout(T) {
        Err(Error::Disconnected { reason }) => assert!(!reason.is_empty()),
        other => panic!("expected the end of the connection, got {other:?}"),
    }
    assert!(!c.is_connected());
}

#[test]
fn second_client_times_out_on_greeting_instead_of_hanging() {
    let q = qemu_or_skip!("second_client_times_out_on_greeting_instead_of_hanging");
    let first = Client::connect(q.stream(), T).unwrap();
    let start = Instant::now();
    match Client::connect(q.stream(), Duration::from_millis(300)) {
        Err(e @ Error::Timeout { .. }) => assert!(e.to_string().contains("another client"), "{e}"),
        other => panic!("expected a greeting timeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // The first is unaffected.
    assert!(first.execute(&cmd::QueryStatus, T).unwrap().running);
}

#[test]
fn closed_listener_is_removed_others_keep_receiving() {
    let q = qemu_or_skip!("closed_listener_is_removed_others_keep_receiving");
    let c = Arc::new(Client::connect(q.stream(), T).unwrap());
    let a = c.listen(8);
    let b = c.listen(8);
    b.close();
    c.execute(&cmd::Stop, T).unwrap();
    assert_eq!(a.recv_timeout(T).unwrap().event, "STOP");
    assert!(matches!(b.recv_timeout(Duration::from_millis(50)), Err(Error::Closed)));
    drop(a);
    c.execute(&cmd::Cont, T).unwrap();
    c.close();
    assert!(matches!(c.execute(&cmd::QueryStatus, T), Err(Error::Closed)));
}

#[test]
fn cli_prints_return_or_error() {
    let q = qemu_or_skip!("cli_prints_return_or_error");
    let vmhost = common::vmhost_bin();
    let sock = q.socket.to_str().unwrap();
    let out = std::process::Command::new(&vmhost).args(["qmp", sock, "query-status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "running");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let out = std::process::Command::new(&vmhost)
        .args(["qmp", sock, "human-monitor-command", r#"{"command-line": "print 42"}"#])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\"0x2a\\r\\n\"\n");
    let out = std::process::Command::new(&vmhost).args(["qmp", sock, "bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "CommandNotFound: The command bogus has not been found\n"
    );

    // --events: a reader prints events as JSON lines while another client makes some.
    let events = std::process::Command::new(&vmhost)
        .args(["qmp", sock, "--events", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // QEMU serves one QMP client at a time, so the events come from outside QMP:
    // SIGTERM makes QEMU report a SHUTDOWN event and exit, which ends the stream.
    thread::sleep(Duration::from_millis(500));
    kill(q.pid(), Signal::SIGTERM).unwrap();
    let out = events.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "SHUTDOWN", "{text}");
    assert_eq!(first["data"]["reason"], "host-signal");
}

#[test]
fn works_over_tcp_too() {
    let Some(bin) = common::qemu_binary("works_over_tcp_too") else { return };
    // A free loopback port: bind, read it back, release it for QEMU.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(bin)
        .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("tcp:127.0.0.1:{port},server=on,wait=on")) // see common::Qemu::start
        .spawn()
        .unwrap();
    let mut stream = None;
    assert!(common::wait_until(T, || {
        stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok();
        stream.is_some()
    }));
    let c = Client::connect(stream.unwrap(), T).unwrap();
    assert!(c.execute(&cmd::QueryStatus, T).unwrap().running);
    let _ = c.execute(&cmd::Quit, T);
    assert!(common::wait_until(T, || child.try_wait().unwrap().is_some()), "QEMU did not quit");
}
