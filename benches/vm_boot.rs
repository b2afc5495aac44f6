//! Boot to agent-ready and exec round trips on real guests, measured in one run:
//! - boot: microvm + uncompressed vmlinux (PVH) vs pc + the package's bzImage, same
//!   kernel and initramfs, median of N boots each, alternating;
//! - exec round trip of `true` in a running guest: straight over the agent channel, and
//!   through the whole library path (Instance::command(..).output(), in-process);
//! - 20 concurrent `true` execs.
//!
//! Run: `cargo bench --bench vm_boot` (needs QEMU, the static agent, a kernel: run
//! scripts/setup.sh and `vmhost kernel fetch` first). VMHOST_BENCH_BOOTS sets N (3).

use std::time::{Duration, Instant};

use vmhost::image::{initramfs, kernel, rootfs::Source};
use vmhost::internals::contract::proto::ExecRequest;
use vmhost::progress::Progress;
use vmhost::vm::qemu::{BootConfig, MachineType, QemuVm};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: f64) -> String {
    format!("{:8.1} ms", d * 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let boots: usize = std::env::var("VMHOST_BENCH_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let cache = vmhost::image::cache_dir();
    let p = Progress::quiet();
    let k = kernel::resolve(&cache, &p).expect("kernel (vmhost kernel fetch)");
    let agent = initramfs::find_agent().expect("static agent (scripts/build-agent.sh)");
    let ir =
        initramfs::build(&cache, &k, &agent, &Source::Default, &initramfs::SizeLimit::none(), &p).unwrap();
    let bz = k.vmlinux.with_file_name("vmlinuz");
    let accel = vmhost::vm::qemu::Accel::choose().unwrap();

    let boot = |machine: MachineType| -> (f64, QemuVm) {
        let mut cfg = BootConfig::new(k.clone(), ir.clone()).unwrap();
        cfg.machine = machine;
        if machine == MachineType::Pc {
            cfg.kernel_image = Some(bz.clone());
        }
        let t = Instant::now();
        let vm = QemuVm::boot(cfg).unwrap();
        (t.elapsed().as_secs_f64(), vm)
    };
    let (mut micro, mut pc) = (Vec::new(), Vec::new());
    for _ in 0..boots {
        let (t, vm) = boot(MachineType::Microvm);
        micro.push(t);
        vm.stop(Duration::from_secs(5)).unwrap();
        if bz.is_file() {
            let (t, vm) = boot(MachineType::Pc);
            pc.push(t);
            vm.stop(Duration::from_secs(5)).unwrap();
        }
    }
    println!(
        "boot to agent ready, {} accelerator, stock kernel {}, median of {boots}",
        accel.as_str(),
        k.origin
    );
    let m = median(micro.clone());
    println!(
        "  microvm + vmlinux (PVH)   : {}   (all: {:?})",
        ms(m),
        micro.iter().map(|t| (t * 1000.0) as u64).collect::<Vec<_>>()
    );
    if !pc.is_empty() {
        let p = median(pc.clone());
        println!(
            "  pc + bzImage              : {}   (all: {:?})",
            ms(p),
            pc.iter().map(|t| (t * 1000.0) as u64).collect::<Vec<_>>()
        );
        println!("  microvm is {:.2}x faster", p / m);
    }

    // Exec round trips on one running guest.
    let (_, vm) = boot(MachineType::Microvm);
    let link = vm.agent().unwrap().clone();
    let req =
        ExecRequest { program: "true".into(), env: vec!["PATH=/bin:/usr/bin".into()], ..Default::default() };
    let run = || {
        let p = link.exec(&req).unwrap();
        assert_eq!(p.drain(|_, _| Ok(())).unwrap(), 0);
    };
    for _ in 0..10 {
        run();
    }
    let n = 100;
    let mut samples = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        run();
        samples.push(t.elapsed().as_secs_f64());
    }
    let agent_rtt = median(samples);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..20 {
            s.spawn(run);
        }
    });
    let twenty = t.elapsed().as_secs_f64();
    vm.stop(Duration::from_secs(5)).unwrap();

    let inst = vmhost::Instance::new_in_process(vmhost::Image::Default, Default::default()).unwrap();
    for _ in 0..10 {
        inst.command("true").output().unwrap();
    }
    let mut samples = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        inst.command("true").output().unwrap();
        samples.push(t.elapsed().as_secs_f64());
    }
    let lib_rtt = median(samples);
    inst.close().unwrap();
    println!("exec round trip of `true` in a running guest ({} accelerator), median of {n}", accel.as_str());
    println!("  agent channel (Exec, wait for Exit)      : {}", ms(agent_rtt));
    println!("  library Instance::command(..).output()   : {}   (target <= 10 ms under TCG)", ms(lib_rtt));
    println!(
        "  20 concurrent `true` over the agent      : {}   ({:.1} ms each)",
        ms(twenty),
        twenty * 1000.0 / 20.0
    );
    backends(boots);
}

/// Boot to agent-ready through the library on each backend, same image and kernel
/// (vmhost's own: the kvm machine needs it). The kvm backend needs hardware
/// virtualization; where there is none, says so and measures nothing.
fn backends(boots: usize) {
    use vmhost::wire::Backend;
    if let Err(why) = vmhost::vm::kvm::probe() {
        println!("boot to agent ready, kvm backend against qemu: not measured here: {why}");
        return;
    }
    let time = |backend: Backend| -> Vec<f64> {
        (0..boots)
            .map(|_| {
                let opts = vmhost::InstanceOptions { backend, ..Default::default() };
                let t = Instant::now();
                let vm = vmhost::Instance::new_in_process(vmhost::Image::Default, opts).unwrap();
                let took = t.elapsed().as_secs_f64();
                vm.close().unwrap();
                took
            })
            .collect()
    };
    let (kvm, qemu) = (median(time(Backend::Kvm)), median(time(Backend::Qemu)));
    println!("boot to agent ready through the library, median of {boots}");
    println!("  kvm backend (own VMM)    : {}", ms(kvm));
    println!("  qemu backend             : {}   (kvm {:.2}x)", ms(qemu), kvm / qemu);
}
