//! Terminals and forwarded input against real guests: `vmhost run` feeding its stdin to
//! the guest command, `vmhost run -t` (a pty in the guest, raw mode here, the window
//! size followed), commands on a terminal resized by InstanceSetConsole, and
//! InstanceExec running the main process attached to the helper's console.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{vm_ready, wait_until, TempDir};
use vmhost::wire::{InstanceNew, InstanceOptions, Request, SourceType};
use vmhost::{Image, Instance};

#[test]
fn run_feeds_its_stdin_to_the_guest_command() {
    if !vm_ready("run_feeds_its_stdin_to_the_guest_command") {
        return;
    }
    let mut child = Command::new(common::vmhost_bin())
        .args(["run", "--", "sh", "-c", "while read l; do echo \"<$l>\"; done; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\n").unwrap();
    drop(stdin); // EOF ends the guest's loop
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "<one>\n<two>\nend\n");
    assert!(out.status.success());

    // -n: nothing is fed (the command reads /dev/null), even from a pipe.
    let mut child = Command::new(common::vmhost_bin())
        .args(["run", "-n", "--", "sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"not for the guest\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "end\n");

    // Our /dev/null is not fed through a pipe: the command gets the guest's /dev/null
    // (what a file or a pipe gets, a pipe, is checked above through the data).
    let stdin_of = |stdin: Stdio| {
        let out = Command::new(common::vmhost_bin())
            .args(["run", "--", "sh", "-c", "readlink /proc/self/fd/0; cat; echo end"])
            .stdin(stdin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(stdin_of(Stdio::null()), "/dev/null\nend\n");
    let empty = TempDir::new("stdin");
    let file = std::fs::File::create(empty.join("empty")).unwrap();
    let fed = stdin_of(Stdio::from(file));
    assert!(fed.starts_with("pipe:[") && fed.ends_with("\nend\n"), "{fed}");
}

#[test]
fn input_to_a_command_that_left_a_child_behind_does_not_hang() {
    if !vm_ready("input_to_a_command_that_left_a_child_behind_does_not_hang") {
        return;
    }
    // sh exits at once; its background sleep keeps the stdin pipe and never reads it.
    // Endless input must not keep the call waiting for the sleep: the call returns
    // while the sleep still runs.
    let vm = Instance::new_in_process(Image::Default, Default::default()).unwrap();
    let code = vm
        .command("sh")
        .args(["-c", "sleep 60 & exit 3"])
        .stream_stdin(std::io::repeat(b'y'), |_, _| Ok(()))
        .unwrap();
    assert_eq!(code, 3);
    let sleeping = vm.command("pidof").arg("sleep").output().unwrap();
    assert!(sleeping.status.success(), "the call waited for the leftover child: {sleeping:?}");
}

#[test]
fn run_t_gives_a_terminal_of_our_size() {
    if !vm_ready("run_t_gives_a_terminal_of_our_size") {
        return;
    }
    // `script` (util-linux) gives vmhost a real terminal here.
    if Command::new("script").arg("--version").output().is_err() {
        assert!(!common::under_ci(), "script (bsdutils) is part of every Debian");
        eprintln!("SKIP run_t_gives_a_terminal_of_our_size: no `script` to make a terminal");
        return;
    }
    let dir = TempDir::new("tty-run");
    let log = dir.join("typescript");
    let inner = format!(
        "stty cols 101 rows 33; {} run -t -- sh -c 'tty; stty size; exit 4'",
        common::vmhost_bin().display()
    );
    let st = Command::new("script")
        .args(["-qec", &inner])
        .arg(&log)
        .stdin(Stdio::piped()) // kept open: no EOF typed into the guest terminal
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(text.contains("/dev/pts/"), "not on a terminal: {text}");
    assert!(text.contains("33 101"), "the guest terminal is not our size: {text}");
    assert_eq!(st.code(), Some(4), "{text}");

    // Without a terminal, -t is refused with what to do.
    let out = Command::new(common::vmhost_bin()).args(["run", "-t", "--", "true"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("terminal"));
}

#[test]
fn set_console_resizes_a_running_terminal() {
    if !vm_ready("set_console_resizes_a_running_terminal") {
        return;
    }
    let vm = Instance::new_in_process(Image::Default, Default::default()).unwrap();
    vm.set_console(70, 20).unwrap();
    let mut text = String::new();
    let mut resized = false;
    let script = "trap 'stty size; exit 0' WINCH; stty size; echo ready; i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 9";
    let code = vm
        .command("sh")
        .args(["-c", script])
        .tty(true)
        .stream_stdin(std::io::empty(), |_, data| {
            text.push_str(&String::from_utf8_lossy(data));
            if text.contains("ready") && !resized {
                resized = true;
                vm.set_console(120, 41)?;
            }
            Ok(())
        })
        .unwrap();
    assert!(text.starts_with("20 70\r\n"), "{text:?}");
    assert!(text.contains("41 120"), "no resize seen: {text:?}");
    assert_eq!(code, 0, "{text:?}");

    // The end of input on a terminal is its EOF character: cat ends, with or without
    // a final newline.
    for input in [&b"abc\n"[..], &b"no newline"[..]] {
        let mut seen = Vec::new();
        let code = vm
            .command("cat")
            .tty(true)
            .stream_stdin(input, |_, d| {
                seen.extend_from_slice(d);
                Ok(())
            })
            .unwrap();
        let seen = String::from_utf8_lossy(&seen).into_owned();
        assert_eq!(code, 0, "{seen:?}");
        let first = String::from_utf8_lossy(input).trim_end().to_string();
        assert!(seen.contains(&first), "{seen:?}");
    }
}

#[test]
fn instance_exec_runs_the_main_process_on_the_console() {
    if !vm_ready("instance_exec_runs_the_main_process_on_the_console") {
        return;
    }
    let dir = TempDir::new("tty-exec");
    let sock = dir.join("h.sock");
    let mut helper = Command::new(common::vmhost_bin())
        .arg("helper")
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client = vmhost::client::connect_to(&sock, Duration::from_secs(10)).unwrap();
    let new = InstanceNew {
        source_type: SourceType::Dir,
        source_path: String::new(),
        image_ref: String::new(),
        cache_dir: String::new(),
        options: InstanceOptions::default(),
    };
    let call = |r: Request| client.call(r.ty(), &r.to_payload());
    call(Request::InstanceNew { new }).unwrap();
    call(Request::InstanceSetConsole { cols: 90, rows: 21 }).unwrap();
    // The console's output arrives on the helper's stdout.
    let mut console = helper.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = console.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let exec = std::thread::spawn({
        let sock = sock.clone();
        move || {
            let c = vmhost::client::connect_to(&sock, Duration::from_secs(10)).unwrap();
            let r = Request::InstanceExec {
                name: "sh".into(),
                args: vec!["-c".into(), "tty; stty size; read x; echo got-$x; exit 5".into()],
            };
            c.call(r.ty(), &r.to_payload())
        }
    });
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            while let Ok(b) = rx.try_recv() {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
            seen.contains("21 90")
        }),
        "no console output: {seen:?}"
    );
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    // Typed on the helper's stdin: reaches the main process.
    helper.stdin.as_mut().unwrap().write_all(b"abc\n").unwrap();
    // Exit status 5: the original's error, and the VM ended with its main process.
    let answer = exec.join().unwrap();
    while let Ok(b) = rx.recv_timeout(Duration::from_millis(500)) {
        seen.push_str(&String::from_utf8_lossy(&b));
    }
    assert!(seen.contains("got-abc"), "{seen:?}");
    match answer {
        Err(vmhost::Error::Remote(f)) => {
            assert_eq!((f.code, f.message.as_str()), (vmhost::wire::ErrorCode::Io, "exec sh: exit status 5"))
        }
        other => panic!("{other:?}"),
    }
    let end = call(Request::InstanceEnd {}).unwrap();
    let mut d = end.decoder();
    assert_eq!((d.u8().unwrap(), d.u64().unwrap()), (8, 5));
    call(Request::InstanceClose {}).unwrap();
    drop(client);
    let _ = helper.wait();
}
