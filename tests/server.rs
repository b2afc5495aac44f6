//! The helper-protocol server and client over real Unix sockets, in-process.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{fd_count, wait_until, TempDir};
use vmhost::client::{self, Client};
use vmhost::server::{Mux, Server, ServerOptions};
use vmhost::wire::{self, msg, ErrorCode, ErrorFrame, Response, Wire};
use vmhost::Error;

const GUARD: Duration = Duration::from_secs(20);

/// A mux with an echo (FsReadFile returns its path), an id, and a panicking handler.
fn test_mux() -> Mux {
    let mut mux = Mux::new();
    mux.register(msg::INSTANCE_ID, |_, dec| {
        dec.finish()?;
        Ok(Response::InstanceId { id: "vm-test".into() }.into())
    });
    mux.register(msg::FS_READ_FILE, |_, dec| {
        let path = dec.string()?;
        dec.finish()?;
        Ok(Response::FsReadFile { data: path.into_bytes() }.into())
    });
    mux.register(msg::FS_REMOVE, |_, _| panic!("deliberate test panic"));
    mux
}

fn start(dir: &TempDir, opts: ServerOptions) -> Server {
    let server = Server::bind_with(dir.join("s.sock"), Arc::new(test_mux()), opts).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve().unwrap());
    server
}

fn raw_call(conn: &mut UnixStream, ty: u16, payload: &[u8]) -> wire::Frame {
    wire::write_frame(conn, ty, payload, wire::DEFAULT_MAX_FRAME).unwrap();
    wire::read_frame(conn, wire::DEFAULT_MAX_FRAME).unwrap()
}

fn remote(err: Error) -> ErrorFrame {
    match err {
        Error::Remote(f) => f,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn unknown_type_and_bad_payload() {
    let dir = TempDir::new("srv");
    let server = start(&dir, ServerOptions::default());
    let c = client::connect_to(server.socket_path(), GUARD).unwrap();
    let e = remote(c.call(0x0999, &[]).unwrap_err());
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert_eq!(e.message, "unknown message type: 0x0999");
    // A truncated string, then trailing garbage: typed errors naming the message.
    let e = remote(c.call(msg::FS_READ_FILE, &[0, 0, 0, 9, b'/']).unwrap_err());
    assert_eq!((e.code, e.op.as_str()), (ErrorCode::InvalidArgument, "FsReadFile"));
    assert!(e.message.contains("truncated"), "{}", e.message);
    let e = remote(c.call(msg::INSTANCE_ID, &[1]).unwrap_err());
    assert!(e.message.contains("unexpected bytes"), "{}", e.message);
    // And the connection still serves.
    assert_eq!(c.call(msg::INSTANCE_ID, &[]).unwrap().decoder().string().unwrap(), "vm-test");
    server.close();
}

#[test]
fn panicking_handler_answers_99_and_connection_goes_on() {
    let dir = TempDir::new("srv");
    let server = start(&dir, ServerOptions::default());
    let mut conn = UnixStream::connect(server.socket_path()).unwrap();
    let f = raw_call(&mut conn, msg::FS_REMOVE, &[]);
    assert_eq!(f.ty, msg::ERROR);
    let e = ErrorFrame::from_payload(&f.payload).unwrap();
    assert_eq!((e.code, e.op.as_str()), (ErrorCode::Unknown, "FsRemove"));
    assert!(e.message.contains("deliberate test panic"), "{}", e.message);
    // Same connection, next request.
    let f = raw_call(&mut conn, msg::INSTANCE_ID, &[]);
    assert_eq!(f.ty, msg::RESPONSE);
    assert_eq!(f.payload, [0, 0, 0, 0, 7, b'v', b'm', b'-', b't', b'e', b's', b't']);
    server.close();
}

#[test]
fn oversized_frame_gets_error_and_close_others_unaffected() {
    let dir = TempDir::new("srv");
    let server = start(&dir, ServerOptions { max_frame: 1024, ..Default::default() });
    let mut other = UnixStream::connect(server.socket_path()).unwrap();
    let mut conn = UnixStream::connect(server.socket_path()).unwrap();
    conn.write_all(&wire::Header { ty: msg::FS_WRITE_FILE, len: 1025 }.to_bytes()).unwrap();
    let f = wire::read_frame(&mut conn, wire::DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(f.ty, msg::ERROR);
    let e = ErrorFrame::from_payload(&f.payload).unwrap();
    assert_eq!((e.code, e.op.as_str()), (ErrorCode::InvalidArgument, "FsWriteFile"));
    assert!(e.message.contains("frame too large"), "{}", e.message);
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(GUARD)).unwrap();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0, "connection should be closed");
    // Exactly at the bound is fine, on another connection.
    let path = "p".repeat(1020);
    let mut payload = Vec::new();
    payload.extend_from_slice(&(path.len() as u32).to_be_bytes());
    payload.extend_from_slice(path.as_bytes());
    assert_eq!(payload.len(), 1024);
    let f = raw_call(&mut other, msg::FS_READ_FILE, &payload);
    assert_eq!(f.ty, msg::ERROR, "the 1030-byte answer exceeds the bound and is refused cleanly");
    assert_eq!(raw_call(&mut other, msg::INSTANCE_ID, &[]).ty, msg::RESPONSE);
    server.close();
}

#[test]
fn garbage_on_one_connection_while_another_works() {
    let dir = TempDir::new("srv");
    let server = start(&dir, ServerOptions::default());
    let path = server.socket_path().to_path_buf();
    let garbage = thread::spawn(move || {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200 {
            let mut conn = UnixStream::connect(&path).unwrap();
            conn.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 256];
            for b in buf.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }
            let _ = conn.write_all(&buf);
            let _ = conn.read(&mut buf);
        }
    });
    let c = client::connect_to(server.socket_path(), GUARD).unwrap();
    for i in 0..500 {
        let p = format!("/path/{i}");
        let r = c.call_with(msg::FS_READ_FILE, |e| {
            e.string(&p);
        });
        assert_eq!(r.unwrap().decoder().bytes().unwrap(), p.as_bytes());
    }
    garbage.join().unwrap();
    assert_eq!(c.call(msg::INSTANCE_ID, &[]).unwrap().decoder().string().unwrap(), "vm-test");
    server.close();
}

#[test]
fn many_threads_no_lost_or_crossed_replies() {
    let dir = TempDir::new("srv");
    let server = start(&dir, ServerOptions::default());
    let c = Arc::new(client::connect_to(server.socket_path(), GUARD).unwrap());
    let threads = 64;
    let calls = 1000;
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (c, done) = (c.clone(), done.clone());
            thread::spawn(move || {
                for i in 0..calls {
                    let p = format!("{t}/{i}");
                    let r = c
                        .call_with(msg::FS_READ_FILE, |e| {
                            e.string(&p);
                        })
                        .unwrap();
                    assert_eq!(r.decoder().bytes().unwrap(), p.as_bytes(), "crossed reply");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), threads * calls);
    server.close();
}

#[test]
fn socket_and_directory_permissions() {
    let dir = TempDir::new("perm");
    let sock = dir.join("a/b/helper.sock");
    let server = Server::bind(&sock, Arc::new(Mux::new())).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&dir.join("a/b")), 0o700);
    assert_eq!(mode(&dir.join("a")), 0o700);
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
    server.close();
    assert!(!sock.exists(), "close removes the socket");
}

#[test]
fn stale_socket_replaced_live_refused_other_file_kept() {
    let dir = TempDir::new("stale");
    let sock = dir.join("s.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves a socket file nobody serves
    assert!(sock.exists());
    let live = Server::bind(&sock, Arc::new(Mux::new())).expect("stale socket replaced");
    match Server::bind(&sock, Arc::new(Mux::new())) {
        Err(Error::SocketInUse { path }) => assert_eq!(path, sock),
        Err(e) => panic!("expected SocketInUse, got {e}"),
        Ok(_) => panic!("a live socket was taken over"),
    }
    live.close();
    let file = dir.join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(Server::bind(&file, Arc::new(Mux::new())).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let long = dir.join(&"x".repeat(120));
    assert!(matches!(Server::bind(&long, Arc::new(Mux::new())), Err(Error::SocketPathTooLong { .. })));
}

#[test]
fn close_unblocks_serve_and_serve_one() {
    let dir = TempDir::new("close");
    let server = Server::bind(dir.join("a.sock"), Arc::new(test_mux())).unwrap();
    let s = server.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || tx.send(s.serve()).unwrap());
    thread::sleep(Duration::from_millis(50));
    server.close();
    assert!(rx.recv_timeout(GUARD).expect("serve returned").is_ok());

    // serve_one blocked in accept.
    let one = Server::bind(dir.join("b.sock"), Arc::new(test_mux())).unwrap();
    let s = one.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || tx.send(s.serve_one()).unwrap());
    thread::sleep(Duration::from_millis(50));
    one.close();
    assert!(rx.recv_timeout(GUARD).expect("serve_one returned from accept").is_ok());

    // serve_one blocked reading an idle connection.
    let one = Server::bind(dir.join("c.sock"), Arc::new(test_mux())).unwrap();
    let s = one.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || tx.send(s.serve_one()).unwrap());
    let mut conn = UnixStream::connect(one.socket_path()).unwrap();
    assert_eq!(raw_call(&mut conn, msg::INSTANCE_ID, &[]).ty, msg::RESPONSE);
    one.close();
    assert!(rx.recv_timeout(GUARD).expect("serve_one returned from read").is_ok());
    assert!(!dir.join("c.sock").exists());
}

#[test]
fn peer_with_other_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP peer_with_other_uid_is_refused: needs root to connect as another uid");
        return;
    }
    let dir = TempDir::new("peer");
    let server = start(&dir, ServerOptions::default());
    // Open the way for uid 65534 so that only the SO_PEERCRED check can refuse it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(server.socket_path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let addr = nix::sys::socket::UnixAddr::new(server.socket_path()).unwrap();
    let request = wire::Header { ty: msg::INSTANCE_ID, len: 0 }.to_bytes();
    // SAFETY: fork in a test process; the child only makes system calls (no allocation)
    // before _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            use nix::sys::socket::*;
            let code = (|| {
                if nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).is_err() {
                    return 10;
                }
                let Ok(fd) = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None) else {
                    return 11;
                };
                let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
                if connect(raw, &addr).is_err() {
                    return 12;
                }
                let _ = nix::unistd::write(&fd, &request);
                let mut buf = [0u8; 64];
                match nix::unistd::read(raw, &mut buf) {
                    Ok(0) | Err(_) => 0, // dropped without an answer
                    Ok(_) => 1,          // answered: the check failed
                }
            })();
            // SAFETY: _exit ends the forked child without running the parent's handlers.
            unsafe { nix::libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the other uid was answered or could not try"
            );
        }
    }
    // Our own uid is still served.
    let c = client::connect_to(server.socket_path(), GUARD).unwrap();
    assert!(c.call(msg::INSTANCE_ID, &[]).is_ok());
    server.close();
}

#[test]
fn no_fd_growth_after_10000_connect_close_cycles() {
    let dir = TempDir::new("fds");
    let server = start(&dir, ServerOptions::default());
    let me = std::process::id();
    // Warm up, so lazily opened descriptors are counted in the baseline.
    drop(client::connect_to(server.socket_path(), GUARD).unwrap());
    assert!(wait_until(GUARD, || server.connections() == 0));
    let before = fd_count(me);
    for _ in 0..10_000 {
        let c = client::connect_to(server.socket_path(), GUARD).unwrap();
        c.call(msg::INSTANCE_ID, &[]).unwrap();
        c.close().unwrap();
    }
    assert!(wait_until(GUARD, || server.connections() == 0), "connections not released");
    let after = fd_count(me);
    assert!(after <= before, "descriptors grew from {before} to {after}");
    server.close();
}

#[test]
fn client_is_send_sync_and_closed_client_refuses() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client>();
    assert_send_sync::<Server>();
    let dir = TempDir::new("closed");
    let server = start(&dir, ServerOptions::default());
    let c = client::connect_to(server.socket_path(), GUARD).unwrap();
    assert!(c.is_alive());
    c.close().unwrap();
    assert!(!c.is_alive());
    assert!(matches!(c.call(msg::INSTANCE_ID, &[]), Err(Error::Closed)));
    server.close();
    // connect_to a socket nobody serves gives up after its timeout with a clear error.
    let e = client::connect_to(dir.join("none.sock"), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, Error::ConnectTimeout { .. }), "{e}");
    assert!(e.to_string().contains("none.sock"), "{e}");
}

#[test]
fn close_answers_calls_in_flight_and_cuts_what_outlasts_its_grace() {
    let dir = TempDir::new("gone");
    let mut mux = Mux::new();
    let (started, handlers) = crossbeam_channel::unbounded();
    let s2 = started.clone();
    mux.register(msg::INSTANCE_WAIT, move |_, _| {
        let _ = s2.send(());
        thread::sleep(Duration::from_millis(300));
        Ok(Response::InstanceWait {}.into())
    });
    // Longer than close()'s grace.
    mux.register(msg::INSTANCE_CLOSE, move |_, _| {
        let _ = started.send(());
        thread::sleep(vmhost::server::CLOSE_GRACE + Duration::from_secs(3));
        Ok(Response::InstanceClose {}.into())
    });
    let server = Server::bind(dir.join("s.sock"), Arc::new(mux)).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve());
    let c = client::connect_to(server.socket_path(), GUARD).unwrap();
    let slow = client::connect_to(server.socket_path(), GUARD).unwrap();
    let s = server.clone();
    let closer = thread::spawn(move || {
        // Both calls are being served.
        for _ in 0..2 {
            handlers.recv_timeout(GUARD).unwrap();
        }
        s.close();
    });
    let slow_call = thread::spawn(move || slow.call(msg::INSTANCE_CLOSE, &[]));
    // A call being served when the server closes gets its answer, not an EOF ...
    assert!(c.call(msg::INSTANCE_WAIT, &[]).is_ok());
    // ... and one that outlasts the grace is cut: an error, never a hang.
    match slow_call.join().unwrap() {
        Err(Error::Frame { op, .. }) => assert_eq!(op, "InstanceClose"),
        other => panic!("expected a frame error, got {other:?}"),
    }
    closer.join().unwrap();
    // The connection is closed after its answer.
    assert!(c.call(msg::INSTANCE_WAIT, &[]).is_err());
}

#[test]
fn serve_until_idle_gives_up_when_no_client_ever_comes() {
    let dir = TempDir::new("noclient");
    let opts = ServerOptions { first_client_timeout: Duration::from_millis(100), ..Default::default() };
    let server = Server::bind_with(dir.join("s.sock"), Arc::new(test_mux()), opts).unwrap();
    let s = server.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || tx.send(s.serve_until_idle()).unwrap());
    assert!(rx.recv_timeout(GUARD).expect("returned").is_ok());
    server.close();
}

#[test]
fn a_handler_sees_its_client_hang_up() {
    let dir = TempDir::new("hangup");
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut mux = Mux::new();
    mux.register(msg::INSTANCE_WAIT, move |call, _| {
        let start = std::time::Instant::now();
        while !call.is_cancelled() && start.elapsed() < GUARD {
            thread::sleep(Duration::from_millis(10));
        }
        let _ = tx.send(call.is_cancelled());
        Ok(Response::InstanceWait {}.into())
    });
    let server = Server::bind(dir.join("s.sock"), Arc::new(mux)).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve());
    let mut conn = UnixStream::connect(server.socket_path()).unwrap();
    wire::write_frame(&mut conn, msg::INSTANCE_WAIT, &[], wire::DEFAULT_MAX_FRAME).unwrap();
    thread::sleep(Duration::from_millis(100));
    drop(conn); // the client goes away mid-call
    assert_eq!(rx.recv_timeout(GUARD), Ok(true), "the handler was not told");
    server.close();
}

/// Reads what a server sends until it closes: the frames, in order.
fn frames_until_closed(s: &mut UnixStream) -> Vec<wire::Frame> {
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut out = Vec::new();
    while let Ok(f) = wire::read_frame(s, 1 << 20) {
        out.push(f);
    }
    out
}

#[test]
fn a_frame_that_stalls_is_answered_timeout_and_closed_while_idle_connections_stay() {
    let dir = TempDir::new("stall");
    let timeout = Duration::from_millis(300);
    let opts = ServerOptions { frame_timeout: timeout, ..Default::default() };
    let server = Server::bind_with(dir.join("s.sock"), Arc::new(test_mux()), opts).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve());
    let sock = server.socket_path().to_path_buf();
    let expect_timeout = |frames: Vec<wire::Frame>, what: &str| {
        assert_eq!(frames.len(), 1, "{what}: {} frames", frames.len());
        assert_eq!(frames[0].ty, msg::ERROR, "{what}");
        let ef = ErrorFrame::from_payload(&frames[0].payload).unwrap();
        assert_eq!(ef.code, ErrorCode::Timeout, "{what}: {ef:?}");
        assert!(ef.message.contains("did not arrive whole within 0.3 s"), "{what}: {ef:?}");
    };
    // Idle between frames for several times the frame timeout: still served.
    let idle = client::connect_to(&sock, GUARD).unwrap();
    thread::sleep(timeout * 4);
    assert!(idle.call(msg::INSTANCE_ID, &[]).is_ok());
    // Half a header, then silence.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&[0x01, 0x03, 0]).unwrap();
    let start = std::time::Instant::now();
    expect_timeout(frames_until_closed(&mut s), "half a header");
    assert!(start.elapsed() < GUARD);
    // A whole header announcing 10 bytes, then only some of them.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&[0x01, 0x03, 0, 0, 0, 10, 1, 2]).unwrap();
    expect_timeout(frames_until_closed(&mut s), "part of a payload");
    // A drip of one byte every 100 ms: each read is quick, the frame is not.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let dripper = thread::spawn(move || {
        let frame = [0x01, 0x03, 0, 0, 0, 20];
        let mut sent = 0;
        for b in frame.iter().chain([0u8; 20].iter()) {
            if w.write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            thread::sleep(Duration::from_millis(100));
        }
        sent
    });
    expect_timeout(frames_until_closed(&mut s), "a drip");
    assert!(dripper.join().unwrap() < 26, "the whole dripped frame was read");
    // The server and its other connections are fine.
    assert!(idle.call(msg::INSTANCE_ID, &[]).is_ok());
    server.close();
}
