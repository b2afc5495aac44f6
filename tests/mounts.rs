//! Host directories shared with a real guest over virtio-9p, at /mnt/<tag>: read and
//! written both ways, a read-only one that the guest cannot write even after
//! remounting it read-write, and clear errors for bad mounts.

mod common;

use std::time::Duration;

use common::{vm_ready, TempDir};
use vmhost::wire::MountConfig;
use vmhost::{Error, Image, Instance, InstanceOptions};

fn sh(vm: &Instance, script: &str) -> (i32, String, String) {
    let out = vm.command("sh").arg("-c").arg(script).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shared_directories_read_write_and_read_only() {
    if !vm_ready("shared_directories_read_write_and_read_only") {
        return;
    }
    let rw = TempDir::new("mount-rw");
    let ro = TempDir::new("mount-ro");
    std::fs::write(rw.join("from-host.txt"), "host says hi\n").unwrap();
    std::fs::write(ro.join("keep.txt"), "do not touch\n").unwrap();
    let opts = InstanceOptions {
        timeout: Some(Duration::from_secs(300)),
        mounts: vec![
            MountConfig { tag: "work".into(), host_path: rw.path().display().to_string(), writable: true },
            MountConfig { tag: "data".into(), host_path: ro.path().display().to_string(), writable: false },
        ],
        ..Default::default()
    };
    let vm = Instance::new_in_process(Image::Default, opts).unwrap();

    // Host to guest and guest to host, through the rw mount.
    assert_eq!(sh(&vm, "cat /mnt/work/from-host.txt").1, "host says hi\n");
    assert_eq!(sh(&vm, "echo guest says hi > /mnt/work/from-guest.txt").0, 0);
    assert_eq!(std::fs::read_to_string(rw.join("from-guest.txt")).unwrap(), "guest says hi\n");
    std::fs::write(rw.join("later.txt"), "written while mounted\n").unwrap();
    assert_eq!(sh(&vm, "cat /mnt/work/later.txt").1, "written while mounted\n", "no stale cache");
    // The guest file API sees it too.
    assert_eq!(vm.fs().read_to_string("/mnt/work/from-host.txt").unwrap(), "host says hi\n");
    vm.fs().write("/mnt/work/via-api.txt", b"api\n").unwrap();
    assert_eq!(std::fs::read(rw.join("via-api.txt")).unwrap(), b"api\n");

    // Read-only: refused in the guest, and still refused by QEMU when the guest
    // remounts it read-write.
    assert_eq!(sh(&vm, "cat /mnt/data/keep.txt").1, "do not touch\n");
    let (code, _, err) = sh(&vm, "echo x > /mnt/data/new.txt");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only"), "{err}");
    let (code, _, err) = sh(&vm, "mount -o remount,rw /mnt/data && echo x > /mnt/data/new.txt");
    assert_ne!(code, 0, "a read-only mount became writable: {err}");
    let (code, _, _) = sh(&vm, "rm /mnt/data/keep.txt");
    assert_ne!(code, 0);
    assert!(vm.fs().write("/mnt/data/api.txt", b"no").is_err());
    let mut names: Vec<String> = std::fs::read_dir(ro.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    names.sort();
    assert_eq!(names, ["keep.txt"], "the host side of a read-only mount changed");
    assert_eq!(std::fs::read_to_string(ro.join("keep.txt")).unwrap(), "do not touch\n");
    vm.close().unwrap();
}

#[test]
fn bad_mounts_are_refused_before_boot() {
    let missing = MountConfig { tag: "x".into(), host_path: "/no/such/dir".into(), writable: true };
    let e = vmhost::vm::check_mounts(&[missing]).unwrap_err();
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
    for tag in ["", "a/b", "..", "has space", &"t".repeat(32)] {
        let m = MountConfig { tag: tag.into(), host_path: "/tmp".into(), writable: true };
        let e = vmhost::vm::check_mounts(&[m]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{tag:?}: {e}");
    }
    let m = MountConfig { tag: "t".into(), host_path: "/tmp".into(), writable: true };
    let e = vmhost::vm::check_mounts(&[m.clone(), m]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn a_kernel_without_9p_is_refused_with_what_to_do() {
    if !vm_ready("a_kernel_without_9p_is_refused_with_what_to_do") {
        return;
    }
    let cache = vmhost::image::cache_dir();
    if vmhost::image::kernel::cached_default(&cache).ok().flatten().is_none() {
        eprintln!("SKIP a_kernel_without_9p_is_refused_with_what_to_do: no stock kernel cached");
        assert!(!common::under_ci(), "CI fetches the stock kernel");
        return;
    }
    let dir = TempDir::new("mount-stock");
    let out = std::process::Command::new(common::vmhost_bin())
        .args(["run", "--mount"])
        .arg(format!("{}:work", dir.path().display()))
        .args(["--", "true"])
        .env("VMHOST_KERNEL_KIND", "stock")
        .env_remove("VMHOST_KERNEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("9p") && err.contains("vmhost kernel build"), "{err}");
}
