//! Density: many idle VMs at once on one machine, against one VM alone in the same run.
//!
//! - one idle 128 MiB VM alone: its QEMU's CPU (% of a core over a window) and memory
//!   (RSS, of it anonymous, and PSS: its share of pages mapped by several QEMUs);
//! - N idle 128 MiB VMs booted one after another (`VMHOST_BENCH_VMS`, default 50): boot
//!   times, then the same figures per VM (mean and worst) and for vmhost's own process;
//! - a `true` in each VM in turn while all run: the slowest answer and the median;
//! - the ratios of the crowd's per-VM figures to the lone VM's.
//!
//! Run: `cargo bench --bench vms_at_once` (QEMU, the static agent and a kernel: run
//! scripts/setup.sh and `vmhost kernel build` or `vmhost kernel fetch` first).
//! `VMHOST_BENCH_IDLE` sets the measuring window in seconds (20).

use std::time::{Duration, Instant};

use vmhost::{Image, Instance, InstanceOptions};

/// CPU ticks (user + system) of a process.
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// (RSS, anonymous RSS, PSS) of a process, in KiB.
fn memory(pid: u32) -> (u64, u64, u64) {
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (field(&status, "VmRSS:"), field(&status, "RssAnon:"), field(&rollup, "Pss:"))
}

/// QEMU processes that are children of this process, in start order.
fn qemus() -> Vec<u32> {
    let me = std::process::id();
    let mut out: Vec<(u64, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        if comm.starts_with("qemu") && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            out.push((f.get(19).and_then(|s| s.parse().ok()).unwrap_or(0), pid));
        }
    }
    out.sort();
    out.into_iter().map(|(_, p)| p).collect()
}

struct Idle {
    /// % of one core, per process.
    cpu: Vec<f64>,
    /// ours, % of one core.
    own: f64,
    mem: Vec<(u64, u64, u64)>,
}

/// Measures `pids` and this process over `window`.
fn idle(pids: &[u32], window: Duration) -> Idle {
    let hz = 100.0; // USER_HZ on Linux
    let me = std::process::id();
    let before: Vec<u64> = pids.iter().map(|&p| ticks(p)).collect();
    let own0 = ticks(me);
    std::thread::sleep(window);
    let secs = window.as_secs_f64();
    let cpu = pids.iter().zip(before).map(|(&p, b)| (ticks(p) - b) as f64 / hz / secs * 100.0).collect();
    let own = (ticks(me) - own0) as f64 / hz / secs * 100.0;
    Idle { cpu, own, mem: pids.iter().map(|&p| memory(p)).collect() }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn worst(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, f64::max)
}

fn print(label: &str, m: &Idle) {
    let mib = |k: u64| k as f64 / 1024.0;
    let rss = || m.mem.iter().map(|x| mib(x.0));
    let anon = || m.mem.iter().map(|x| mib(x.1));
    let pss = || m.mem.iter().map(|x| mib(x.2));
    println!(
        "  {label:<26} CPU {:5.2} % (worst {:5.2} %)   RSS {:5.1} MiB (worst {:5.1})   anon {:5.1}   PSS {:5.1} MiB",
        mean(m.cpu.iter().copied()),
        worst(m.cpu.iter().copied()),
        mean(rss()),
        worst(rss()),
        mean(anon()),
        mean(pss()),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("VMHOST_BENCH_VMS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let window = Duration::from_secs(
        std::env::var("VMHOST_BENCH_IDLE").ok().and_then(|v| v.parse().ok()).unwrap_or(20),
    );
    let opts = InstanceOptions { memory_mb: 128, backend: vmhost::wire::Backend::Qemu, ..Default::default() };
    let settle = Duration::from_secs(5);

    println!(
        "idle 128 MiB VMs, QEMU {} ({}), window {:?}",
        vmhost::vm::qemu::Accel::choose().unwrap().as_str(),
        if vmhost::image::kernel::resolve(&vmhost::image::cache_dir(), &vmhost::progress::Progress::quiet())
            .is_ok_and(|k| k.is_minimal())
        {
            "vmhost's kernel"
        } else {
            "stock kernel"
        },
        window
    );
    // One alone: the reference.
    let alone = Instance::new_in_process(Image::Default, opts.clone()).expect("boot");
    std::thread::sleep(settle);
    let one = idle(&qemus(), window);
    print("1 VM alone", &one);
    alone.kill().unwrap();

    // N at once.
    let mut vms = Vec::new();
    let mut boots = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        match Instance::new_in_process(Image::Default, opts.clone()) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                println!("  VM {} did not boot: {e}", i + 1);
                break;
            }
        }
        boots.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = boots.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  booted {} VMs one after another: median {:.2} s, first {:.2} s, last {:.2} s, slowest {:.2} s",
        vms.len(),
        sorted[sorted.len() / 2],
        boots[0],
        boots[boots.len() - 1],
        sorted[sorted.len() - 1]
    );
    std::thread::sleep(settle);
    let crowd = idle(&qemus(), window);
    print(&format!("each of {} VMs", vms.len()), &crowd);
    println!(
        "  all {} QEMUs {:.1} % of a core together; vmhost's process {:.2} %; host load {}",
        vms.len(),
        crowd.cpu.iter().sum::<f64>(),
        crowd.own,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?")
    );
    println!(
        "  ratio to the lone VM: CPU {:.2}x, RSS {:.2}x",
        mean(crowd.cpu.iter().copied()) / mean(one.cpu.iter().copied()).max(1e-9),
        mean(crowd.mem.iter().map(|m| m.0 as f64)) / mean(one.mem.iter().map(|m| m.0 as f64)).max(1e-9)
    );

    // A command in each, one after another, while all run.
    let mut answers = Vec::new();
    for vm in &vms {
        let t = Instant::now();
        let out = vm.command("true").output().expect("exec");
        assert!(out.status.success());
        answers.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = answers.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  `true` in each VM in turn: median {:.1} ms, slowest {:.1} ms (target: every one within 1 s)",
        sorted[sorted.len() / 2] * 1000.0,
        sorted[sorted.len() - 1] * 1000.0
    );
    for vm in vms {
        let _ = vm.kill();
    }
}
