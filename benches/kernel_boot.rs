//! Stock against minimal kernel, and vmhost's own overhead, in one run:
//! - boot to agent ready (QEMU started to the agent's Hello) with the stock Debian cloud
//!   kernel and with vmhost's minimal kernel, same busybox image and agent;
//! - `vmhost run -- true` end to end against a bare QEMU boot of the same minimal kernel,
//!   with as many vCPUs, to an /init that exits at once (QEMU started to QEMU gone): the
//!   tool's overhead. With one vCPU, and with vmhost's default count when that is more.
//!   And `vmhost run -e BENCH=1 -- true`, whose command starts only after the boot (an -e
//!   value keeps it off the kernel command line): what starting it at boot buys.
//!
//! Run: `cargo bench --bench kernel_boot` (after scripts/setup.sh, `vmhost kernel fetch`
//! and `vmhost kernel build`). VMHOST_BENCH_BOOTS sets the boots per figure (5).

// Removed however the bench ends (a panic too), like the tests' scratch directories.
#[allow(dead_code)]
#[path = "../src/test_dir.rs"]
mod test_dir;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmhost::image::cpio::{Meta, Writer};
use vmhost::image::{initramfs, kernel, rootfs::Source};
use vmhost::progress::Progress;
use vmhost::vm::qemu::{Accel, BootConfig, QemuVm};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn show(v: &[f64]) -> String {
    format!(
        "{:7.1} ms  (all: {:?})",
        median(v.to_vec()) * 1000.0,
        v.iter().map(|t| (t * 1000.0) as u64).collect::<Vec<_>>()
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("VMHOST_BENCH_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let cache = vmhost::image::cache_dir();
    let p = Progress::quiet();
    let stock = kernel::cached_default(&cache).unwrap().expect("vmhost kernel fetch");
    let minimal = kernel::cached_minimal(&cache).unwrap().expect("vmhost kernel build");
    let agent = initramfs::find_agent().unwrap();
    let accel = Accel::choose().unwrap();

    let default = vmhost::vm::default_cpus(vmhost::wire::Backend::Qemu);
    let boot = |k: &kernel::Kernel| -> f64 {
        let ir =
            initramfs::build(&cache, k, &agent, &Source::Default, &initramfs::SizeLimit::none(), &p).unwrap();
        let mut cfg = BootConfig::new(k.clone(), ir).unwrap();
        cfg.cpus = default;
        let t = Instant::now();
        let vm = QemuVm::boot(cfg).unwrap();
        let d = t.elapsed().as_secs_f64();
        vm.stop(Duration::from_secs(5)).unwrap();
        d
    };
    // Bare boot: the minimal kernel, an initramfs holding only an /init that exits.
    let scratch = test_dir::TempDir::new("bare");
    let dir = scratch.path();
    let bare_ir = dir.join("bare.cpio");
    let mut w = Writer::new(std::fs::File::create(&bare_ir).unwrap());
    w.file("init", Meta::root(0o755), &vmhost::image::elf::exit_program()).unwrap();
    w.finish().unwrap();
    let qemu = vmhost::vm::qemu::qemu_binary().unwrap();
    // The same TSC parameters as vmhost's own command line.
    let tsc = vmhost::vm::qemu::clock::kernel_args(minimal.hz()).join(" ");
    let bare = |cpus: u32| -> f64 {
        let t = Instant::now();
        let st = Command::new(&qemu)
            .args(["-M", "microvm,acpi=off", "-accel", accel.as_str(), "-cpu", &vmhost::vm::qemu::cpu_model(accel)])
            .args(["-m", "256M", "-smp", &cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-kernel"])
            .arg(&minimal.vmlinux)
            .arg("-initrd")
            .arg(&bare_ir)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 {tsc} quiet loglevel=1 reboot=t no_timer_check 8250.nr_uarts=1 nolapic_timer pci=off"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success() || st.code().is_some());
        t.elapsed().as_secs_f64()
    };
    let vmhost_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_vmhost"));
    // `after`: with an -e value, which keeps the command off the kernel command line, so
    // that it starts only when asked after the boot (as before the first command was
    // started at boot): the reference for what that buys.
    let run_as = |cpus: u32, after: bool| -> f64 {
        let env: &[&str] = if after { &["-e", "BENCH=1"] } else { &[] };
        let t = Instant::now();
        let st = Command::new(&vmhost_bin)
            .args(["run", "--cpus", &cpus.to_string()])
            .args(env)
            .args(["--", "true"])
            .env("VMHOST_KERNEL_KIND", "minimal")
            .env_remove("VMHOST_KERNEL")
            // Whatever the bench's own stdin is: /dev/null, which is not fed.
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        t.elapsed().as_secs_f64()
    };
    let run = |cpus: u32| run_as(cpus, false);
    // One vCPU, and vmhost's default when it is more.
    let shapes: Vec<u32> = if default > 1 { vec![1, default] } else { vec![1] };
    let (mut s, mut m) = (Vec::new(), Vec::new());
    let mut b: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    let mut r: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    let mut a: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    // Warm the caches (initramfs for each kernel) before measuring.
    boot(&stock);
    boot(&minimal);
    run(1);
    for round in 0..n {
        s.push(boot(&stock));
        m.push(boot(&minimal));
        for (i, &cpus) in shapes.iter().enumerate() {
            b[i].push(bare(cpus));
            // In turn first and second: neither always follows the bare boot.
            if round % 2 == 0 {
                r[i].push(run(cpus));
                a[i].push(run_as(cpus, true));
            } else {
                a[i].push(run_as(cpus, true));
                r[i].push(run(cpus));
            }
        }
    }
    println!("boot to agent ready ({} accelerator, {default} vCPU), median of {n}", accel.as_str());
    println!("  stock kernel   {}: {}", stock.origin.rsplit('/').next().unwrap_or(""), show(&s));
    println!("  minimal kernel {}: {}", minimal.origin.rsplit('/').next().unwrap_or(""), show(&m));
    println!("  minimal is {:.2}x faster (target: agent ready <= 1.0 s)", median(s) / median(m.clone()));
    // Noise on a shared host only ever adds time: the fastest runs show the floor.
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    for (i, &cpus) in shapes.iter().enumerate() {
        let note = if cpus == default { " (vmhost's default here)" } else { "" };
        println!("the tool's overhead, minimal kernel, {cpus} vCPU{note}");
        println!("  bare QEMU boot to an /init that exits : {}", show(&b[i]));
        println!("  vmhost run --cpus {cpus} -- true            : {}", show(&r[i]));
        println!(
            "  ratio {:.2}x of medians, {:.2}x of the fastest runs (target <= 1.3x)",
            median(r[i].clone()) / median(b[i].clone()),
            min(&r[i]) / min(&b[i])
        );
        println!("  vmhost run --cpus {cpus} -e BENCH=1 -- true : {}", show(&a[i]));
        println!(
            "  (the command started after boot: {:.2}x of the bare median; starting it at boot saves {:.1} ms)",
            median(a[i].clone()) / median(b[i].clone()),
            (median(a[i].clone()) - median(r[i].clone())) * 1000.0
        );
    }
}
