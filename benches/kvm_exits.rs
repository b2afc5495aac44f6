//! The KVM backend's VMM core on the real /dev/kvm, measured in one run:
//! - VM creation to the guest's first instruction: `Vmm::new` (VM, 1 MiB of memory,
//!   a UART) until a real-mode program's first `out` reaches a device, median of 20;
//! - the cost of one port-I/O exit through the bus: a program doing 20,000 `out`s to
//!   a counting device, against the same loop doing 20,000 `nop`s instead (the loop
//!   itself, emulated in real mode on a host without hardware virtualization).
//!
//! - the same two figures for QEMU with `-accel kvm` on the same /dev/kvm: a 64 KiB
//!   `-bios` image whose reset vector jumps to the same loop (to an unassigned port)
//!   and then leaves through `isa-debug-exit`; QEMU process start to exit with one
//!   `out`, and the per-exit cost from 1 against 20,000 `out`s, median of 5.
//!
//! Run: `cargo bench --bench kvm_exits`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vmhost::vm::kvm::vcpu::VcpuState;
use vmhost::vm::kvm::{BusDevice, VcpuSetup, Vmm};

struct Stamp(Arc<Mutex<Option<Instant>>>, Arc<AtomicU64>);
impl BusDevice for Stamp {
    fn read(&mut self, _: u64, d: &mut [u8]) {
        d.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        self.0.lock().get_or_insert_with(Instant::now);
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `code` at 0x1000 to its hlt; returns (creation-to-first-out, total, outs).
fn run(code: &[u8]) -> (Option<Duration>, Duration, u64) {
    let t = Instant::now();
    let mut vmm = Vmm::new(1 << 20, &[]).unwrap();
    let first = Arc::new(Mutex::new(None));
    let count = Arc::new(AtomicU64::new(0));
    vmm.pio().insert(0x500, 1, Arc::new(Mutex::new(Stamp(first.clone(), count.clone())))).unwrap();
    vmm.memory().write(0x1000, code).unwrap();
    let mut setup = VcpuSetup::real_mode(0, 0x1000);
    setup.regs.rdx = 0x500;
    let v = vmm.start_vcpu(0, setup, false).unwrap();
    let st = v.wait_for(Duration::from_secs(60), |s| *s != VcpuState::Running);
    assert_eq!(st, VcpuState::Halted);
    let total = t.elapsed();
    let first = first.lock().map(|f| f - t);
    vmm.stop();
    (first, total, count.load(Ordering::Relaxed))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = kvm_ioctls::Kvm::new() {
        eprintln!("kvm_exits: /dev/kvm cannot be opened ({e}); nothing to measure");
        return;
    }
    // out dx, al; hlt
    let first = median((0..20).map(|_| run(&[0xEE, 0xF4]).0.unwrap().as_secs_f64()).collect());
    let n: u16 = 20_000;
    let [lo, hi] = n.to_le_bytes();
    let outs = [0xB9, lo, hi, 0xEE, 0xE2, 0xFD, 0xF4]; // mov cx, n; l: out dx, al; loop l; hlt
    let nops = [0xB9, lo, hi, 0x90, 0xE2, 0xFD, 0xF4]; // the same with nop
    let (mut with_out, mut with_nop) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (_, t, c) = run(&outs);
        assert_eq!(c, n as u64);
        with_out.push(t.as_secs_f64());
        with_nop.push(run(&nops).1.as_secs_f64());
    }
    let (o, p) = (median(with_out), median(with_nop));
    println!(
        "KVM backend on /dev/kvm ({})",
        vmhost::vm::kvm::probe().err().map_or("hardware virtualization".into(), |_| {
            "no hardware virtualization: guest real mode is emulated".to_string()
        })
    );
    println!("  VM creation to the first guest instruction's exit : {:8.3} ms  (median of 20)", first * 1e3);
    println!("  {n} port-I/O exits through the bus                : {:8.1} ms", o * 1e3);
    println!("  the same loop with nop instead of out             : {:8.1} ms", p * 1e3);
    let ours = (o - p) / n as f64 * 1e6;
    println!("  one port-I/O exit                                 : {:8.2} us", ours);
    let Ok(qemu) = vmhost::vm::qemu::qemu_binary() else {
        println!("QEMU: not installed, no comparison");
        return;
    };
    // A BIOS image: mov cx, N; mov dx, 0x500; l: out dx, al; loop l; mov al, 0;
    // out 0xf4, al (isa-debug-exit); hlt. The reset vector jumps to it.
    let bios = |count: u16| {
        let [lo, hi] = count.to_le_bytes();
        let code = [0xB9, lo, hi, 0xBA, 0x00, 0x05, 0xEE, 0xE2, 0xFD, 0xB0, 0x00, 0xE6, 0xF4, 0xF4];
        let mut img = vec![0u8; 65536];
        img[..code.len()].copy_from_slice(&code);
        img[0xFFF0..0xFFF5].copy_from_slice(&[0xEA, 0x00, 0x00, 0x00, 0xF0]);
        let path = std::env::temp_dir().join(format!("vmhost-bios-{}-{count}.bin", std::process::id()));
        std::fs::write(&path, img).unwrap();
        path
    };
    let (one, many) = (bios(1), bios(n));
    let qrun = |img: &std::path::Path| -> Option<f64> {
        let t = Instant::now();
        let st = std::process::Command::new(&qemu)
            .args([
                "-M",
                "pc",
                "-accel",
                "kvm",
                "-cpu",
                "qemu64",
                "-m",
                "16",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-bios"])
            .arg(img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        // isa-debug-exit: the status is (0 << 1) | 1.
        (st.code() == Some(1)).then(|| t.elapsed().as_secs_f64())
    };
    let (mut q1, mut qn) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        match (qrun(&one), qrun(&many)) {
            (Some(a), Some(b)) => {
                q1.push(a);
                qn.push(b);
            }
            _ => {
                println!("QEMU with -accel kvm did not run the payload here; no comparison");
                return;
            }
        }
    }
    let _ = std::fs::remove_file(&one);
    let _ = std::fs::remove_file(&many);
    let (q1, qn) = (median(q1), median(qn));
    let theirs = (qn - q1) / (n as f64 - 1.0) * 1e6;
    println!("QEMU 7.2, -accel kvm, the same program as a -bios image (median of 5)");
    println!("  process start to exit, one out                    : {:8.1} ms  (ours, without a process: {:.3} ms)", q1 * 1e3, first * 1e3);
    println!(
        "  one port-I/O exit                                 : {:8.2} us  (ours {:.2} us: {:.2}x)",
        theirs,
        ours,
        ours / theirs
    );
    whole_machine(&qemu);
}

/// The kvm backend's whole machine (256 MiB, irqchip and PIT, UART, i8042, virtio
/// console, irqfds, MP table, PVH boot, vCPU, pump and supervisor threads, teardown)
/// around a PVH program that triple-faults at once, against QEMU's microvm doing the
/// same with `-no-reboot`: VM creation to the guest's end, as a `reboot=t` guest ends.
fn whole_machine(qemu: &std::path::Path) {
    // lidt [0] (no valid vector), ud2: a triple fault.
    let code = [0x0F, 0x01, 0x1D, 0, 0, 0, 0, 0x0F, 0x0B];
    let elf = std::env::temp_dir().join(format!("vmhost-pvh-{}.elf", std::process::id()));
    std::fs::write(&elf, vmhost::image::elf::pvh_program(&code, 0x10_0000)).unwrap();
    let ours = median(
        (0..10)
            .map(|_| {
                let cfg = vmhost::vm::kvm::KvmConfig {
                    vmlinux: elf.clone(),
                    initramfs: None,
                    memory_mb: 256,
                    cpus: 1,
                    extra_args: Vec::new(),
                    dmesg: false,
                    console_log: None,
                    timeout: None,
                    boot_timeout: Duration::from_secs(30),
                    first_command: None,
                };
                let t = Instant::now();
                let err = vmhost::vm::kvm::KvmVm::boot(cfg).expect_err("the program has no agent");
                assert!(err.to_string().contains("shut down or rebooted"), "{err}");
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let theirs: Vec<f64> = (0..5)
        .filter_map(|_| {
            let t = Instant::now();
            let st = std::process::Command::new(qemu)
                .args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "qemu64", "-m", "256"])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-kernel"])
                .arg(&elf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            st.success().then(|| t.elapsed().as_secs_f64())
        })
        .collect();
    let _ = std::fs::remove_file(&elf);
    println!("The whole machine, a PVH program that triple-faults at once (256 MiB)");
    println!("  ours: build, boot, guest end seen, torn down      : {:8.2} ms  (median of 10)", ours * 1e3);
    if theirs.len() == 5 {
        let theirs = median(theirs);
        println!(
            "  QEMU microvm -accel kvm -no-reboot, start to exit : {:8.2} ms  (ours {:.3}x)",
            theirs * 1e3,
            ours / theirs
        );
    } else {
        println!("  QEMU microvm -accel kvm did not run the program here; no comparison");
    }
}
