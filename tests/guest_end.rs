//! How a VM ends and what everyone is told: a guest that powers off, halts, reboots,
//! panics or resets ends its VM (a halted guest never would by itself), `vmhost run`
//! exits with the end's documented code, the control socket says `stopped`, `vmhost host`
//! exits non-zero when its VM ended unasked, and after QEMU dies every call answers
//! NotRunning with how the VM ended.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{children_of, vm_ready, vmhost_bin, wait_until, TempDir};
use vmhost::client;
use vmhost::server::control::{ControlClient, ControlServer};
use vmhost::server::helper::Helper;
use vmhost::server::Server;
use vmhost::vm::VmEnd;
use vmhost::wire::{msg, ErrorCode, InstanceOptions, Request};
use vmhost::{Error, Image, Instance};

/// A hang guard, not a timing assertion.
const GUARD: Duration = Duration::from_secs(120);

/// `vmhost run -- sh -c SCRIPT` with `env`: exit code, stderr, and how long it took.
fn run(script: &str, env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new(vmhost_bin())
        .args(["run", "--", "sh", "-c", script])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let ended = wait_until(GUARD, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !ended {
        let _ = child.kill();
    }
    let took = start.elapsed();
    let out = child.wait_with_output().unwrap();
    assert!(ended, "`vmhost run -- sh -c {script:?}` hung");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), took)
}

#[test]
fn a_guest_that_powers_off_halts_or_reboots_ends_its_vm() {
    if !vm_ready("a_guest_that_powers_off_halts_or_reboots_ends_its_vm") {
        return;
    }
    // On vmhost's default kernel, which has no power-off hardware: power-off halts.
    for (script, code, said) in [
        ("busybox poweroff -f", 121, "the guest powered off or halted"),
        ("busybox halt -f", 121, "the guest powered off or halted"),
        ("busybox reboot -f", 121, "the guest rebooted"),
    ] {
        let (got, err, took) = run(script, &[]);
        eprintln!("{script}: exit {got:?} after {took:?}");
        assert_eq!(got, Some(code), "{script}: {err}");
        assert!(err.contains(said), "{script}: {err}");
    }
}

#[test]
fn a_guest_kernel_that_panics_or_resets_ends_its_vm_as_a_crash() {
    if !vm_ready("a_guest_kernel_that_panics_or_resets_ends_its_vm_as_a_crash") {
        return;
    }
    // The stock kernel has sysrq (vmhost's own has none): `c` crashes the kernel (a
    // panic, then panic=-1 resets), `b` resets the machine at once, unannounced, as a
    // triple fault does.
    let stock = [("VMHOST_KERNEL_KIND", "stock")];
    let (got, err, _) = run("echo c > /proc/sysrq-trigger", &stock);
    assert_eq!(got, Some(122), "{err}");
    assert!(err.contains("the guest kernel panicked"), "{err}");
    let (got, err, _) = run("echo b > /proc/sysrq-trigger", &stock);
    assert_eq!(got, Some(122), "{err}");
    assert!(err.contains("the guest reset the machine unannounced"), "{err}");
}

#[test]
fn a_halted_guest_is_stopped_on_the_control_socket_and_its_host_exits_non_zero() {
    if !vm_ready("a_halted_guest_is_stopped_on_the_control_socket_and_its_host_exits_non_zero") {
        return;
    }
    // The library's own host: a booted machine behind a control and a helper socket.
    let dir = TempDir::new("halted");
    let machine = common::boot_qemu_machine();
    let control =
        ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), Arc::new(machine.clone()))
            .unwrap();
    let server = Server::bind(
        dir.join("helper.sock"),
        Helper::with_vm(
            machine.clone(),
            String::new(),
            vmhost::image::rootfs::Source::Default,
            None,
            vmhost::image::cache_dir(),
        ),
    )
    .unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve());
    let vm = Instance::attach(client::connect_to(dir.join("helper.sock"), GUARD).unwrap()).unwrap();
    let ctl = ControlClient::new(dir.join("vmhost.sock"));
    assert_eq!(ctl.status().unwrap().state, "running");
    let r = vm.command("busybox").args(["halt", "-f"]).output();
    let e = r.expect_err("halt does not return");
    assert_eq!(e.code(), ErrorCode::NotRunning, "{e}");
    assert!(e.to_string().contains("the guest powered off or halted"), "{e}");
    assert_eq!(ctl.status().unwrap().state, "stopped");
    assert_eq!(vm.end().unwrap(), Some(VmEnd::GuestShutdown));
    assert!(!vm.is_running().unwrap());
    assert_eq!(machine.end(), Some(VmEnd::GuestShutdown));
    server.close();
    drop(control);

    // `vmhost host`: a VM that ended unasked is a failure of the host process.
    let log = std::fs::File::create(dir.join("host.log")).unwrap();
    let mut host = Command::new(vmhost_bin())
        .args(["host", "--backend", "qemu", "--name", "halting", "--dir"])
        .arg(dir.join("vm"))
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = dir.join("vm").join("helper.sock");
    assert!(wait_until(GUARD, || sock.exists() || host.try_wait().unwrap().is_some()));
    let vm = Instance::attach(client::connect_to(&sock, GUARD).unwrap()).unwrap();
    let _ = vm.command("busybox").args(["poweroff", "-f"]).output();
    let mut status = None;
    assert!(wait_until(GUARD, || {
        status = host.try_wait().unwrap();
        status.is_some()
    }));
    let said = std::fs::read_to_string(dir.join("host.log")).unwrap();
    assert_eq!(status.unwrap().code(), Some(1), "{said}");
    assert!(said.contains("ended unasked: the guest powered off or halted"), "{said}");
    for f in ["vmhost.sock", "vmhost.pid", "helper.sock"] {
        assert!(!dir.join("vm").join(f).exists(), "{f} left behind");
    }
}

/// The shortest all-zero payload that is a valid request of type `ty`.
fn zero_payload(ty: u16) -> Vec<u8> {
    (0..64)
        .map(|n| vec![0u8; n])
        .find(|p| matches!(Request::from_payload(ty, p), Ok(Some(_))))
        .unwrap_or_else(|| panic!("{ty:#06x}: no zero payload decodes"))
}

#[test]
fn after_qemu_dies_every_call_answers_not_running_with_how() {
    if !vm_ready("after_qemu_dies_every_call_answers_not_running_with_how") {
        return;
    }
    std::env::set_var("VMHOST_HELPER_PATH", vmhost_bin());
    let opts = InstanceOptions { backend: vmhost::wire::Backend::Qemu, ..Default::default() };
    let vm = Arc::new(Instance::new_with_helper(Image::Default, opts).unwrap());
    let helper = vm.helper_pid().unwrap();
    let qemu = children_of(helper).into_iter().find(|(_, c)| c.starts_with("qemu")).unwrap().0;
    let raw = client::connect_to(vm.helper_socket().unwrap(), GUARD).unwrap();
    // Calls in flight on two connections when QEMU dies.
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let v = vm.clone();
            thread::spawn(move || v.command("sleep").arg("1000").output())
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    for call in calls {
        // An Error frame, not an EOF, and one that says how the VM ended.
        let e = call.join().unwrap().expect_err("the command cannot have succeeded");
        assert!(matches!(e, Error::Remote(_)), "{e:?}");
        assert_eq!(e.code(), ErrorCode::NotRunning, "{e}");
        assert!(e.to_string().contains("QEMU exited unexpectedly (signal: 9"), "{e}");
        // False as soon as a call has seen the end.
        assert!(!vm.is_running().unwrap());
    }
    match vm.end().unwrap() {
        Some(VmEnd::Crashed(why)) => assert!(why.contains("signal: 9"), "{why}"),
        other => panic!("{other:?}"),
    }
    for &(ty, name) in msg::ALL {
        if msg::is_answer(ty) || [msg::INSTANCE_NEW, msg::BUILD_DOCKERFILE, msg::INSTANCE_CLOSE].contains(&ty)
        {
            continue;
        }
        let r = raw.call(ty, &zero_payload(ty));
        match ty {
            msg::INSTANCE_ID | msg::INSTANCE_END | msg::INSTANCE_IS_RUNNING => {
                assert!(r.is_ok(), "{name}: {r:?}")
            }
            _ => match r {
                Err(Error::Remote(f)) => {
                    assert_eq!((f.code, f.op.as_str()), (ErrorCode::NotRunning, name), "{f:?}");
                    assert!(f.message.contains("QEMU exited unexpectedly (signal: 9"), "{name}: {f:?}");
                }
                other => panic!("{name}: {other:?}"),
            },
        }
    }
    assert!(!raw.call(msg::INSTANCE_IS_RUNNING, &[]).unwrap().decoder().bool().unwrap());
}
