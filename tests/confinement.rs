//! The VMM is confined: QEMU runs under its seccomp sandbox, and a system call the
//! sandbox denies ends QEMU (and the VM, reported as a crash) rather than succeeding.

mod common;

use std::time::Duration;

use common::{vm_ready, wait_until};
use vmhost::vm::{Machine, VmEnd};

#[test]
fn qemu_runs_sandboxed_and_a_denied_system_call_ends_it() {
    if !vm_ready("qemu_runs_sandboxed_and_a_denied_system_call_ends_it") {
        return;
    }
    let machine = common::boot_qemu_machine();
    let Machine::Qemu(vm) = &machine else { panic!("asked for QEMU") };
    let pid = vm.pid().unwrap();
    // Seccomp mode 2: a filter is installed.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    if nix::unistd::geteuid().is_root() {
        // vmhost is root: QEMU is not, and each VM's QEMU is a user of its own.
        let other = common::boot_qemu_machine();
        let Machine::Qemu(other_vm) = &other else { panic!("asked for QEMU") };
        let other_status =
            std::fs::read_to_string(format!("/proc/{}/status", other_vm.pid().unwrap())).unwrap();
        let field = |s: &str, name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (uid, other_uid) = (field(&status, "Uid:"), field(&other_status, "Uid:"));
        use vmhost::vm::qemu::user::{DYNAMIC_UIDS, DYNAMIC_UID_FIRST};
        for (ids, s) in [(&uid, &status), (&other_uid, &other_status)] {
            let n: Vec<u32> = ids.split(' ').map(|v| v.parse().unwrap()).collect();
            assert!(n.iter().all(|&u| u == n[0] && (DYNAMIC_UID_FIRST..DYNAMIC_UID_FIRST + DYNAMIC_UIDS).contains(&u)), "{s}");
            assert_eq!(field(s, "Gid:"), *ids, "{s}");
            assert_eq!(field(s, "Groups:"), "", "{s}");
            assert_eq!(field(s, "CapEff:"), "0000000000000000", "{s}");
            assert_eq!(field(s, "CapPrm:"), "0000000000000000", "{s}");
        }
        assert_ne!(uid, other_uid, "two VMs' QEMUs share a user");
        // QEMU reaches nothing of ours by name: its run directory (where its stderr,
        // qemu.log, is) stays ours and closed, its working directory is /.
        use std::os::unix::fs::MetadataExt;
        let log = std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
        let run_dir = std::fs::metadata(log.parent().unwrap()).unwrap();
        assert_eq!((run_dir.uid(), run_dir.mode() & 0o777), (0, 0o700), "{}", log.display());
        assert_eq!(std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(), std::path::Path::new("/"));
        // And the guest works as before.
        let req =
            vmhost::internals::contract::proto::ExecRequest { program: "true".into(), ..Default::default() };
        let p = other.agent().unwrap().exec(&req).unwrap();
        assert_eq!(p.drain(|_, _| Ok(())).unwrap(), 0);
        other.stop(Duration::from_secs(10)).unwrap();
    }
    let seccomp = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap().trim().to_string();
    assert_eq!(seccomp, "2", "{status}");
    // Ask QEMU to run a program (a migration to `exec:`): it would fork and exec; the
    // sandbox (spawn=deny) kills it instead.
    let q = vm.qmp().unwrap();
    let _ = q.execute_raw(
        "migrate",
        Some(serde_json::json!({"uri": "exec:touch /tmp/vmhost-sandbox-escaped"})),
        Duration::from_secs(10),
    );
    assert!(wait_until(Duration::from_secs(30), || machine.state().is_final()), "QEMU survived");
    match machine.end() {
        Some(VmEnd::Crashed(why)) => assert!(why.contains("SIGSYS"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!std::path::Path::new("/tmp/vmhost-sandbox-escaped").exists(), "the program ran");
}

/// What a child process of this test does, by `VMHOST_CONFINE_CHILD`: confine a thread
/// with the kvm backend's filter, then do one thing on it.
fn confined_child(what: &str) {
    let t = std::thread::spawn({
        let what = what.to_string();
        move || {
            vmhost::vm::kvm::seccomp::confine_thread().unwrap();
            match what.as_str() {
                // What a VMM thread does: threads, memory, pipes, files it holds, time.
                "allowed" => {
                    let inner =
                        std::thread::spawn(|| vec![7u8; 8 << 20].iter().map(|&b| b as u64).sum::<u64>());
                    assert_eq!(inner.join().unwrap(), 7 * (8 << 20));
                    let (r, w) = nix::unistd::pipe().unwrap();
                    assert_eq!(nix::unistd::write(&w, b"x").unwrap(), 1);
                    let mut b = [0u8; 1];
                    assert_eq!(nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut b).unwrap(), 1);
                    let _ = std::time::Instant::now();
                    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
                }
                // execve itself, on this thread (no fork first).
                "exec" => {
                    let prog = c"/bin/true";
                    let argv = [prog.as_ptr(), std::ptr::null()];
                    let envp = [std::ptr::null()];
                    // SAFETY: NUL-terminated strings and arrays; replaces the process.
                    unsafe { nix::libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                }
                // A new process (posix_spawn's clone without CLONE_THREAD).
                "spawn" => {
                    let _ = std::process::Command::new("true").status();
                }
                // A thread in a new network namespace.
                "namespace" => {
                    // SAFETY: a raw clone that would start a thread; the filter kills
                    // the process before it returns.
                    unsafe {
                        nix::libc::syscall(
                            nix::libc::SYS_clone,
                            nix::libc::CLONE_VM
                                | nix::libc::CLONE_THREAD
                                | nix::libc::CLONE_SIGHAND
                                | nix::libc::CLONE_NEWNET,
                            std::ptr::null_mut::<u8>(),
                        )
                    };
                }
                "socket" => {
                    let _ = std::net::TcpStream::connect("127.0.0.1:9");
                }
                other => panic!("{other}"),
            }
        }
    });
    t.join().unwrap();
    println!("survived");
}

#[test]
fn a_kvm_vmm_thread_keeps_what_it_needs_and_dies_on_a_denied_call() {
    if let Ok(what) = std::env::var("VMHOST_CONFINE_CHILD") {
        confined_child(&what);
        return;
    }
    let run = |what: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_kvm_vmm_thread_keeps_what_it_needs_and_dies_on_a_denied_call",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env("VMHOST_CONFINE_CHILD", what)
            .output()
            .unwrap()
    };
    use std::os::unix::process::ExitStatusExt;
    let out = run("allowed");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("survived"), "{out:?}");
    for what in ["exec", "spawn", "namespace", "socket"] {
        let out = run(what);
        assert_eq!(out.status.signal(), Some(nix::libc::SIGSYS), "{what}: {out:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"), "{what}");
    }
}
