//! The real `vmhost helper` binary over real Unix sockets.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fd_count, vmhost_bin, wait_until, TempDir};
use vmhost::client::{self, HelperSearch};
use vmhost::wire::{self, msg, ErrorCode, InstanceNew, InstanceOptions, Request, SourceType, Wire};
use vmhost::Error;

const GUARD: Duration = Duration::from_secs(20);

fn start_helper(dir: &TempDir) -> (Child, PathBuf) {
    let sock = dir.join("helper.sock");
    let child = Command::new(vmhost_bin())
        .args(["helper", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    (child, sock)
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let mut status = None;
    assert!(
        wait_until(GUARD, || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "helper did not exit"
    );
    status.unwrap()
}

fn remote(r: vmhost::Result<client::Response>) -> wire::ErrorFrame {
    match r {
        Err(Error::Remote(f)) => f,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn spawned_helper_answers_every_message_until_an_instance_exists() {
    std::env::set_var("VMHOST_HELPER_PATH", vmhost_bin());
    let c = client::spawn_helper().unwrap();
    assert!(c.is_alive());
    let sock = c.socket_path().to_path_buf();
    let name = sock.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with(&format!("vmhost-{}-", std::process::id())) && name.ends_with(".sock"),
        "{name}"
    );

    for &(ty, name) in msg::ALL {
        if msg::is_answer(ty) || ty == msg::INSTANCE_NEW || ty == msg::BUILD_DOCKERFILE {
            continue;
        }
        // The shortest all-zero payload that is a valid request of this type (empty
        // strings, zero handles and counts).
        let payload = (0..64)
            .map(|n| vec![0u8; n])
            .find(|p| matches!(Request::from_payload(ty, p), Ok(Some(_))))
            .unwrap_or_else(|| panic!("{name}: no zero payload decodes"));
        let e = remote(c.call(ty, &payload));
        assert_eq!(e.op, name);
        if (msg::SNAPSHOT_CACHE_KEY..=msg::SNAPSHOT_AS_SOURCE).contains(&ty) {
            // Snapshot handles are the helper's, not an instance's: served without one.
            assert_eq!(e.code, ErrorCode::InvalidHandle, "{name}");
            assert!(e.message.contains("no snapshot with handle 0"), "{name}: {}", e.message);
        } else {
            assert_eq!(e.code, ErrorCode::NotRunning, "{name}");
            assert!(e.message.contains("InstanceNew"), "{name}: {}", e.message);
        }
        // The same request with a byte too many is refused as malformed.
        let mut longer = payload.clone();
        longer.push(7);
        let e = remote(c.call(ty, &longer));
        assert_eq!((e.code, e.op.as_str()), (ErrorCode::InvalidArgument, name));
        assert!(e.message.contains("unexpected bytes"), "{name}: {}", e.message);
    }
    // InstanceNew: a missing image directory is an I/O error naming it (before any boot) ...
    let req = InstanceNew {
        source_type: SourceType::Dir,
        source_path: "/srv/rootfs".into(),
        image_ref: String::new(),
        cache_dir: "/tmp/c".into(),
        options: InstanceOptions { memory_mb: 128, cpus: 1, ..Default::default() },
    };
    let e = remote(c.call(msg::INSTANCE_NEW, &Wire::to_payload(&req)));
    assert_eq!((e.code, e.op.as_str(), e.path.as_str()), (ErrorCode::Io, "InstanceNew", "/srv/rootfs"));
    assert!(e.message.contains("no such directory"), "{}", e.message);
    // ... a bad registry reference says what is wrong with it, and one whose registry
    // does not answer names the registry (the store, in a scratch cache dir, is empty) ...
    let cache = common::TempDir::new("helper-ref");
    let cache_dir = cache.path().display().to_string();
    let reg = InstanceNew {
        source_type: SourceType::Registry,
        image_ref: "Alpine:3".into(),
        cache_dir: cache_dir.clone(),
        ..req.clone()
    };
    let e = remote(c.call(msg::INSTANCE_NEW, &Wire::to_payload(&reg)));
    assert_eq!((e.code, e.path.as_str()), (ErrorCode::InvalidArgument, "Alpine:3"));
    assert!(e.message.contains("lowercase"), "{}", e.message);
    let reg = InstanceNew { image_ref: "127.0.0.1:1/none:1".into(), ..reg };
    let e = remote(c.call(msg::INSTANCE_NEW, &Wire::to_payload(&reg)));
    assert!(e.message.contains("registry 127.0.0.1:1"), "{}", e.message);
    // ... a malformed one with code 2.
    let mut bad = Wire::to_payload(&req);
    bad.truncate(bad.len() - 2);
    let e = remote(c.call(msg::INSTANCE_NEW, &bad));
    assert_eq!((e.code, e.op.as_str()), (ErrorCode::InvalidArgument, "InstanceNew"));
    let e = remote(c.call(0x0A00, &[]));
    assert_eq!((e.code, e.message.as_str()), (ErrorCode::InvalidArgument, "unknown message type: 0x0a00"));

    c.close().unwrap();
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn helper_exits_when_its_last_client_goes_and_removes_socket() {
    let dir = TempDir::new("hexit");
    let (mut child, sock) = start_helper(&dir);
    let a = client::connect_to(&sock, GUARD).unwrap();
    let b = client::connect_to(&sock, GUARD).unwrap();
    a.close().unwrap();
    // One client left: the helper keeps serving.
    assert!(matches!(b.call(msg::INSTANCE_ID, &[]), Err(Error::Remote(_))));
    assert!(child.try_wait().unwrap().is_none());
    b.close().unwrap();
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(!sock.exists());
}

#[test]
fn helper_exits_on_sigterm_and_sigint_removing_socket() {
    for sig in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        let dir = TempDir::new("hsig");
        let (mut child, sock) = start_helper(&dir);
        let c = client::connect_to(&sock, GUARD).unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = wait_exit(&mut child);
        assert!(status.success(), "{sig:?}: {status}");
        assert!(!sock.exists(), "{sig:?}: socket left behind");
        // The client sees a clear error, not a hang.
        assert!(c.call(msg::INSTANCE_ID, &[]).is_err());
    }
}

#[test]
fn helper_survives_garbage_on_one_connection() {
    let dir = TempDir::new("hgarb");
    let (mut child, sock) = start_helper(&dir);
    let good = client::connect_to(&sock, GUARD).unwrap();
    for garbage in
        [&b"\xff\xff\xff\xff\xff\xff"[..], b"\x01\x03\x00", b"GET / HTTP/1.1\r\n\r\n", &[0u8; 4096]]
    {
        let mut bad = UnixStream::connect(&sock).unwrap();
        bad.set_read_timeout(Some(GUARD)).unwrap();
        bad.write_all(garbage).unwrap();
        bad.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let _ = bad.read_to_end(&mut answer);
        let e = remote(good.call(msg::INSTANCE_IS_RUNNING, &[]));
        assert_eq!(e.code, ErrorCode::NotRunning);
    }
    // A frame over the helper's bound: Error frame code 2, then the connection closes.
    let mut big = UnixStream::connect(&sock).unwrap();
    big.write_all(&wire::Header { ty: msg::FS_WRITE_FILE, len: u32::MAX }.to_bytes()).unwrap();
    let f = wire::read_frame(&mut big, wire::DEFAULT_MAX_FRAME).unwrap();
    let e = wire::ErrorFrame::from_payload(&f.payload).unwrap();
    assert_eq!((f.ty, e.code), (msg::ERROR, ErrorCode::InvalidArgument));
    assert!(child.try_wait().unwrap().is_none(), "helper died");
    drop(good);
    wait_exit(&mut child);
}

#[test]
fn helper_descriptors_do_not_grow_over_10000_connections() {
    let dir = TempDir::new("hfd");
    let (mut child, sock) = start_helper(&dir);
    let anchor = client::connect_to(&sock, GUARD).unwrap(); // keeps the helper alive
    remote(anchor.call(msg::INSTANCE_ID, &[]));
    // The baseline once it has settled: the hang-up watcher holds a duplicate of the
    // last watched connection for up to ~250 ms.
    let mut before = fd_count(child.id());
    assert!(
        wait_until(GUARD, || {
            std::thread::sleep(Duration::from_millis(500));
            let now = fd_count(child.id());
            std::mem::replace(&mut before, now) == now
        }),
        "helper descriptors never settled"
    );
    for _ in 0..10_000 {
        let c = client::connect_to(&sock, GUARD).unwrap();
        remote(c.call(msg::INSTANCE_ID, &[]));
        c.close().unwrap();
    }
    let mut after = 0;
    assert!(
        wait_until(GUARD, || {
            after = fd_count(child.id());
            after <= before
        }),
        "helper descriptors grew from {before} to {after}"
    );
    drop(anchor);
    wait_exit(&mut child);
}

#[test]
fn helper_search_order_and_not_found() {
    let dir = TempDir::new("search");
    let mk = |rel: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let env_bin = mk("env/vmhost-custom");
    let exe_dir_bin = mk("exe/vmhost");
    let home_bin = mk("home/.local/share/vmhost/bin/vmhost");
    let path_bin = mk("path2/vmhost");
    std::fs::create_dir_all(dir.join("path1")).unwrap();
    let mut s = HelperSearch {
        env_path: Some(env_bin.clone()),
        current_exe: Some(dir.join("exe/myprog")),
        home: Some(dir.join("home")),
        path_var: Some(std::env::join_paths([dir.join("path1"), dir.join("path2")]).unwrap()),
    };
    assert_eq!(client::find_helper(&s).unwrap(), env_bin);
    s.env_path = Some(dir.join("env/missing"));
    assert_eq!(client::find_helper(&s).unwrap(), exe_dir_bin);
    s.current_exe = Some(dir.join("elsewhere/myprog"));
    assert_eq!(client::find_helper(&s).unwrap(), home_bin);
    s.home = Some(dir.join("nohome"));
    assert_eq!(client::find_helper(&s).unwrap(), path_bin);
    // A non-executable file is not a helper.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path_bin, std::fs::Permissions::from_mode(0o644)).unwrap();
    match client::find_helper(&s) {
        Err(e @ Error::HelperNotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("VMHOST_HELPER_PATH"), "{msg}");
            assert!(msg.contains("path2/vmhost") && msg.contains("nohome"), "{msg}");
        }
        other => panic!("expected HelperNotFound, got {other:?}"),
    }
}

#[test]
fn helper_that_dies_at_start_is_reported() {
    let dir = TempDir::new("dies");
    let fake = dir.join("vmhost");
    std::fs::write(&fake, b"#!/bin/sh\necho 'fake helper failing' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Run in a child process so the environment change stays there.
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "spawn_with_failing_helper_inner", "--nocapture", "--ignored"])
        .env("VMHOST_HELPER_PATH", &fake)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
#[ignore = "run by helper_that_dies_at_start_is_reported in a child process"]
fn spawn_with_failing_helper_inner() {
    match client::spawn_helper() {
        Err(Error::HelperExited { status, .. }) => assert_eq!(status.code(), Some(3)),
        other => panic!("expected HelperExited, got {other:?}"),
    }
}

#[test]
fn use_helper_parses_the_documented_values() {
    for v in ["1", "true", "YES", "on"] {
        assert_eq!(client::parse_bool(v), Some(true), "{v}");
    }
    for v in ["0", "false", "No", "off"] {
        assert_eq!(client::parse_bool(v), Some(false), "{v}");
    }
    assert_eq!(client::parse_bool("maybe"), None);
    let out = |val: Option<&str>| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "use_helper_inner", "--nocapture", "--ignored"]);
        match val {
            Some(v) => c.env("VMHOST_USE_HELPER", v),
            None => c.env_remove("VMHOST_USE_HELPER"),
        };
        String::from_utf8(c.output().unwrap().stdout).unwrap()
    };
    assert!(out(Some("yes")).contains("use_helper=true"));
    assert!(out(Some("off")).contains("use_helper=false"));
    assert!(out(None).contains("use_helper=false"));
}

#[test]
#[ignore = "run by use_helper_parses_the_documented_values in a child process"]
fn use_helper_inner() {
    println!("use_helper={}", client::use_helper());
}

#[test]
fn refused_frames_never_cost_the_helper() {
    // A helper with a small frame bound, a client with the default one.
    let dir = TempDir::new("hbound");
    let sock = dir.join("helper.sock");
    let mut child = Command::new(vmhost_bin())
        .args(["helper", "--max-frame", "1024", "--socket"])
        .arg(&sock)
        .spawn()
        .unwrap();
    let c = client::connect_to(&sock, GUARD).unwrap();
    // The helper refuses the frame and says why; the client reports that, not EPIPE.
    let big = vec![0u8; 1 << 20];
    let e = remote(c.call(msg::FS_WRITE_FILE, &big));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("frame too large"), "{}", e.message);
    // A frame the client itself refuses (over its own 64 MiB bound) is never sent.
    let huge = vec![0u8; (wire::DEFAULT_MAX_FRAME + 1) as usize];
    assert!(matches!(c.call(msg::FS_WRITE_FILE, &huge), Err(Error::Frame { .. })));
    // Neither cost the helper: it still serves.
    assert_eq!(remote(c.call(msg::INSTANCE_ID, &[])).code, ErrorCode::NotRunning);
    assert!(child.try_wait().unwrap().is_none());
    c.close().unwrap();
    assert!(wait_exit(&mut child).success());
}

#[test]
fn a_link_named_cc_helper_serves_as_the_originals_helper() {
    // The original's clients run `cc-helper -socket PATH` (Go flag style).
    let dir = TempDir::new("cchelper");
    let link = dir.join("cc-helper");
    std::os::unix::fs::symlink(vmhost_bin(), &link).unwrap();
    let sock = dir.join("h.sock");
    let mut child = Command::new(&link).arg("-socket").arg(&sock).stdin(Stdio::null()).spawn().unwrap();
    let c = client::connect_to(&sock, GUARD).unwrap();
    // A helper with no instance: InstanceID answers NotRunning, as any helper's would.
    let e = remote(c.call(msg::INSTANCE_ID, &[]));
    assert_eq!((e.code, e.op.as_str()), (ErrorCode::NotRunning, "InstanceID"));
    c.close().unwrap();
    assert!(wait_exit(&mut child).success());
    assert!(!sock.exists(), "socket left behind");
    // `vmhost helper -socket` is the same.
    let sock = dir.join("h2.sock");
    let mut child = Command::new(vmhost_bin())
        .args(["helper", "-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let c = client::connect_to(&sock, GUARD).unwrap();
    assert_eq!(remote(c.call(msg::INSTANCE_ID, &[])).code, ErrorCode::NotRunning);
    c.close().unwrap();
    assert!(wait_exit(&mut child).success());
}
