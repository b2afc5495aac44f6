//! Images and resources a guest cannot have are refused before anything boots, with what
//! the limit is and what to do: an archive or directory that expands past what the
//! guest's memory can unpack (a compression bomb, many files, a huge sparse file), sparse
//! archive members, memory and vCPU counts out of range, and a QEMU that refuses to
//! start says why in its own words. Nothing of a refused image stays in the cache.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{vm_ready, vmhost_bin, TempDir};

/// `vmhost run ARGS -- true` with its own cache under `home`: exit code and stderr.
fn run(home: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(vmhost_bin())
        .arg("run")
        .args(args)
        .args(["--", "true"])
        .env("XDG_CACHE_HOME", home.join("cache"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sh(script: &str, dir: &Path) {
    let st = Command::new("sh").arg("-c").arg(script).current_dir(dir).status().unwrap();
    assert!(st.success(), "{script}");
}

/// What the cache's initramfs directory holds: nothing of a refused image.
fn initramfs_files(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("cache/vmhost/initramfs"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn archives_and_directories_that_expand_past_the_guests_memory_are_refused_while_read() {
    if !vm_ready("archives_and_directories_that_expand_past_the_guests_memory_are_refused_while_read") {
        return;
    }
    let home = TempDir::new("bomb");
    common::private_cache(home.path());
    let work = home.join("work");
    std::fs::create_dir(&work).unwrap();
    // One member that claims 512 MiB (of zeros: 500 KB compressed), refused at its header.
    sh("truncate -s 512M zeros && tar -czf one.tar.gz zeros && rm zeros", &work);
    // 200 members of 1 MiB beside the default root: refused once the sum passes the bound.
    let default_root = vmhost::image::rootfs::busybox_root(
        &vmhost::image::cache_dir(),
        &vmhost::progress::Progress::quiet(),
    )
    .unwrap();
    let default_root = default_root.display();
    sh(
        &format!(
            "cp -a {default_root} base && mkdir base/many \
             && for i in $(seq 200); do truncate -s 1M base/many/f$i; done && tar -czf many.tar.gz -C base ."
        ),
        &work,
    );
    // A directory image with a 1 GiB sparse file (4 KiB on disk).
    let dir_image = work.join("root");
    sh(&format!("cp -a {default_root} root && truncate -s 1G root/huge"), &work);
    for (image, names) in [("one.tar.gz", "zeros"), ("many.tar.gz", "many/f"), ("root", "huge")] {
        let (code, err) = run(home.path(), &["--image", &work.join(image).display().to_string()], &[]);
        assert_eq!(code, Some(125), "{image}: {err}");
        // 256 MiB, the default, leaves (256 - 64) / 2 for the image.
        assert!(err.contains("the image grows past 96 MiB here"), "{image}: {err}");
        assert!(err.contains(names) && err.contains("--memory"), "{image}: {err}");
        // Nothing was kept, neither the archive so far nor a temporary file.
        assert_eq!(initramfs_files(home.path()), Vec::<String>::new(), "{image}");
    }
    // The bound follows the memory, and VMHOST_IMAGE_MAX_MB overrides it.
    let (code, err) =
        run(home.path(), &["--memory", "200", "--image", &dir_image.display().to_string()], &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("the image grows past 68 MiB here"), "{err}");
    let many = work.join("many.tar.gz").display().to_string();
    let (code, err) = run(home.path(), &["--image", &many], &[("VMHOST_IMAGE_MAX_MB", "20")]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("grows past 20 MiB") && err.contains("VMHOST_IMAGE_MAX_MB is 20"), "{err}");
    // Within the bound the same archive boots (200 MiB of files in a 1 GiB guest).
    let (code, err) = run(home.path(), &["--memory", "1024", "--image", &many], &[]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn sparse_archive_members_are_refused_not_dropped() {
    if !vm_ready("sparse_archive_members_are_refused_not_dropped") {
        return;
    }
    let home = TempDir::new("sparse");
    common::private_cache(home.path());
    let work = home.join("work");
    std::fs::create_dir(&work).unwrap();
    sh("truncate -s 8M holes && echo data >> holes", &work);
    for format in ["gnu", "pax"] {
        let tar = format!("sparse-{format}.tar");
        sh(&format!("tar --sparse --format={format} -cf {tar} holes"), &work);
        let (code, err) = run(home.path(), &["--image", &work.join(&tar).display().to_string()], &[]);
        assert_eq!(code, Some(125), "{format}: {err}");
        assert!(err.contains("is a sparse file") && err.contains("without --sparse"), "{format}: {err}");
        assert_eq!(initramfs_files(home.path()), Vec::<String>::new(), "{format}");
    }
}

#[test]
fn memory_vcpus_and_qemus_own_refusals_are_said_before_or_at_launch() {
    if !vm_ready("memory_vcpus_and_qemus_own_refusals_are_said_before_or_at_launch") {
        return;
    }
    let home = TempDir::new("limits");
    common::private_cache(home.path());
    for (args, said) in [
        (&["--memory", "1"][..], "memory: 1 MiB is less than the 96 MiB a guest needs"),
        (&["--memory", "1099511627776"][..], "MiB is more than this host's"),
        (&["--cpus", "1000"][..], "vCPUs: 1000: a guest has 1 to 255"),
        (&["--cpus", "-1"][..], "vCPUs: -1: a guest has 1 to 255"),
    ] {
        let (code, err) = run(home.path(), args, &[]);
        assert_eq!(code, Some(125), "{args:?}: {err}");
        assert!(err.contains(said), "{args:?}: {err}");
        // Refused before the image was even prepared.
        assert_eq!(initramfs_files(home.path()), Vec::<String>::new(), "{args:?}");
    }
    // What only QEMU knows it refuses in its own words.
    let (code, err) = run(home.path(), &["--backend", "qemu"], &[("VMHOST_CPU", "no-such-cpu")]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("QEMU refused to start the VM") && err.contains("no-such-cpu"), "{err}");
    assert!(err.contains("hypervisor unavailable (6)"), "{err}");
}
