//! The per-VM host process (`vmhost host`) on a real guest: control protocol, helper
//! socket, and the stop escalation's three ways to end a VM.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{children_of, vm_ready, vmhost_bin, wait_until, TempDir};
use vmhost::server::control::ControlClient;
use vmhost::{client, Instance};

const GUARD: Duration = Duration::from_secs(180);

struct Host {
    child: Child,
    dir: TempDir,
}

impl Host {
    fn start(tag: &str) -> Host {
        Host::start_with(tag, &[])
    }

    fn start_with(tag: &str, env: &[(&str, &str)]) -> Host {
        Host::start_full(tag, env, &[])
    }

    fn start_full(tag: &str, env: &[(&str, &str)], extra: &[&str]) -> Host {
        let dir = TempDir::new(tag);
        let log = std::fs::File::create(dir.join("host.log")).unwrap();
        let child = Command::new(vmhost_bin())
            // These tests are about the QEMU process and its ACPI step.
            .args(["host", "--backend", "qemu", "--name", tag, "--dir"])
            .arg(dir.join("vm"))
            .args(extra)
            .env("VMHOST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut h = Host { child, dir };
        let ready =
            wait_until(GUARD, || h.sock("helper.sock").exists() || h.child.try_wait().unwrap().is_some());
        assert!(ready && h.sock("helper.sock").exists(), "host did not come up:\n{}", h.log());
        h
    }

    fn sock(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("vm").join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out =
            Command::new(vmhost_bin()).arg("ctl").arg(self.sock("vmhost.sock")).args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn attach(&self) -> Instance {
        Instance::attach(client::connect_to(self.sock("helper.sock"), GUARD).unwrap()).unwrap()
    }

    /// Waits for the host process to exit after a stop and checks it cleaned up.
    fn expect_exit(&mut self) {
        let mut status = None;
        assert!(
            wait_until(GUARD, || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            }),
            "host process did not exit:\n{}",
            self.log()
        );
        assert!(status.unwrap().success(), "{:?}\n{}", status, self.log());
        for f in ["vmhost.sock", "vmhost.pid", "helper.sock"] {
            assert!(!Path::new(&self.sock(f)).exists(), "{f} left behind");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn host_serves_control_and_helper_and_stops_through_the_agent() {
    if !vm_ready("host_serves_control_and_helper_and_stops_through_the_agent") {
        return;
    }
    let mut h = Host::start("host-agent");
    let pid = std::fs::read_to_string(h.sock("vmhost.pid")).unwrap();
    assert_eq!(pid, h.child.id().to_string());
    assert_eq!(h.ctl(&["status"]), (0, "{\"ok\":true,\"state\":\"running\"}\n".into()));
    assert_eq!(h.ctl(&["info"]), (0, "{\"ok\":true,\"state\":\"running\",\"backend\":\"qemu\"}\n".into()));
    {
        let vm = h.attach();
        let out = vm.command("sh").args(["-c", "echo hello from the host guest"]).output().unwrap();
        assert_eq!(out.stdout, b"hello from the host guest\n");
    } // dropping an attached instance leaves the VM running
    assert_eq!(ControlClient::new(h.sock("vmhost.sock")).status().unwrap().state, "running");
    // A second host on the same DIR is refused before it boots anything.
    let second = Command::new(vmhost_bin())
        .args(["host", "--backend", "qemu", "--name", "second", "--dir"])
        .arg(h.dir.join("vm"))
        .env("VMHOST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && said.contains("in use by a live process"), "{said}");
    assert!(!said.contains("booted") && !said.contains("QEMU"), "the second host booted a VM: {said}");
    assert_eq!(h.ctl(&["stop", "--timeout", "20"]), (0, "{\"ok\":true,\"state\":\"stopping\"}\n".into()));
    h.expect_exit();
    assert!(h.log().contains("stop step Agent: Exited"), "{}", h.log());
}

#[test]
fn a_published_ssh_port_is_reported_and_reaches_the_guest() {
    if !vm_ready("a_published_ssh_port_is_reported_and_reaches_the_guest") {
        return;
    }
    let h = Host::start_full("host-publish", &[], &["-p", "127.0.0.1::22"]);
    let (code, info) = h.ctl(&["info"]);
    assert_eq!(code, 0, "{info}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let port = v["ssh_port"].as_u64().unwrap_or(0) as u16;
    assert_ne!(port, 0, "info names the published SSH port: {info}");
    // A guest program on port 22 answers a host client of that port.
    let vm = h.attach();
    std::thread::scope(|s| {
        let server =
            s.spawn(|| vm.command("sh").args(["-c", "echo SSH-2.0-guest | nc -l -p 22"]).output().unwrap());
        let deadline = std::time::Instant::now() + GUARD;
        let got = loop {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut got = String::new();
            let _ = c.read_to_string(&mut got);
            // Closed at once until the guest listens.
            if !got.is_empty() || std::time::Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(got, "SSH-2.0-guest\n");
        assert!(server.join().unwrap().status.success());
    });
}

#[test]
fn force_stop_ends_qemu_gracefully_with_sigterm() {
    if !vm_ready("force_stop_ends_qemu_gracefully_with_sigterm") {
        return;
    }
    // QEMU must not inherit the host's blocked SIGTERM (its signal thread takes it).
    let mut h = Host::start("host-term");
    let qemu =
        children_of(h.child.id()).into_iter().find(|(_, c)| c.starts_with("qemu")).expect("QEMU child").0;
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    let blocked = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim().to_string();
    assert_eq!(
        u64::from_str_radix(&blocked, 16).unwrap() & (1 << (15 - 1)),
        0,
        "SIGTERM blocked in QEMU: {status}"
    );
    assert_eq!(h.ctl(&["force-stop"]).0, 0);
    h.expect_exit();
    let log = h.log();
    assert!(log.contains("stop step Term: Exited"), "{log}");
    assert!(!log.contains("stop step Kill"), "{log}");
    // QEMU quit on its own terms (it exits 0 on SIGTERM), not killed by a signal.
    assert!(log.contains("QEMU exited (exit status: 0)"), "{log}");
}

#[test]
fn unresponsive_agent_is_stopped_by_acpi() {
    if !vm_ready("unresponsive_agent_is_stopped_by_acpi") {
        return;
    }
    // ACPI needs the stock kernel: the minimal one has none (and no power button).
    let mut h = Host::start_with("host-acpi", &[("VMHOST_KERNEL_KIND", "stock")]);
    // The agent is PID 1, which no signal stops: freeze its threads with ptrace instead,
    // all but the power button's watchers (as a deadlocked server would leave them).
    let freeze = freezer(&h.dir.join("."));
    {
        let vm = h.attach();
        vm.fs().write("/tmp/freeze", &freeze).unwrap();
        vm.fs().set_permissions("/tmp/freeze", std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let _child = vm.command("/tmp/freeze").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(h.ctl(&["stop", "--timeout", "3"]).0, 0);
    h.expect_exit();
    let log = h.log();
    assert!(log.contains("stop step Agent: StillRunning"), "{log}");
    assert!(log.contains("stop step Acpi: Exited"), "{log}");
}

/// A static program for the guest that stops every thread of PID 1 but the power
/// button's watchers under ptrace (PTRACE_SEIZE, PTRACE_INTERRUPT), then waits forever
/// as their tracer. Built with the host's C compiler (present wherever the kernel is
/// built).
fn freezer(dir: &Path) -> Vec<u8> {
    let src = dir.join("freeze.c");
    std::fs::write(
        &src,
        format!(
            r#"#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <unistd.h>
int main(void) {{
    DIR *d = opendir("/proc/1/task");
    struct dirent *e;
    char path[64], comm[64];
    if (!d) return 1;
    while ((e = readdir(d))) {{
        int tid = atoi(e->d_name);
        if (tid <= 0) continue;
        snprintf(path, sizeof path, "/proc/1/task/%d/comm", tid);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(comm, sizeof comm, f)) return 2;
        fclose(f);
        if (strncmp(comm, "{}", {}) == 0) continue;
        if (ptrace(PTRACE_SEIZE, tid, 0, 0) || ptrace(PTRACE_INTERRUPT, tid, 0, 0)) return 3;
    }}
    for (;;) pause();
}}
"#,
            vmhost::internals::agent::power::POWER_BUTTON_THREAD,
            vmhost::internals::agent::power::POWER_BUTTON_THREAD.len()
        ),
    )
    .unwrap();
    let bin = dir.join("freeze");
    let st = Command::new("cc").args(["-static", "-O2", "-o"]).arg(&bin).arg(&src).status();
    assert!(
        st.is_ok_and(|s| s.success()),
        "building the guest freezer needs a C compiler and static libc: \
         apt-get install -y --no-install-recommends gcc libc6-dev"
    );
    std::fs::read(bin).unwrap()
}

#[test]
fn frozen_guest_is_stopped_by_signals() {
    if !vm_ready("frozen_guest_is_stopped_by_signals") {
        return;
    }
    let mut h = Host::start("host-kill");
    let qemu =
        children_of(h.child.id()).into_iter().find(|(_, c)| c.starts_with("qemu")).expect("QEMU child").0;
    // A QEMU that no longer runs at all: neither agent nor ACPI nor SIGTERM can end it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu as i32), nix::sys::signal::Signal::SIGSTOP)
        .unwrap();
    assert_eq!(h.ctl(&["stop", "--timeout", "2"]).0, 0);
    h.expect_exit();
    let log = h.log();
    assert!(log.contains("stop step Kill: Exited"), "{log}");
}

#[test]
fn a_flood_of_idle_connections_is_capped_and_never_starves_the_control_socket() {
    if !vm_ready("a_flood_of_idle_connections_is_capped_and_never_starves_the_control_socket") {
        return;
    }
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    // Our own descriptors: 1,100 connections and more, as many as the hard limit lets
    // us beyond what the host process caps at (which follows its own limit).
    let ours = vmhost::internals::unix::raise_fd_limit();
    let flood = 1100.min(ours.saturating_sub(200) as usize);
    if flood < 1100 {
        eprintln!("note: {flood} helper connections, not 1,100: the descriptor limit here is {ours}");
    }
    let h = Host::start("host-flood");
    // Helper connections that never send a byte, and 100 control ones.
    let mut refused = Vec::new();
    let helper: Vec<UnixStream> = (0..flood)
        .filter_map(|_| {
            UnixStream::connect(h.sock("helper.sock")).map_err(|e| refused.push(e.to_string())).ok()
        })
        .collect();
    refused.dedup();
    let control: Vec<UnixStream> =
        (0..100).filter_map(|_| UnixStream::connect(h.sock("vmhost.sock")).ok()).collect();
    assert_eq!(helper.len(), flood, "connect(2) itself is not refused: {refused:?}");
    // Past the cap, a helper connection is answered with why, then closed.
    let mut last = helper.last().unwrap().try_clone().unwrap();
    last.set_read_timeout(Some(GUARD)).unwrap();
    let f = vmhost::wire::read_frame(&mut last, 1 << 20).expect("an Error frame, not silence");
    let ef = <vmhost::wire::ErrorFrame as vmhost::wire::Wire>::from_payload(&f.payload).unwrap();
    assert!(ef.message.contains("too many connections (limit "), "{ef:?}");
    // So is a control connection past its cap.
    let mut busy = control.last().unwrap().try_clone().unwrap();
    busy.set_read_timeout(Some(GUARD)).unwrap();
    let mut line = String::new();
    let _ = busy.read_to_string(&mut line);
    assert!(line.starts_with("{\"ok\":false,\"error\":\"busy: 32 control requests"), "{line}");
    // The control socket answers once its idle connections' deadline (5 s) has passed.
    let start = std::time::Instant::now();
    assert!(wait_until(GUARD, || ControlClient::new(h.sock("vmhost.sock")).status().is_ok_and(|r| r.ok)));
    eprintln!("control answered {:?} into the flood", start.elapsed());
    // The refusals were said a few times, not 1,168.
    let refusals = h.log().lines().filter(|l| l.contains("refusing")).count();
    assert!((1..=10).contains(&refusals), "{refusals} refusal lines:\n{}", h.log());
    // With the flood gone, the helper serves again.
    drop(helper);
    drop(control);
    let vm = h.attach();
    assert_eq!(vm.command("echo").arg("ok").output().unwrap().stdout, b"ok\n");
}

/// `vmhost commit DIR NAME` keeps the root of the VM that `vmhost host` serves as an
/// image, as `docker commit` does; `vmhost run --image NAME` boots it with the change.
#[test]
fn vmhost_commit_keeps_a_host_vms_root_as_an_image() {
    if !vm_ready("vmhost_commit_keeps_a_host_vms_root_as_an_image") {
        return;
    }
    let h = Host::start("host-commit");
    let vm = h.attach();
    let out =
        vm.command("sh").args(["-c", "echo committed > /root/state && rm /etc/hostname"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let commit = |args: &[&str]| {
        let out = Command::new(vmhost_bin()).arg("commit").args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = h.dir.join("vm");
    let (code, stdout, stderr) = commit(&["--exclude", "/etc", dir.to_str().unwrap(), "host-commit-test:1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (name, key) = stdout.trim().split_once(' ').unwrap();
    assert_eq!(name, "docker.io/library/host-commit-test:1");
    assert!(vmhost::image::snapshot::is_key(key), "{stdout}");
    // The VM goes on; a name is required.
    assert!(vm.command("true").status().unwrap().success());
    let (code, _, stderr) = commit(&[dir.to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("usage"), "{stderr}");
    let out = Command::new(vmhost_bin())
        .args([
            "run",
            "--image",
            "host-commit-test:1",
            "--",
            "sh",
            "-c",
            "cat /root/state; test -e /etc/hostname && echo excluded",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "committed\nexcluded\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
