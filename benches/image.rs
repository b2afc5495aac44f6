//! Container images, measured in one run against real references:
//! - pull of a large image (busybox plus ~350 MB of the host's /usr: tens of thousands
//!   of files) from the registry on 127.0.0.1: vmhost's pull into a fresh store against
//!   `skopeo copy` of the same image into an OCI layout, alternating;
//! - boot to the first command (`vmhost run --image REF -- true`) of the large image
//!   against the busybox image, both already pulled and their disks built, alternating;
//! - the store's size against the sum of the unique blobs its manifests name.
//!
//! Run: `cargo bench --bench image` (needs docker-registry, skopeo, umoci, erofs-utils,
//! QEMU, the agent and vmhost's kernel: scripts/test.sh installs and builds them).
//! VMHOST_BENCH_RUNS sets the runs of each (3 pulls, 5 boots by default).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;
use common::registry::{Layout, TestRegistry};
use common::TempDir;

fn du(p: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("0").parse().unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = |d: usize| std::env::var("VMHOST_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let cache = vmhost::image::cache_dir();
    let busybox = vmhost::image::rootfs::busybox_root(&cache, &vmhost::progress::Progress::quiet()).unwrap();
    let work = TempDir::new("bench-image");
    let copy = |from: &str, to: &Path| {
        let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(st.success(), "cp {from}");
    };

    // The images: busybox, and busybox plus a big layer of the host's files.
    let t = Instant::now();
    let small = Layout::new(&work.join("small"), "1");
    small.layer(|root| copy(&format!("{}/.", busybox.display()), root));
    let large = Layout::new(&work.join("large"), "1");
    large.layer(|root| copy(&format!("{}/.", busybox.display()), root));
    large.layer(|root| {
        std::fs::create_dir_all(root.join("usr/share")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        for d in ["doc", "man", "vim", "i18n", "mime", "X11", "zoneinfo", "perl5", "info", "bash-completion"]
        {
            let p = format!("/usr/share/{d}");
            if Path::new(&p).exists() {
                copy(&p, &root.join("usr/share"));
            }
        }
        for d in ["/usr/lib/python3", "/usr/lib/python3.11"] {
            if Path::new(d).exists() {
                copy(d, &root.join("usr/lib"));
            }
        }
        let files = Command::new("sh")
            .arg("-c")
            .arg(format!("find {} -type f | wc -l", root.display()))
            .output()
            .unwrap();
        println!(
            "large image: {:.0} MB in {} files",
            du(root) as f64 / 1e6,
            String::from_utf8_lossy(&files.stdout).trim()
        );
    });
    println!("images made with umoci in {:.1} s", t.elapsed().as_secs_f64());
    let reg = TestRegistry::start("bench-image-reg");
    small.push(&reg, "bench/small:1", &[]);
    large.push(&reg, "bench/large:1", &[]);
    let r_small = format!("{}/bench/small:1", reg.host());
    let r_large = format!("{}/bench/large:1", reg.host());

    // Pull: vmhost into a fresh store, skopeo into a fresh layout, alternating.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let reference: vmhost::image::reference::Reference = r_large.parse().unwrap();
    for i in 0..runs(3) {
        let store_dir = work.join(&format!("store-{i}"));
        let store = vmhost::image::store::Store::open(&store_dir).unwrap();
        let t = Instant::now();
        vmhost::image::pull::pull(&store, &reference, &Default::default()).unwrap();
        ours.push(t.elapsed().as_secs_f64());
        let dest = work.join(&format!("skopeo-{i}"));
        let t = Instant::now();
        let st = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{r_large}"))
            .arg(format!("oci:{}:1", dest.display()))
            .status()
            .unwrap();
        assert!(st.success());
        theirs.push(t.elapsed().as_secs_f64());
        if i == 0 {
            let store_bytes = du(&store_dir.join("blobs"));
            let layout_bytes = du(&dest.join("blobs"));
            println!(
                "store: {:.1} MB of blobs; skopeo's layout of the same image {:.1} MB: {:.3}x",
                store_bytes as f64 / 1e6,
                layout_bytes as f64 / 1e6,
                store_bytes as f64 / layout_bytes as f64
            );
        }
        let _ = std::fs::remove_dir_all(&store_dir);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let (o, s) = (common::median(ours.clone()), common::median(theirs.clone()));
    println!("pull of the large image, median of {}", ours.len());
    println!("  skopeo copy docker:// -> oci:    {:8.2} s   (all: {theirs:.2?})", s);
    println!("  vmhost pull into the store       {:8.2} s   (all: {ours:.2?})", o);
    println!("  ratio                            {:8.2}x  (target <= 1.0x)", o / s);

    // Boot to the first command: both pulled and their disks built first.
    let xdg = work.join("xdg");
    let vmhost_run = |image: &str| {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_vmhost"))
            .args(["run", "--image", image, "--", "true"])
            .env("XDG_CACHE_HOME", &xdg)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        t.elapsed().as_secs_f64()
    };
    // A private cache with the kernels and the busybox root of the real one.
    std::fs::create_dir_all(xdg.join("vmhost")).unwrap();
    copy(&cache.join("kernels").display().to_string(), &xdg.join("vmhost"));
    let t = Instant::now();
    vmhost_run(&r_large);
    println!(
        "first run of the large image (pull, unpack, mkfs.erofs, boot): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    vmhost_run(&r_small);
    let (mut big, mut bb) = (Vec::new(), Vec::new());
    for _ in 0..runs(5) {
        big.push(vmhost_run(&r_large));
        bb.push(vmhost_run(&r_small));
    }
    let (b, s) = (common::median(big.clone()), common::median(bb.clone()));
    println!("vmhost run --image REF -- true, median of {}", big.len());
    println!(
        "  busybox image                    {:8.0} ms  (all: {:.0?})",
        s * 1e3,
        bb.iter().map(|x| x * 1e3).collect::<Vec<_>>()
    );
    println!(
        "  large image                      {:8.0} ms  (all: {:.0?})",
        b * 1e3,
        big.iter().map(|x| x * 1e3).collect::<Vec<_>>()
    );
    println!("  ratio                            {:8.2}x  (target <= 1.2x)", b / s);
}
