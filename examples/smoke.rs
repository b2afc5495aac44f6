use std::time::{Duration, Instant};
use vmhost::agent::proto::ExecRequest;
use vmhost::image::{initramfs, kernel, rootfs::Source};
use vmhost::progress::Progress;
use vmhost::vm::qemu::{BootConfig, QemuVm};

fn main() {
    env_logger::init();
    let p = Progress::auto();
    let cache = vmhost::image::cache_dir();
    let k = kernel::resolve(&cache, &p).unwrap();
    println!("kernel {:?}", k);
    let agent = initramfs::find_agent().unwrap();
    let ir = initramfs::build(&cache, &k, &agent, &Source::Default, &p).unwrap();
    let mut cfg = BootConfig::new(k, ir).unwrap();
    cfg.dmesg = std::env::var("DMESG").is_ok();
    let t = Instant::now();
    let vm = match QemuVm::boot(cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    };
    println!("booted in {:?}", t.elapsed());
    let a = vm.agent().unwrap();
    let t = Instant::now();
    let proc = a
        .exec(&ExecRequest {
            program: "uname".into(),
            args: vec!["-a".into()],
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        })
        .unwrap();
    let code = proc
        .drain(|s, d| {
            print!("[{s}] {}", String::from_utf8_lossy(d));
            Ok(())
        })
        .unwrap();
    println!("exit {code} in {:?}", t.elapsed());
    vm.stop(Duration::from_secs(5)).unwrap();
    println!("stopped: {}", vm.state());
}
