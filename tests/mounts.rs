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
    // As root, each VM's QEMU runs as a user of its own, who may write what everyone may.
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(rw.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
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
fn a_share_qemu_s_own_user_cannot_reach_is_refused_before_boot() {
    if !vm_ready("a_share_qemu_s_own_user_cannot_reach_is_refused_before_boot") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP a_share_qemu_s_own_user_cannot_reach_is_refused_before_boot: QEMU changes user only under root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("mount-private");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let open = TempDir::new("mount-open");
    for (path, mode) in [(dir.path(), "ro"), (open.path(), "rw")] {
        let out = std::process::Command::new(common::vmhost_bin())
            .args(["run", "--mount"])
            .arg(format!("{}:work:{mode}", path.display()))
            .args(["--", "true"])
            .env_remove("VMHOST_QEMU_USER")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(&path.display().to_string()) && err.contains("VMHOST_QEMU_USER"), "{err}");
    }
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

/// What a hostile guest plants in a writable mount: a setuid-root copy of busybox, a file
/// given to another owner, a setgid directory, a symlink out of the share, a device node
/// and a FIFO; then what it sees of them.
const PLANT: &str = "cd /mnt/work && cp /bin/busybox suid && chown 0:0 suid && chmod 6755 suid \
    && touch owned && chown 1234:5678 owned && mkdir d && chmod 2777 d \
    && ln -s /etc/shadow link && mknod dev c 1 3 && mkfifo fifo \
    && stat -c '%n %a %u %g %F' suid owned d link dev fifo";

/// Who owns on the host what the guest made in a writable share: the user QEMU ran as.
#[derive(Clone, Copy, Debug)]
enum HostOwner {
    /// This uid.
    Uid(u32),
    /// The VM's own user (vmhost running as root).
    PerVm,
}

/// Runs [`PLANT`] through `vmhost run --mount DIR:work`, as the user `as_user` (uid, gid)
/// when given, and checks both views: the guest keeps what it set, the host gets plain
/// files and directories of QEMU's user, `owner`, without setuid or setgid bits.
fn plant_and_check(
    dir: &std::path::Path,
    env: &[(String, String)],
    as_user: Option<(u32, u32)>,
    owner: HostOwner,
) {
    let mut cmd = match as_user {
        Some((uid, gid)) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()]);
            c.arg(common::vmhost_bin());
            c
        }
        None => std::process::Command::new(common::vmhost_bin()),
    };
    let out = cmd
        .args(["run", "--mount"])
        .arg(format!("{}:work", dir.display()))
        .args(["--", "sh", "-c", PLANT])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The guest's view: what it set, so that its programs work as they would anywhere.
    assert_eq!(
        stdout,
        "suid 6755 0 0 regular file\nowned 644 1234 5678 regular empty file\nd 2777 0 0 directory\n\
         link 777 0 0 symbolic link\ndev 644 0 0 character special file\nfifo 644 0 0 fifo\n",
        "{stderr}"
    );
    // The host's: nothing to run with privileges, nothing owned by anyone else, nothing
    // that leads out of the share.
    use std::os::unix::fs::MetadataExt;
    use vmhost::vm::qemu::user::{DYNAMIC_UIDS, DYNAMIC_UID_FIRST};
    let per_vm = DYNAMIC_UID_FIRST..DYNAMIC_UID_FIRST + DYNAMIC_UIDS;
    for name in ["suid", "owned", "d", "link", "dev", "fifo"] {
        let m = std::fs::symlink_metadata(dir.join(name)).unwrap();
        let t = m.file_type();
        assert!(t.is_file() || t.is_dir(), "{name} is a {t:?} on the host");
        assert_eq!(m.mode() & 0o7000, 0, "{name} has mode {:o} on the host", m.mode());
        match owner {
            HostOwner::Uid(me) => assert_eq!(m.uid(), me, "{name} belongs to uid {} on the host", m.uid()),
            HostOwner::PerVm => {
                assert!(per_vm.contains(&m.uid()), "{name} belongs to uid {} on the host", m.uid());
                assert_eq!(m.gid(), m.uid(), "{name}");
            }
        }
        assert_eq!(m.mode() & 0o777, if t.is_dir() { 0o755 } else { 0o644 }, "{name}");
    }
    // The guest's symlink is a file holding its target.
    assert_eq!(std::fs::read_to_string(dir.join("link")).unwrap(), "/etc/shadow");
}

#[test]
fn a_writable_mount_never_plants_setuid_files_other_owners_or_symlinks_on_the_host() {
    if !vm_ready("a_writable_mount_never_plants_setuid_files_other_owners_or_symlinks_on_the_host") {
        return;
    }
    let me = nix::unistd::geteuid();
    if !me.is_root() {
        let share = TempDir::new("mount-plant");
        plant_and_check(share.path(), &[], None, HostOwner::Uid(me.as_raw()));
        eprintln!("note: running as a non-root user already; the runs as root and nobody need root");
        return;
    }
    // As root: QEMU as the VM's own user (in a share everyone may write), and as root
    // when asked (VMHOST_QEMU_USER=root); mapped-xattr keeps the host's files plain both ways.
    let share = TempDir::new("mount-plant");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(share.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    plant_and_check(share.path(), &[], None, HostOwner::PerVm);
    let share = TempDir::new("mount-plant-root");
    let env = [("VMHOST_QEMU_USER".to_string(), "root".to_string())];
    plant_and_check(share.path(), &env, None, HostOwner::Uid(0));
    // The same as an unprivileged user (nobody), with a cache of its own holding copies
    // of the kernel and the default image (root's cache is under /root, 0700).
    let (uid, gid) = (65534, 65534);
    let home = TempDir::new("mount-nobody");
    let xdg = common::private_cache(home.path());
    let share = home.join("share");
    std::fs::create_dir(&share).unwrap();
    let st =
        std::process::Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(home.path()).status();
    assert!(st.unwrap().success());
    let env = [
        ("XDG_CACHE_HOME".to_string(), xdg.display().to_string()),
        ("XDG_RUNTIME_DIR".to_string(), home.path().display().to_string()),
        ("HOME".to_string(), home.path().display().to_string()),
    ];
    plant_and_check(&share, &env, Some((uid, gid)), HostOwner::Uid(uid));
}
