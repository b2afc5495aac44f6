//! The original's own clients, replayed byte for byte against the real helper.
//!
//! The original's Python package (its IPC backend) starts `cc-helper -socket PATH`, and
//! speaks to it in the sequences its VM tests use: pipes by the original's numbers
//! (0x040E stdout, 0x040F stderr, 0x0410 stdin) read and written with the connection
//! messages (ConnRead 0x0504, ConnWrite 0x0505, ConnClose 0x0506, ConnLocalAddr 0x0507,
//! ConnRemoteAddr 0x0508), and InstanceExec (0x0107) then InstanceWait (0x0102). Each
//! frame here is written and read as bytes, by hand, not through vmhost's own `wire`, so
//! that a change there cannot hide a change on the wire. Facts taken from the original:
//! its `_ipc_backend.py` reads only the status byte of an InstanceExec answer and treats
//! an empty ConnRead answer as the end of the stream; its Exec makes the command PID 1
//! and ends the VM when it exits, answering an error for an exit status other than 0.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{vm_ready, wait_until, TempDir};

/// A helper started as the original's clients start theirs, with its console (stdout)
/// collected.
struct Helper {
    child: Child,
    conn: UnixStream,
    console: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: String,
    _dir: TempDir,
}

/// What came back: a Response's bytes after the OK byte, or an Error's fields.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok(Vec<u8>),
    /// `errno`: vmhost's optional trailing field (a failed system call's), which the
    /// original's clients do not read.
    Err {
        code: u8,
        message: String,
        op: String,
        path: String,
        errno: Option<i32>,
    },
}

fn string(s: &str) -> Vec<u8> {
    [&(s.len() as u32).to_be_bytes()[..], s.as_bytes()].concat()
}

fn strings(list: &[&str]) -> Vec<u8> {
    let mut v = (list.len() as u32).to_be_bytes().to_vec();
    for s in list {
        v.extend(string(s));
    }
    v
}

fn take_string(b: &mut &[u8]) -> String {
    let n = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
    let s = String::from_utf8(b[4..4 + n].to_vec()).unwrap();
    *b = &b[4 + n..];
    s
}

fn u64_of(b: &[u8]) -> u64 {
    assert_eq!(b.len(), 8, "{b:?}");
    u64::from_be_bytes(b.try_into().unwrap())
}

impl Helper {
    fn start(tag: &str) -> Helper {
        let dir = TempDir::new(tag);
        let link = dir.join("cc-helper");
        std::os::unix::fs::symlink(common::vmhost_bin(), &link).unwrap();
        let sock: PathBuf = dir.join("helper.sock");
        let mut child = Command::new(&link)
            .arg("-socket")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, console) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        let mut conn = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                conn = UnixStream::connect(&sock).ok();
                conn.is_some()
            }),
            "the helper never listened"
        );
        let conn = conn.unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        Helper { child, conn, console, seen: String::new(), _dir: dir }
    }

    /// One exchange, as bytes: the request frame, then one answer frame.
    fn call(&mut self, ty: u16, payload: &[u8]) -> Answer {
        let mut frame = ty.to_be_bytes().to_vec();
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        self.conn.write_all(&frame).unwrap();
        let mut head = [0u8; 6];
        self.conn.read_exact(&mut head).unwrap();
        let (rty, len) =
            (u16::from_be_bytes([head[0], head[1]]), u32::from_be_bytes(head[2..].try_into().unwrap()));
        let mut body = vec![0u8; len as usize];
        self.conn.read_exact(&mut body).unwrap();
        match rty {
            0xFF00 => {
                assert_eq!(body.first(), Some(&0), "{ty:#06x}: a Response without the OK byte");
                Answer::Ok(body[1..].to_vec())
            }
            0xFF01 => {
                let code = body[0];
                let mut rest = &body[1..];
                let message = take_string(&mut rest);
                let op = take_string(&mut rest);
                let path = take_string(&mut rest);
                let errno = match rest.len() {
                    0 => None,
                    4 => Some(i32::from_be_bytes(rest.try_into().unwrap())),
                    n => panic!("{ty:#06x}: {n} bytes after an Error's fields"),
                };
                Answer::Err { code, message, op, path, errno }
            }
            other => panic!("{ty:#06x} answered with frame type {other:#06x}"),
        }
    }

    /// A call that must succeed: the bytes after the OK byte.
    fn ok(&mut self, ty: u16, payload: &[u8]) -> Vec<u8> {
        match self.call(ty, payload) {
            Answer::Ok(b) => b,
            e => panic!("{ty:#06x}: {e:?}"),
        }
    }

    /// InstanceNew as the Python package sends it: a directory source (empty: vmhost's
    /// default image), no image ref or cache dir, 256 MiB, 1 vCPU, no timeout, `user`,
    /// no dmesg, no mounts.
    fn new_instance(&mut self, user: &str) {
        let mut p = vec![1u8];
        p.extend(string(""));
        p.extend(string(""));
        p.extend(string(""));
        p.extend(256u64.to_be_bytes());
        p.extend(1i32.to_be_bytes());
        p.extend(0u64.to_be_bytes());
        p.extend(string(user));
        p.push(0);
        p.extend(0u32.to_be_bytes());
        assert_eq!(self.ok(0x0100, &p), b"");
    }

    /// CmdNew: the command's handle.
    fn cmd_new(&mut self, name: &str, args: &[&str]) -> u64 {
        let p = [string(name), strings(args)].concat();
        u64_of(&self.ok(0x0400, &p))
    }

    /// ConnRead(handle, max): the bytes (empty at the end of the stream).
    fn conn_read(&mut self, h: u64, max: u32) -> Vec<u8> {
        let b = self.ok(0x0504, &[&h.to_be_bytes()[..], &max.to_be_bytes()].concat());
        let n = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
        assert_eq!(b.len(), 4 + n);
        b[4..].to_vec()
    }

    /// The console output so far, waiting up to a minute for `want`.
    fn console_until(&mut self, want: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.seen.contains(want) && std::time::Instant::now() < deadline {
            if let Ok(b) = self.console.recv_timeout(Duration::from_millis(100)) {
                self.seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
        self.seen.clone()
    }

    fn finish(mut self) {
        assert_eq!(self.ok(0x0101, &[]), b""); // InstanceClose
        drop(self.conn);
        drop(self.child.stdin.take());
        let st = self.child.wait().unwrap();
        assert!(st.success(), "{st}");
    }
}

fn h(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// The Python package's VM tests: commands, pipes, files; then InstanceExec and
/// InstanceWait, which end the instance.
#[test]
fn the_python_packages_sequences_through_cc_helper() {
    if !vm_ready("the_python_packages_sequences_through_cc_helper") {
        return;
    }
    let mut c = Helper::start("orig-py");
    c.new_instance("");
    assert_eq!(c.ok(0x0104, &[]), [1]); // InstanceIsRunning: true

    // test_command_exit_code: CmdRun answers the i32 exit status.
    let t = c.cmd_new("true", &[]);
    assert_eq!(c.ok(0x0409, &h(t)), 0i32.to_be_bytes());
    let f = c.cmd_new("false", &[]);
    assert_eq!(c.ok(0x0409, &h(f)), 1i32.to_be_bytes());

    // test_stdout_pipe: CmdStdoutPipe is 0x040E; one ConnRead of 256 holds the line.
    let cmd = c.cmd_new("echo", &["Hello from pipe!"]);
    let stdout = u64_of(&c.ok(0x040E, &h(cmd)));
    assert_eq!(c.ok(0x0407, &h(cmd)), b""); // CmdStart
    assert_eq!(c.conn_read(stdout, 256), b"Hello from pipe!\n");
    assert_eq!(c.conn_read(stdout, 256), b"", "the end of the stream is empty bytes");
    assert_eq!(c.ok(0x0506, &h(stdout)), b""); // ConnClose
    assert_eq!(c.ok(0x0408, &h(cmd)), 0i32.to_be_bytes()); // CmdWait

    // test_stdin_stdout_pipe: 0x0410 stdin, ConnWrite answers the u32 written, ConnClose
    // on stdin is cat's end of input.
    let cmd = c.cmd_new("cat", &[]);
    let stdin = u64_of(&c.ok(0x0410, &h(cmd)));
    let stdout = u64_of(&c.ok(0x040E, &h(cmd)));
    assert_eq!(c.ok(0x0407, &h(cmd)), b"");
    let data = b"echo test data";
    let write = [h(stdin), (data.len() as u32).to_be_bytes().to_vec(), data.to_vec()].concat();
    assert_eq!(c.ok(0x0505, &write), 14u32.to_be_bytes());
    // ConnLocalAddr and ConnRemoteAddr on a pipe: the string "pipe".
    assert_eq!(c.ok(0x0507, &h(stdin)), string("pipe"));
    assert_eq!(c.ok(0x0508, &h(stdout)), string("pipe"));
    assert_eq!(c.ok(0x0506, &h(stdin)), b"");
    let mut got = Vec::new();
    loop {
        let b = c.conn_read(stdout, 256);
        if b.is_empty() {
            break;
        }
        got.extend(b);
    }
    assert_eq!(got, data);
    assert_eq!(c.ok(0x0506, &h(stdout)), b"");
    assert_eq!(c.ok(0x0408, &h(cmd)), 0i32.to_be_bytes());

    // test_stderr_pipe: 0x040F.
    let cmd = c.cmd_new("sh", &["-c", "echo error message >&2"]);
    let stderr = u64_of(&c.ok(0x040F, &h(cmd)));
    assert_eq!(c.ok(0x0407, &h(cmd)), b"");
    assert_eq!(c.conn_read(stderr, 256), b"error message\n");
    assert_eq!(c.ok(0x0506, &h(stderr)), b"");
    assert_eq!(c.ok(0x0408, &h(cmd)), 0i32.to_be_bytes());
    // A closed pipe handle is an error: "already closed" (code 4), as a closed file's is
    // (the original answers "invalid handle", code 1, for any handle it does not hold).
    match c.call(0x0504, &[h(stderr), 256u32.to_be_bytes().to_vec()].concat()) {
        Answer::Err { code, .. } => assert_eq!(code, 4),
        a => panic!("{a:?}"),
    }

    // test_filesystem_write_read: FsWriteFile (path, bytes, mode), FsReadFile.
    let w = [string("/root/test_file.txt"), string("Hello, filesystem!"), 0o644u32.to_be_bytes().to_vec()]
        .concat();
    assert_eq!(c.ok(0x0204, &w), b"");
    assert_eq!(c.ok(0x0203, &string("/root/test_file.txt")), string("Hello, filesystem!"));

    // Exec: the command is PID 1 (of its namespace) on the console; orphans are
    // reparented to it; a signal it has no handler for does not end it; its end ends the
    // VM; the answer has nothing after the OK byte.
    let script = "echo pid=$$; (sleep 30 &); sleep 0.5; \
                  o=$(pidof sleep); echo orphan-ppid=$(cut -d' ' -f4 /proc/$o/stat); \
                  kill -TERM $$; echo survived-term; exit 0";
    let exec = [string("sh"), strings(&["-c", script])].concat();
    assert_eq!(c.call(0x0107, &exec), Answer::Ok(Vec::new()), "InstanceExec's answer");
    let console = c.console_until("survived-term");
    assert!(console.contains("pid=1\r\n"), "{console:?}");
    assert!(console.contains("orphan-ppid=1\r\n"), "{console:?}");
    assert!(console.contains("survived-term"), "{console:?}");
    assert_eq!(c.ok(0x0102, &[]), b""); // InstanceWait answers: the VM has ended
    assert_eq!(c.ok(0x0104, &[]), [0]); // InstanceIsRunning: false
                                        // InstanceEnd (vmhost's): kind 8, the main process exited with status 0.
    let end = c.ok(0x0108, &[]);
    assert_eq!((end[0], &end[1..9]), (8, &0u64.to_be_bytes()[..]), "{end:?}");
    // Anything else now answers NotRunning (code 3).
    match c.call(0x0400, &[string("true"), strings(&[])].concat()) {
        Answer::Err { code, message, .. } => assert_eq!(code, 3, "{message}"),
        a => panic!("{a:?}"),
    }
    c.finish();
}

/// An exit status other than 0 is the original's error; InstanceEnd keeps the status.
#[test]
fn exec_that_fails_answers_the_originals_error_and_ends_the_vm() {
    if !vm_ready("exec_that_fails_answers_the_originals_error_and_ends_the_vm") {
        return;
    }
    // As another user (the instance's `uid:gid`): the main process changes identity.
    let mut c = Helper::start("orig-exec");
    c.new_instance("1000:1000");
    // A command that cannot start leaves the instance running.
    let missing = [string("no-such-program"), strings(&[])].concat();
    match c.call(0x0107, &missing) {
        Answer::Err { code, message, errno, .. } => assert_eq!((code, errno), (7, Some(2)), "{message}"),
        a => panic!("{a:?}"),
    }
    assert_eq!(c.ok(0x0104, &[]), [1]);
    let exec = [string("sh"), strings(&["-c", "echo uid=$(id -u):$(id -g) pid=$$; exit 3"])].concat();
    assert_eq!(
        c.call(0x0107, &exec),
        Answer::Err {
            code: 7,
            message: "exec sh: exit status 3".into(),
            op: "exec".into(),
            path: "sh".into(),
            errno: None,
        }
    );
    let console = c.console_until("pid=");
    assert!(console.contains("uid=1000:1000 pid=1\r\n"), "{console:?}");
    assert_eq!(c.ok(0x0102, &[]), b"");
    let end = c.ok(0x0108, &[]);
    assert_eq!((end[0], &end[1..9]), (8, &3u64.to_be_bytes()[..]), "{end:?}");
    c.finish();
}
