//! Idle guests cost the host next to nothing, so that many fit on one machine: an idle
//! vCPU takes no timer ticks, memory the guest frees goes back to the host, and 50 idle
//! VMs at once each answer a command. (How much they cost is a benchmark's business:
//! `cargo bench --bench vms_at_once`.)

mod common;

use std::time::Duration;

use common::{children_of, vm_ready, wait_until};
use vmhost::{Image, Instance, InstanceOptions};

/// The tests of this file take turns: one counts its VM's QEMU among this process's
/// children, the other starts fifty.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn small() -> InstanceOptions {
    InstanceOptions { memory_mb: 128, backend: vmhost::wire::Backend::Qemu, ..Default::default() }
}

/// A process's anonymous memory, in KiB.
fn anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_idle_guest_takes_no_ticks_and_gives_back_the_memory_it_frees() {
    if !vm_ready("an_idle_guest_takes_no_ticks_and_gives_back_the_memory_it_frees") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !vmhost::image::kernel::resolve(&vmhost::image::cache_dir(), &vmhost::progress::Progress::quiet())
        .is_ok_and(|k| k.is_minimal())
    {
        // Debian's kernel is tickless too, but has its balloon driver as a module that
        // vmhost does not load.
        assert!(!common::under_ci(), "CI builds vmhost's kernel");
        eprintln!("SKIP: not vmhost's own kernel");
        return;
    }
    let vm = Instance::new_in_process(Image::Default, small()).unwrap();
    // Timer interrupts on idle vCPUs over 4 s: a periodic tick would be 250 a second each.
    let script =
        "t() { awk '/LOC|timer/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s }' \
                  /proc/interrupts; }; a=$(t); sleep 4; b=$(t); echo $((b - a))";
    let out = vm.command("sh").args(["-c", script]).output().unwrap();
    let ticks: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX);
    assert!(ticks < 4 * 60, "{ticks} timer interrupts in 4 s on an idle guest: {out:?}");
    // 48 MiB written in the guest and freed: QEMU's memory grows, then shrinks again.
    // This VM's QEMU: the only one of this process (the tests of this file take turns).
    let qemus: Vec<u32> = children_of(std::process::id())
        .into_iter()
        .filter(|(_, c)| c.starts_with("qemu"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(qemus.len(), 1, "one QEMU");
    let qemu = qemus[0];
    let before = anon_kib(qemu);
    let fill =
        vm.command("sh").args(["-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=48 2>&1"]).output().unwrap();
    assert!(fill.status.success(), "{fill:?}");
    let full = anon_kib(qemu);
    assert!(full > before + 40 * 1024, "the guest's 48 MiB did not show: {before} -> {full} KiB");
    vm.command("rm").arg("/tmp/fill").output().unwrap();
    let back = wait_until(Duration::from_secs(60), || anon_kib(qemu) < before + 16 * 1024);
    assert!(back, "freed memory stayed with QEMU: {before} -> {full} -> {} KiB", anon_kib(qemu));
    vm.close().unwrap();
}

#[test]
fn fifty_idle_vms_at_once_each_answer_a_command() {
    if !vm_ready("fifty_idle_vms_at_once_each_answer_a_command") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let vms: Vec<Instance> = (0..50)
        .map(|i| {
            Instance::new_in_process(Image::Default, small()).unwrap_or_else(|e| panic!("VM {}: {e}", i + 1))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    for (i, vm) in vms.iter().enumerate() {
        let out = vm.command("echo").arg(i.to_string()).output().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }
    for vm in vms {
        vm.kill().unwrap();
    }
}
