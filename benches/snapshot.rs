//! Filesystem snapshots, measured in one run against references:
//! - `Instance::snapshot` of 1 MB and of 100 MB of changes (one new file of random bytes,
//!   new content each round), against reading the same file out of the guest over the
//!   agent channel (`fs().read`), the bytes a snapshot must move at least;
//! - boot to the first command's end of a chain of ten snapshots against its base image
//!   (both booted from their erofs disks, already built), alternating.
//!
//! Run: `cargo bench --bench snapshot` (needs umoci, erofs-utils, QEMU, the agent and
//! vmhost's kernel: scripts/test.sh installs and builds them). VMHOST_BENCH_RUNS sets
//! the rounds (3 snapshots of each size, 5 boots of each by default).

use std::time::Instant;

use vmhost::{Image, Instance, InstanceOptions, SnapshotOptions};

#[path = "../tests/common/mod.rs"]
mod common;
use common::TempDir;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = |d: usize| std::env::var("VMHOST_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let home = TempDir::new("bench-snapshot");
    let layout = common::registry::busybox_layout(&home);
    let base = Image::Dir(layout.path.clone());
    let options = InstanceOptions { memory_mb: 768, ..Default::default() };

    // Snapshots of 1 MB and 100 MB of changes.
    let vm = Instance::new(base.clone(), options.clone()).expect("boot the image");
    for (label, size) in [("1 MB", 1usize << 20), ("100 MB", 100 << 20)] {
        let (mut snap, mut read) = (vec![], vec![]);
        for round in 0..runs(3) {
            let data = common::noise(size, 0x9E37_79B9_7F4A_7C15 ^ (size as u64) ^ round as u64);
            vm.fs().write("/changes", &data).unwrap();
            let t = Instant::now();
            let s = vm.snapshot(&SnapshotOptions::default()).unwrap();
            snap.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            assert_eq!(vm.fs().read("/changes").unwrap().len(), size);
            read.push(t.elapsed().as_secs_f64());
            assert_eq!(s.cache_key().len(), 32);
        }
        let (s, r) = (common::median(snap), common::median(read));
        println!(
            "snapshot of {label}: {:.1} ms ({:.1} MB/s); reading it over the agent channel: {:.1} ms; ratio {:.2}x",
            s * 1e3,
            size as f64 / 1e6 / s,
            r * 1e3,
            s / r
        );
    }
    vm.close().unwrap();

    // A chain of ten, each a small change on the one before.
    let mut image = base.clone();
    for i in 0..10 {
        let vm = Instance::new(image, options.clone()).expect("boot");
        let out = vm.command("sh").arg("-c").arg(format!("echo {i} > /step-{i}")).output().unwrap();
        assert!(out.status.success());
        image = vm.snapshot(&SnapshotOptions::default()).unwrap().image();
        vm.close().unwrap();
    }
    let boot = |image: &Image| {
        let t = Instant::now();
        let vm = Instance::new(image.clone(), options.clone()).expect("boot");
        let out = vm.command("cat").arg("/step-9").output().unwrap();
        let took = t.elapsed().as_secs_f64();
        vm.close().unwrap();
        (took, out.status.success())
    };
    // Disks built and caches warm before timing.
    let _ = boot(&base);
    assert!(boot(&image).1, "the chain's last change is there");
    let (mut b, mut c) = (vec![], vec![]);
    for _ in 0..runs(5) {
        b.push(boot(&base).0);
        c.push(boot(&image).0);
    }
    let (b, c) = (common::median(b), common::median(c));
    println!(
        "boot to the first command's end: base image {:.0} ms, chain of ten snapshots {:.0} ms; ratio {:.2}x",
        b * 1e3,
        c * 1e3,
        c / b
    );
}
