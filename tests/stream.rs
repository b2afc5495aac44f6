//! Live process I/O against a real guest, through the real helper process: streamed
//! output (CmdRunStreaming), the pipe messages (CmdStdinPipe, CmdStdoutPipe,
//! CmdStderrPipe with File* on their handles) and the library's spawn() with pipes.
//!
//! One guest serves every test here.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{shared_guest, wait_until};
use vmhost::wire::{self, msg, ErrorCode, Request, Response, StreamChunk, Wire};
use vmhost::{Error, Instance, Stdio};

fn sh(vm: &Instance, script: &str) -> String {
    let out = vm.command("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn streamed_output_keeps_the_order_of_stdout_and_stderr() {
    let Some(vm) = shared_guest("streamed_output_keeps_the_order_of_stdout_and_stderr") else { return };
    // Each line is written only after the test has seen the previous one (the guest
    // waits for an acknowledgement file the test writes from the stream's callback), so
    // the order seen is the guest's real order.
    let fs = vm.fs();
    fs.create_dir_all("/tmp/order").unwrap();
    let mut seen: Vec<(u8, String)> = Vec::new();
    let script = "ack() { while [ ! -e /tmp/order/$1 ]; do sleep 0.01; done; }; \
                  for i in 1 2 3; do echo out$i; ack out$i; echo err$i >&2; ack err$i; done; exit 7";
    let code = vm
        .command("sh")
        .arg("-c")
        .arg(script)
        .stream(|stream, data| {
            for line in String::from_utf8_lossy(data).lines() {
                seen.push((stream, line.to_string()));
                fs.write(format!("/tmp/order/{line}"), b"")?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(code, 7);
    let want: Vec<(u8, String)> = (1..=3)
        .flat_map(|i| [(wire::STREAM_STDOUT, format!("out{i}")), (wire::STREAM_STDERR, format!("err{i}"))])
        .collect();
    assert_eq!(seen, want);
}

#[test]
fn stdin_to_cat_and_back_through_pipes() {
    let Some(vm) = shared_guest("stdin_to_cat_and_back_through_pipes") else { return };
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut child = vm.command("cat").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let back = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            stdin.write_all(&data).unwrap();
            stdin.close().unwrap(); // EOF: cat ends
        });
        let mut back = Vec::new();
        stdout.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back
    });
    assert!(back == data, "cat gave back {} bytes", back.len());
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // wait_with_output: both streams at once, stdin closed for us.
    let mut child = vm
        .command("sh")
        .args(["-c", "read x; echo got:$x; echo to-err >&2; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"got:hello\n"[..], &b"to-err\n"[..]));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_stalled_reader_stops_the_guest_process_at_its_credit() {
    let Some(vm) = shared_guest("a_stalled_reader_stops_the_guest_process_at_its_credit") else { return };
    // 2,000 blocks of 4 KiB (8 MB), each counted in a file as it is written.
    let script =
        "n=0; while [ $n -lt 2000 ]; do head -c 4096 /dev/zero; n=$((n+1)); echo $n > /tmp/progress; done";
    let mut child = vm.command("sh").args(["-c", script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 4096];
    stdout.read_exact(&mut first).unwrap();
    // Nobody reads now: the guest must stop at its credit (1 MiB) plus the guest pipe.
    let progress =
        || vm.fs().read_to_string("/tmp/progress").unwrap_or_default().trim().parse::<u32>().unwrap_or(0);
    let mut last = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::thread::sleep(Duration::from_millis(500));
            let p = progress();
            let settled = p == last && p > 0;
            last = p;
            settled
        }),
        "the guest writer never settled"
    );
    assert!(last < 600, "the guest wrote {last} blocks (of 2000) past a stalled reader: no backpressure");
    assert_eq!(child.try_wait().unwrap(), None, "still running, blocked on its output");
    // Reading again lets it finish.
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() + first.len(), 2000 * 4096);
    assert!(child.wait().unwrap().success());
    assert_eq!(progress(), 2000);
}

#[test]
fn pipe_messages_on_the_wire() {
    let Some(vm) = shared_guest("pipe_messages_on_the_wire") else { return };
    let call = |r: Request| vm.answer(&r);
    let handle = |r: Request| match call(r).unwrap() {
        Response::CmdNew { handle }
        | Response::CmdStdinPipe { handle }
        | Response::CmdStdoutPipe { handle }
        | Response::CmdStderrPipe { handle } => handle,
        other => panic!("{other:?}"),
    };
    let data = |r: Request| match call(r).unwrap() {
        Response::FileRead { data } => data,
        other => panic!("{other:?}"),
    };
    let h = handle(Request::CmdNew { name: "sh".into(), args: vec!["-c".into(), "cat; echo e >&2".into()] });
    let stdin = handle(Request::CmdStdinPipe { handle: h });
    let stdout = handle(Request::CmdStdoutPipe { handle: h });
    let stderr = handle(Request::CmdStderrPipe { handle: h });
    // Asked twice: refused. Read before the start: refused.
    let e = call(Request::CmdStdoutPipe { handle: h }).unwrap_err();
    assert!(matches!(&e, Error::Remote(ef) if ef.code == ErrorCode::InvalidArgument), "{e}");
    let e = call(Request::FileRead { handle: stdout, max: 10 }).unwrap_err();
    assert!(e.to_string().contains("not started"), "{e}");
    call(Request::CmdStart { handle: h }).unwrap();
    // Pipes after the start: refused.
    assert!(call(Request::CmdStdinPipe { handle: h }).is_err());
    let written = call(Request::FileWrite { handle: stdin, data: b"abc".to_vec() }).unwrap();
    assert_eq!(written, Response::FileWrite { written: 3 });
    // The wrong direction and file-only messages are refused on pipes.
    assert!(call(Request::FileRead { handle: stdin, max: 1 }).is_err());
    assert!(call(Request::FileWrite { handle: stdout, data: b"x".to_vec() }).is_err());
    assert!(call(Request::FileSeek { handle: stdout, offset: 0, whence: 0 }).is_err());
    let Response::FileName { name } = call(Request::FileName { handle: stdout }).unwrap() else { panic!() };
    assert!(name.contains("stdout"), "{name}");
    call(Request::FileClose { handle: stdin }).unwrap(); // EOF
    let mut out = Vec::new();
    loop {
        let chunk = data(Request::FileRead { handle: stdout, max: 1 << 20 });
        if chunk.is_empty() {
            break;
        }
        out.extend(chunk);
    }
    assert_eq!(out, b"abc");
    assert_eq!(data(Request::FileRead { handle: stderr, max: 100 }), b"e\n");
    assert_eq!(call(Request::CmdWait { handle: h }).unwrap(), Response::CmdWait { exit_code: 0 });
    call(Request::FileClose { handle: stdout }).unwrap();
    let e = call(Request::FileRead { handle: stdout, max: 1 }).unwrap_err();
    assert!(matches!(&e, Error::Remote(ef) if ef.code == ErrorCode::AlreadyClosed), "{e}");
    call(Request::FileClose { handle: stderr }).unwrap();
    call(Request::CmdFree { handle: h }).unwrap();
}

#[test]
fn a_client_gone_mid_stream_takes_its_guest_process_down() {
    let Some(vm) = shared_guest("a_client_gone_mid_stream_takes_its_guest_process_down") else { return };
    let sock = vm.helper_socket().expect("a helper").to_path_buf();
    // A second client on its own connection: CmdRunStreaming of an endless writer.
    let mut conn = UnixStream::connect(&sock).unwrap();
    let max = wire::DEFAULT_MAX_FRAME;
    let script = "exec sh -c 'while :; do echo marker-streamer; done'";
    let new = Request::CmdNew { name: "sh".into(), args: vec!["-c".into(), script.into()] };
    wire::write_frame(&mut conn, new.ty(), &new.to_payload(), max).unwrap();
    let r = wire::read_frame(&mut conn, max).unwrap();
    assert_eq!(r.ty, msg::RESPONSE);
    let h = wire::Decoder::new(&r.payload[1..]).u64().unwrap();
    let run = Request::CmdRunStreaming { handle: h };
    wire::write_frame(&mut conn, run.ty(), &run.to_payload(), max).unwrap();
    let f = wire::read_frame(&mut conn, max).unwrap();
    assert_eq!(f.ty, msg::STREAM_CHUNK);
    assert!(String::from_utf8_lossy(&StreamChunk::from_payload(&f.payload).unwrap().data).contains("marker"));
    assert!(sh(vm, "ps").contains("marker-streamer"), "the streamer runs");
    drop(conn); // gone without a word
    assert!(
        wait_until(Duration::from_secs(30), || !sh(vm, "ps").contains("marker-streamer")),
        "the guest process outlived its client"
    );
    assert_eq!(sh(vm, "echo still-here"), "still-here\n", "the guest and the helper still serve");
}
