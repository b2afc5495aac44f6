//! The QMP client against a scripted server, for what a real QEMU cannot be made to do:
//! events before the greeting and between a command and its reply, replies that never
//! come or come late or out of order, a 20 MiB line, garbage lines, a full listener.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmhost::qmp::{cmd, Client, Error};

const T: Duration = Duration::from_secs(20);
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

struct Fake {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Fake {
    fn pair() -> (Fake, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(T)).unwrap();
        (Fake { r: BufReader::new(ours.try_clone().unwrap()), w: ours }, theirs)
    }
    /// Writes one line. Errors are ignored: some tests have the client hang up on
    /// purpose while the script is still writing.
    fn send(&mut self, line: &str) {
        let _ = self.w.write_all(line.as_bytes()).and_then(|()| self.w.write_all(b"\r\n"));
    }
    fn event(&mut self, name: &str, n: i64) {
        self.send(&format!(r#"{{"event": "{name}", "data": {{"n": {n}}}, "timestamp": {{"seconds": 1700000000, "microseconds": {n}}}}}"#));
    }
    fn read_cmd(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("client sent {line:?}: {e}"))
    }
    fn reply(&mut self, id: &Value, ret: Value) {
        self.send(&json!({"return": ret, "id": id}).to_string());
    }
    fn handshake(&mut self) {
        self.send(GREETING);
        let c = self.read_cmd();
        assert_eq!(c["execute"], "qmp_capabilities");
        self.reply(&c["id"], json!({}));
    }
}

fn connect(theirs: UnixStream) -> Client {
    Client::connect(theirs, T).unwrap()
}

#[test]
fn events_before_greeting_and_before_capabilities_reply_reach_listeners() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.event("EARLY", 1);
        f.send(GREETING);
        let c = f.read_cmd();
        assert_eq!(c["execute"], "qmp_capabilities");
        assert!(c.get("arguments").is_none());
        f.event("BETWEEN", 2);
        f.reply(&c["id"], json!({}));
        f
    });
    let (client, events) = Client::connect_with_listener(theirs, T, 16).unwrap();
    assert_eq!(events.recv_timeout(T).unwrap().event, "EARLY");
    let ev = events.recv_timeout(T).unwrap();
    assert_eq!((ev.event.as_str(), ev.data["n"].as_i64()), ("BETWEEN", Some(2)));
    assert_eq!(client.server_info().qmp.version.package, "fake");
    server.join().unwrap();
}

#[test]
fn event_between_command_and_reply_is_not_taken_for_the_reply() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let c = f.read_cmd();
        assert_eq!(c["execute"], "query-status");
        f.event("STOP", 7);
        f.send(r#"{"event": "NOTIME", "timestamp": {"seconds": -1, "microseconds": -1}}"#);
        f.reply(&c["id"], json!({"status": "paused", "running": false}));
        f
    });
    let c = connect(theirs);
    let events = c.listen(16);
    let s = c.execute(&cmd::QueryStatus, T).unwrap();
    assert_eq!(s.status, "paused");
    let ev = events.recv_timeout(T).unwrap();
    assert_eq!(ev.event, "STOP");
    assert_eq!(ev.timestamp.microseconds, 7);
    let ev = events.recv_timeout(T).unwrap();
    assert_eq!((ev.event.as_str(), ev.timestamp.to_system_time()), ("NOTIME", None));
    server.join().unwrap();
}

#[test]
fn reply_that_never_comes_times_out_and_its_late_arrival_is_harmless() {
    let (mut f, theirs) = Fake::pair();
    let (late_tx, late_rx) = crossbeam_channel::bounded::<()>(1);
    let server = thread::spawn(move || {
        f.handshake();
        let first = f.read_cmd();
        late_rx.recv().unwrap(); // answer only after the caller gave up
        f.reply(&first["id"], json!({"status": "late", "running": false}));
        let second = f.read_cmd();
        f.reply(&second["id"], json!({"status": "running", "running": true}));
        f
    });
    let c = connect(theirs);
    let start = Instant::now();
    match c.execute(&cmd::QueryStatus, Duration::from_millis(200)) {
        Err(Error::Timeout { what, .. }) => assert_eq!(what, "query-status"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(start.elapsed() < T);
    late_tx.send(()).unwrap();
    let s = c.execute(&cmd::QueryStatus, T).unwrap();
    assert_eq!(s.status, "running", "the late reply must not answer the next call");
    assert_eq!(c.unmatched_replies(), 1);
    assert!(c.is_connected());
    server.join().unwrap();
}

#[test]
fn replies_out_of_order_reach_their_own_callers() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let a = f.read_cmd();
        let b = f.read_cmd();
        // Answer in reverse order, each with its own command's name.
        for c in [&b, &a] {
            f.reply(&c["id"], json!(c["arguments"]["command-line"].clone()));
        }
        f
    });
    let c = connect(theirs);
    let c2 = c.clone();
    let t = thread::spawn(move || c2.execute(&cmd::HumanMonitorCommand::new("one"), T).unwrap());
    // Make sure "one" is sent first.
    thread::sleep(Duration::from_millis(100));
    let two = c.execute(&cmd::HumanMonitorCommand::new("two"), T).unwrap();
    assert_eq!(two, "two");
    assert_eq!(t.join().unwrap(), "one");
    server.join().unwrap();
}

#[test]
fn a_twenty_mebibyte_line_arrives_whole() {
    let (mut f, theirs) = Fake::pair();
    let big = "x".repeat(20 << 20);
    let expect = big.clone();
    let server = thread::spawn(move || {
        f.handshake();
        let c = f.read_cmd();
        f.reply(&c["id"], json!(big));
        f
    });
    let c = connect(theirs);
    let out = c.execute(&cmd::HumanMonitorCommand::new("big"), T).unwrap();
    assert_eq!(out.len(), expect.len());
    assert!(out == expect);
    server.join().unwrap();
}

#[test]
fn a_line_over_the_bound_breaks_the_connection_clearly() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let c = f.read_cmd();
        f.reply(&c["id"], json!("y".repeat(2 << 20)));
        f
    });
    let (c, _) = Client::connect_with(theirs, T, 1 << 20, None).unwrap();
    match c.execute(&cmd::HumanMonitorCommand::new("big"), T) {
        Err(Error::Disconnected { reason }) => assert!(reason.contains("longer than 1048576"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert!(!c.is_connected());
    server.join().unwrap();
}

#[test]
fn garbage_lines_are_skipped_and_counted_then_the_connection_is_broken() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let c = f.read_cmd();
        for g in ["garbage", "[1,2,3]", "{\"neither\": 1}", "{\"event\": 5}", "\u{1}\u{2}"] {
            f.send(g);
        }
        // An error reply without an id answers nobody.
        f.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
        f.reply(&c["id"], json!({"status": "running", "running": true}));
        let c = f.read_cmd();
        for _ in 0..200 {
            f.send("not json at all");
        }
        let _ = c;
        f
    });
    let c = connect(theirs);
    assert!(c.execute(&cmd::QueryStatus, T).unwrap().running);
    assert_eq!(c.malformed_lines(), 5);
    assert_eq!(c.unmatched_replies(), 1);
    match c.execute(&cmd::QueryStatus, T) {
        Err(Error::Disconnected { reason }) => assert!(reason.contains("malformed"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn a_full_listener_drops_and_counts_but_never_blocks_replies() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let c = f.read_cmd();
        for n in 0..10 {
            f.event("TICK", n);
        }
        f.reply(&c["id"], json!({"status": "running", "running": true}));
        f
    });
    let c = connect(theirs);
    let slow = c.listen(2);
    let roomy = c.listen(100);
    assert!(c.execute(&cmd::QueryStatus, T).unwrap().running);
    // The reply came after all ten events: the reader has delivered them all by now.
    assert_eq!(slow.dropped(), 8);
    assert_eq!(roomy.dropped(), 0);
    let got: Vec<i64> = (0..2).map(|_| slow.recv_timeout(T).unwrap().data["n"].as_i64().unwrap()).collect();
    assert_eq!(got, [0, 1]);
    assert_eq!((0..10).filter(|_| roomy.recv_timeout(T).is_ok()).count(), 10);
    server.join().unwrap();
}

#[test]
fn eof_fails_pending_calls_and_listeners() {
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.handshake();
        let _ = f.read_cmd();
        f.event("LAST", 1);
        drop(f); // hang up without answering
    });
    let c = connect(theirs);
    let events = c.listen(4);
    match c.execute(&cmd::QueryStatus, T) {
        Err(Error::Disconnected { reason }) => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    // Events received before the end are still delivered, then the error.
    assert_eq!(events.recv_timeout(T).unwrap().event, "LAST");
    assert!(matches!(events.recv_timeout(T), Err(Error::Disconnected { .. })));
    assert!((&events).next().is_none());
    server.join().unwrap();
}

#[test]
fn silent_server_and_failing_capabilities() {
    // No greeting at all: connect gives up at its deadline.
    let (f, theirs) = Fake::pair();
    let start = Instant::now();
    assert!(matches!(Client::connect(theirs, Duration::from_millis(200)), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < T);
    drop(f);

    // Greeting, then an error for qmp_capabilities.
    let (mut f, theirs) = Fake::pair();
    let server = thread::spawn(move || {
        f.send(GREETING);
        let c = f.read_cmd();
        f.send(&json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": c["id"]}).to_string());
        f
    });
    match Client::connect(theirs, T) {
        Err(Error::Qmp { command, class, desc }) => {
            assert_eq!(
                (command.as_str(), class.as_str(), desc.as_str()),
                ("qmp_capabilities", "CommandNotFound", "nope")
            )
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    server.join().unwrap();

    // Greeting but no capabilities reply: the connect deadline still holds.
    let (mut f, theirs) = Fake::pair();
    f.send(GREETING);
    assert!(matches!(Client::connect(theirs, Duration::from_millis(200)), Err(Error::Timeout { .. })));
}

#[test]
fn client_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client>();
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn dropping_the_client_ends_its_reader_thread() {
    // Warm up so lazily started threads are in the baseline.
    let (mut f, theirs) = Fake::pair();
    let s = thread::spawn(move || {
        f.handshake();
        f
    });
    drop(connect(theirs));
    drop(s.join().unwrap());
    let before = thread_count();
    let mut fakes = Vec::new();
    for _ in 0..20 {
        let (mut f, theirs) = Fake::pair();
        let s = thread::spawn(move || {
            f.handshake();
            f
        });
        let c = connect(theirs);
        let listener = c.listen(4);
        drop(c);
        // The last clone is gone: the connection is closed, listeners see it.
        assert!(matches!(listener.recv_timeout(T), Err(Error::Closed)));
        fakes.push(s.join().unwrap()); // keep the server ends open: only our side closes
    }
    assert!(common_wait(|| thread_count() <= before), "threads grew from {before} to {}", thread_count());
}

fn common_wait(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < T {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}
