//! Running container images in real guests: an image made with umoci from the busybox
//! root (its ~270 applets hard links) plus a layer that deletes and adds files, pushed
//! with skopeo to the real registry, run by `vmhost run --image REF` as `docker run`
//! runs it: entrypoint and command, env, working directory and user from the image,
//! arguments replacing the command, `--entrypoint`, and the second run served from the
//! store with the registry stopped; then the same image from an OCI layout, an OCI
//! archive and a `docker save` archive.

mod common;

use std::process::Command;

use common::registry::{tools_ready, Layout, TestRegistry};
use common::{private_cache, vm_ready, TempDir};

fn run(xdg: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(common::vmhost_bin())
        .arg("run")
        .args(args)
        .env("XDG_CACHE_HOME", xdg)
        .env("VMHOST_PULL", "missing")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A private cache for `home`, and an image layout whose first layer is its busybox root.
fn busybox_image(home: &TempDir) -> (std::path::PathBuf, Layout) {
    let xdg = private_cache(home.path());
    (xdg, common::registry::busybox_layout(home))
}

#[test]
fn an_image_from_the_registry_runs_as_docker_runs_it() {
    let test = "an_image_from_the_registry_runs_as_docker_runs_it";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    let home = TempDir::new("imgrun");
    let mut reg = TestRegistry::start("imgrun-reg");
    let (xdg, l) = busybox_image(&home);
    l.layer(|root| {
        std::fs::write(root.join("etc/deleted"), b"lower layer\n").unwrap();
        std::fs::create_dir_all(root.join("work")).unwrap();
    });
    l.layer(|root| {
        std::fs::remove_file(root.join("etc/deleted")).unwrap();
        std::fs::write(root.join("etc/added"), b"upper layer\n").unwrap();
    });
    l.config(&[
        "--config.entrypoint",
        "/bin/sh",
        "--config.entrypoint",
        "-c",
        "--config.cmd",
        "echo from-image $GREETING; pwd; id -u; test ! -e /etc/deleted && cat /etc/added",
        "--config.env",
        "GREETING=hello",
        "--config.env",
        "PATH=/bin:/sbin",
        "--config.workingdir",
        "/work",
        "--config.user",
        "1234:1234",
    ]);
    l.push(&reg, "test/bb:1", &[]);
    let image = format!("{}/test/bb:1", reg.host());

    // The image's own command, env, working directory and user.
    let (code, out, err) = run(&xdg, &["--image", &image]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "from-image hello\n/work\n1234\nupper layer\n", "{err}");

    // The image is not in the guest's memory: it is an erofs disk built once in the
    // cache, under a writable overlay (what the guest writes lives in tmpfs).
    let roots: Vec<String> = std::fs::read_dir(xdg.join("vmhost/roots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(roots.iter().any(|n| n.ends_with(".erofs")), "{roots:?}");
    assert!(!roots.iter().any(|n| n.contains(".unpack.")), "the scratch tree is gone: {roots:?}");
    // (As root, which --user gives over the image's user: 1234 may not write /etc.)
    let (code, out, err) = run(
        &xdg,
        &[
            "--image",
            &image,
            "--user",
            "root",
            "--",
            "grep ' / ' /proc/mounts; echo x > /etc/new && cat /etc/new; id -u",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("overlay / overlay") && out.ends_with("x\n0\n"), "{out}");

    // Arguments replace the command (after the entrypoint); -e and -w apply on top.
    let (code, out, err) = run(&xdg, &["--image", &image, "-e", "GREETING=bye", "--", "echo $GREETING; pwd"]);
    assert_eq!((code, out.as_str()), (Some(0), "bye\n/work\n"), "{err}");

    // Served from the store: the registry is gone.
    reg.stop();
    let (code, out, err) =
        run(&xdg, &["--image", &image, "-w", "/etc", "--entrypoint", "cat", "--", "added"]);
    assert_eq!((code, out.as_str()), (Some(0), "upper layer\n"), "{err}");

    // The same image from local files, recognised by their content: the OCI layout
    // umoci wrote, an OCI archive and a `docker save` archive that skopeo made of it.
    let layout = l.path.display().to_string();
    let oci_archive = home.join("image.oci.tar");
    let docker_archive = home.join("image.docker.tar");
    for (dest, path) in [
        (format!("oci-archive:{}", oci_archive.display()), &oci_archive),
        (format!("docker-archive:{}:test/bb:1", docker_archive.display()), &docker_archive),
    ] {
        let st = Command::new("skopeo")
            .args(["copy", "--quiet", &format!("oci:{layout}:1"), &dest])
            .status()
            .unwrap();
        assert!(st.success() && path.is_file(), "{dest}");
    }
    for source in [layout.clone(), oci_archive.display().to_string(), docker_archive.display().to_string()] {
        let (code, out, err) =
            run(&xdg, &["--image", &source, "--", "echo $GREETING from $(pwd); cat /etc/added"]);
        assert_eq!((code, out.as_str()), (Some(0), "hello from /work\nupper layer\n"), "{source}: {err}");
    }

    // Something never pulled, with the registry gone: a clear error, exit 125.
    let (code, _, err) = run(&xdg, &["--image", &format!("{}/test/none:1", reg.host())]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains(&reg.host()), "{err}");
}

#[test]
fn an_image_keeps_its_owners_and_devices_when_vmhost_is_not_root() {
    let test = "an_image_keeps_its_owners_and_devices_when_vmhost_is_not_root";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: making the image needs root (chown, mknod); the run is as nobody");
        return;
    }
    let home = TempDir::new("imgnobody");
    let (xdg, l) = busybox_image(&home);
    l.layer(|root| {
        std::fs::write(root.join("etc/owned"), b"mine\n").unwrap();
        std::os::unix::fs::chown(root.join("etc/owned"), Some(1234), Some(5678)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("etc/owned"), std::fs::Permissions::from_mode(0o640)).unwrap();
        // A file of the very user vmhost runs as (nobody): it stays nobody's.
        std::fs::write(root.join("etc/nobodys"), b"n\n").unwrap();
        std::os::unix::fs::chown(root.join("etc/nobodys"), Some(65534), Some(65534)).unwrap();
        let st = Command::new("mknod").arg(root.join("etc/null2")).args(["c", "1", "3"]).status().unwrap();
        assert!(st.success());
        std::fs::create_dir(root.join("locked")).unwrap();
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
        // xattrs of every namespace (a file capability: CAP_NET_RAW, effective), which
        // nobody cannot set on the host, and the host's getfattr to read them back.
        for (key, value, path) in [
            ("security.capability", "0x0100000200200000000000000000000000000000", "etc/owned"),
            ("trusted.vmhost", "0x7472", "etc/owned"),
            ("user.vmhost", "0x7573", "etc/owned"),
            ("trusted.dir", "0x6464", "locked"),
        ] {
            let st = Command::new("setfattr").args(["-n", key, "-v", value]).arg(root.join(path)).status();
            assert!(st.unwrap().success(), "setfattr {key} (apt-get install attr)");
        }
        copy_with_libraries("/usr/bin/getfattr", root);
    });
    // A later layer writes into the 0555 directory.
    l.layer(|root| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("locked/f"), b"inside\n").unwrap();
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
    });
    // Everything nobody needs: the layout, the cache (kernels, where the store goes).
    let st = Command::new("chmod").args(["-R", "a+rwX"]).arg(home.path()).status().unwrap();
    assert!(st.success());
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
        .arg(common::vmhost_bin())
        .args(["run", "--image"])
        .arg(&l.path)
        .args([
            "--",
            "sh",
            "-c",
            "stat -c '%u:%g %a' /etc/owned /etc/nobodys; stat -c '%F %t,%T' /etc/null2; stat -c %a /locked; \
             cat /locked/f; getfattr -d -m - -e hex /etc/owned /locked",
        ])
        .env("XDG_CACHE_HOME", &xdg)
        .env("HOME", home.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "1234:5678 640\n65534:65534 644\ncharacter special file 1,3\n555\ninside\n\
         # file: etc/owned\n\
         security.capability=0x0100000200200000000000000000000000000000\n\
         trusted.vmhost=0x7472\nuser.vmhost=0x7573\n\n\
         # file: locked\ntrusted.dir=0x6464\n\n",
        "{stderr}"
    );
}

/// Copies the host's `program` into `root` at the same path, with the shared libraries
/// `ldd` names (the guest is the same architecture).
fn copy_with_libraries(program: &str, root: &std::path::Path) {
    let out = Command::new("ldd").arg(program).output().unwrap();
    assert!(out.status.success(), "ldd {program}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let libs = text.split_whitespace().filter(|w| w.starts_with('/'));
    for path in std::iter::once(program).chain(libs) {
        let dest = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(path, &dest).unwrap();
    }
}

#[test]
fn a_writable_disk_takes_what_the_guests_memory_cannot() {
    let test = "a_writable_disk_takes_what_the_guests_memory_cannot";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    let home = TempDir::new("imgdisk");
    let (xdg, l) = busybox_image(&home);
    let layout = l.path.display().to_string();
    // 200 MB into the image's root: more than the overlay's tmpfs holds in a 256 MiB
    // guest (half its memory), well within a 512 MiB disk.
    let write = "dd if=/dev/zero of=/big bs=1M count=200 2>&1 && ls -l /big | awk '{print $5}'";
    let (code, out, _) = run(&xdg, &["--image", &layout, "--memory", "256", "--", "sh", "-c", write]);
    assert_ne!(code, Some(0), "the memory alone cannot: {out}");
    assert!(out.contains("No space left on device"), "{out}");
    let (code, out, err) =
        run(&xdg, &["--image", &layout, "--memory", "256", "--disk", "512M", "--", "sh", "-c", write]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.ends_with("209715200\n"), "{out}");
    // A plain root has no overlay to give a disk to: said before anything boots.
    let (code, _, err) = run(&xdg, &["--disk", "64M", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("container images"), "{err}");
}
