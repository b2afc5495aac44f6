//! Filesystem snapshots on real guests: an image (the busybox root made into an OCI
//! layout with umoci, plus a layer with files to change and delete) booted, changed in
//! every way a root can change, snapshotted, and the snapshot booted again; keys
//! reproduced by a second guest doing the same and changed by a different mode; a
//! chain of three; excludes; the handle messages through the real helper process.

mod common;

use std::path::Path;

use common::registry::{busybox_layout, tools_ready, Layout};
use common::{vm_ready, TempDir};
use vmhost::{Image, Instance, InstanceOptions, Snapshot, SnapshotOptions};

/// The busybox image with a layer to change: /data/keep, /data/gone, /opaque/old; an
/// environment, a working directory and an entrypoint that snapshots keep.
fn image(home: &TempDir) -> Layout {
    let l = busybox_layout(home);
    l.layer(|root| {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/keep"), b"original\n").unwrap();
        std::fs::write(root.join("data/gone"), b"to delete\n").unwrap();
        std::fs::create_dir_all(root.join("opaque/sub")).unwrap();
        std::fs::write(root.join("opaque/old"), b"old\n").unwrap();
    });
    l.config(&[
        "--config.env=SNAP_ENV=from-the-image",
        "--config.workingdir=/data",
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=-c",
        "--config.cmd=echo \"$SNAP_ENV in $(pwd)\"",
    ]);
    l
}

fn sh(vm: &Instance, script: &str) -> String {
    let out = vm.command("sh").arg("-c").arg(script).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script}\nstdout: {stdout}\nstderr: {stderr}");
    stdout.into_owned()
}

/// Every kind of change, with `mode` for /data/keep.
fn change(mode: &str) -> String {
    format!(
        "set -e
         echo new > /data/new
         echo changed > /data/keep && chmod {mode} /data/keep
         chown 1000:2000 /data/new
         rm /data/gone
         rm -rf /opaque && mkdir /opaque && echo fresh > /opaque/fresh
         ln -s /data/new /data/link
         ln /data/new /data/hard
         mkfifo /data/fifo
         mkdir -p /var/cache/junk && echo x > /var/cache/junk/file
         echo tmp > /tmp/not-captured"
    )
}

fn boot(image: Image) -> Instance {
    Instance::new(image, InstanceOptions::default()).unwrap()
}

fn snapshot(vm: &Instance) -> Snapshot {
    vm.snapshot(&SnapshotOptions { excludes: vec!["/var/cache".into()], cache_dir: None }).unwrap()
}

#[test]
fn every_kind_of_change_survives_a_snapshot_and_keys_are_reproducible() {
    let test = "every_kind_of_change_survives_a_snapshot_and_keys_are_reproducible";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    let home = TempDir::new("snapshot");
    let l = image(&home);
    let from = || Image::Dir(l.path.clone());
    let vm = boot(from());
    // A name that would mean a deletion in a layer is refused, and nothing is stored.
    sh(&vm, "touch /data/.wh.keep");
    let e = vm.snapshot(&SnapshotOptions::default()).unwrap_err().to_string();
    assert!(e.contains(".wh.") && e.contains("rename it"), "{e}");
    sh(&vm, "rm /data/.wh.keep");
    sh(&vm, &change("600"));
    let snap = snapshot(&vm);
    // A command writing all along: paused for the next snapshot (whole lines only),
    // going on after it.
    let writer = vm
        .command("sh")
        .arg("-c")
        // Two files in lockstep: a snapshot of a paused guest has them at most one
        // step apart (z written after a); a walk that ran beside the writer would read
        // z after the 24 MB between them in the walk's order, many steps on.
        .arg(
            "dd if=/dev/zero of=/data/m-bulk bs=1M count=24 2>/dev/null; i=0; \
             while :; do i=$((i+1)); echo $i > /data/a; echo $i > /data/z; echo 0123456789abcdef >> /data/log; done",
        )
        .spawn()
        .unwrap();
    assert!(common::wait_until(std::time::Duration::from_secs(60), || {
        sh(&vm, "cat /data/z 2>/dev/null || echo 0").trim().parse::<u64>().unwrap_or(0) > 20
    }));
    let busy = snapshot(&vm);
    assert_eq!(busy.parent().unwrap().unwrap().cache_key(), snap.parent().unwrap().unwrap().cache_key());
    let size = || sh(&vm, "stat -c %s /data/log").trim().parse::<u64>().unwrap();
    let before = size();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(size() > before, "the writer goes on after the snapshot");
    drop(writer);
    vm.close().unwrap();
    assert_eq!(snap.cache_key().len(), 32);
    // Its parent is the image; past the image, none.
    let parent = snap.parent().unwrap().expect("the image");
    assert!(parent.parent().unwrap().is_none());

    let again = boot(busy.image());
    let seen = sh(
        &again,
        "cat /data/new /data/keep
         stat -c '%n %a %u:%g' /data/keep /data/new
         test ! -e /data/gone && echo gone stays gone
         ls -A /opaque
         readlink /data/link
         [ \"$(stat -c %i /data/new)\" = \"$(stat -c %i /data/hard)\" ] && echo one file
         test -p /data/fifo && echo fifo
         test -d /var/cache && echo var-cache-dir
         test ! -e /var/cache/junk && echo excluded
         test ! -e /tmp/not-captured && echo tmp not captured
         grep -vc '^0123456789abcdef$' /data/log; test -s /data/log && echo log kept
         a=$(cat /data/a); b=$(cat /data/z)
         # One instant: a write may be cut between its truncation and its data (empty),
         # else b is a or the step before it.
         if [ -z \"$a\" ] || [ -z \"$b\" ]; then [ -n \"$a$b\" ] && echo in step
         elif [ \"$b\" = \"$a\" ] || [ $((b + 1)) = \"$a\" ]; then echo in step; else echo \"a=$a b=$b\"; fi",
    );
    assert_eq!(
        seen,
        "new\nchanged\n/data/keep 600 0:0\n/data/new 644 1000:2000\ngone stays gone\nfresh\n/data/new\n\
         one file\nfifo\nexcluded\ntmp not captured\n0\nlog kept\nin step\n",
        "an opaque directory stays opaque, a deleted file deleted"
    );

    // The same steps on another guest: the same key. Another mode: another key.
    let twin = boot(from());
    sh(&twin, &change("600"));
    assert_eq!(snapshot(&twin).cache_key(), snap.cache_key());
    sh(&twin, "chmod 640 /data/keep");
    let other = snapshot(&twin);
    twin.close().unwrap();
    assert_ne!(other.cache_key(), snap.cache_key());
    assert_eq!(other.parent().unwrap().unwrap().cache_key(), parent.cache_key());

    // A chain of three: snapshots of the booted snapshot.
    sh(&again, "echo two > /data/two && rm /data/new");
    let two = snapshot(&again);
    again.close().unwrap();
    assert_eq!(two.parent().unwrap().unwrap().cache_key(), busy.cache_key());
    let vm = boot(two.image());
    sh(&vm, "echo three > /data/three");
    let three = snapshot(&vm);
    vm.close().unwrap();
    let vm = boot(three.image());
    let seen = sh(
        &vm,
        "cat /data/two /data/three /data/keep; test ! -e /data/new && echo new is gone; cat /data/hard",
    );
    assert_eq!(seen, "two\nthree\nchanged\nnew is gone\nnew\n");
    // Committed under a name, it boots by that name.
    let name = three.commit("snapshot-test:three").unwrap();
    assert_eq!(name, "docker.io/library/snapshot-test:three");
    // Exported as an OCI layout, a real tool reads it: umoci applies the layers, the
    // whiteouts and the opaque directory as vmhost did.
    let layout = home.join("exported");
    let out = std::process::Command::new(common::vmhost_bin())
        .args(["image", "export", "snapshot-test:three"])
        .arg(&layout)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle = home.join("bundle");
    let rootless: &[&str] = if nix::unistd::geteuid().is_root() { &[] } else { &["--rootless"] };
    let st = std::process::Command::new("umoci")
        .arg("unpack")
        .args(rootless)
        .arg("--image")
        .arg(format!("{}:three", layout.display()))
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(st.success(), "umoci unpack of the exported snapshot");
    let root = bundle.join("rootfs");
    assert_eq!(std::fs::read_to_string(root.join("data/three")).unwrap(), "three\n");
    assert!(!root.join("data/new").exists() && !root.join("data/gone").exists(), "whiteouts applied");
    let opaque: Vec<_> =
        std::fs::read_dir(root.join("opaque")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(opaque, ["fresh"], "the opaque directory");
    vm.close().unwrap();
    let vm = boot(Image::Ref("snapshot-test:three".into()));
    assert_eq!(sh(&vm, "cat /data/three"), "three\n");
    // The image's configuration came along the chain: its entrypoint, command,
    // environment and working directory.
    let out = vm.entrypoint().output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-the-image in /data\n");
    // Booted by its name it is still that snapshot: the chain goes on from it, into
    // another cache too (the chain carried over).
    sh(&vm, "echo four > /data/four");
    let other_cache = home.join("other-cache");
    let four =
        vm.snapshot(&SnapshotOptions { excludes: vec![], cache_dir: Some(other_cache.clone()) }).unwrap();
    vm.close().unwrap();
    assert_eq!(four.parent().unwrap().unwrap().cache_key(), three.cache_key());
    assert!(four.path().starts_with(std::fs::canonicalize(&other_cache).unwrap()));
    let vm = boot(four.image());
    assert_eq!(sh(&vm, "cat /data/three /data/four"), "three\nfour\n");
    sh(&vm, "echo five > /data/five");
    let five = snapshot(&vm);
    vm.close().unwrap();
    assert_eq!(five.parent().unwrap().unwrap().cache_key(), four.cache_key());
    let chain: Vec<String> = std::iter::successors(Some(three.clone()), |s| s.parent().unwrap())
        .map(|s| s.cache_key().to_string())
        .collect();
    assert_eq!(chain.len(), 4, "three snapshots and the image: {chain:?}");
    assert!(Path::new(&three.path()).is_file());
}

/// InstanceNew through the helper client `c`, encoded as the protocol says.
fn instance_new(
    c: &vmhost::client::Client,
    source_type: vmhost::wire::SourceType,
    path: &str,
    cache_dir: &str,
    options: InstanceOptions,
) {
    use vmhost::wire::Wire;
    let new = vmhost::wire::InstanceNew {
        source_type,
        source_path: path.into(),
        image_ref: String::new(),
        cache_dir: cache_dir.into(),
        options,
    };
    c.call_with(vmhost::wire::msg::INSTANCE_NEW, |e| new.encode(e)).unwrap();
}

/// The handle messages through the real helper process, encoded by hand as the protocol
/// document says: FsSnapshot, SnapshotCacheKey, SnapshotParent (to the image, then 0),
/// SnapshotAsSource, handles valid after InstanceClose, SnapshotClose; and the source
/// AsSource gave booted by InstanceNew (type 3) in a second helper process.
#[test]
fn snapshots_over_the_helper_protocol_boot_in_another_helper() {
    use vmhost::client::{spawn_helper, Client};
    use vmhost::wire::{msg, SourceType};
    let test = "snapshots_over_the_helper_protocol_boot_in_another_helper";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    std::env::set_var("VMHOST_HELPER_PATH", common::vmhost_bin());
    let home = TempDir::new("snaphelper");
    let l = image(&home);
    let boot = |c: &Client, source_type: SourceType, path: &str| {
        instance_new(c, source_type, path, "", InstanceOptions::default());
    };
    let run = |c: &Client, script: &str| -> (Vec<u8>, i32) {
        let h = c
            .call_with(msg::CMD_NEW, |e| {
                e.string("sh").string_list(&["-c", script]);
            })
            .unwrap()
            .decoder()
            .u64()
            .unwrap();
        let r = c.call_with(msg::CMD_OUTPUT, |e| {
            e.u64(h);
        });
        let r = r.unwrap();
        let mut d = r.decoder();
        (d.bytes().unwrap(), d.i32().unwrap())
    };
    let u64_of = |c: &Client, ty: u16, h: u64| {
        c.call_with(ty, |e| {
            e.u64(h);
        })
        .unwrap()
        .decoder()
        .u64()
        .unwrap()
    };
    let key_of = |c: &Client, h: u64| {
        c.call_with(msg::SNAPSHOT_CACHE_KEY, |e| {
            e.u64(h);
        })
        .unwrap()
        .decoder()
        .string()
        .unwrap()
    };

    let a = spawn_helper().unwrap();
    boot(&a, SourceType::Dir, &l.path.display().to_string());
    assert_eq!(run(&a, "echo over the wire > /wired && rm /data/gone"), (Vec::new(), 0));
    let snap = a
        .call_with(msg::FS_SNAPSHOT, |e| {
            e.string_list(&["/var/cache"]).string("");
        })
        .unwrap()
        .decoder()
        .u64()
        .unwrap();
    let key = key_of(&a, snap);
    assert!(vmhost::image::snapshot::is_key(&key), "{key}");
    let image = u64_of(&a, msg::SNAPSHOT_PARENT, snap);
    assert_ne!(image, 0);
    assert_ne!(key_of(&a, image), key);
    assert_eq!(u64_of(&a, msg::SNAPSHOT_PARENT, image), 0, "past the image: none");
    let r = a
        .call_with(msg::SNAPSHOT_AS_SOURCE, |e| {
            e.u64(snap);
        })
        .unwrap();
    let mut d = r.decoder();
    let (source_type, path) = (d.u8().unwrap(), d.string().unwrap());
    assert_eq!(source_type, 3);
    a.call(msg::INSTANCE_CLOSE, &[]).unwrap();
    // The helper's handles outlive its instance; a closed one is gone.
    assert_eq!(key_of(&a, snap), key);
    a.call_with(msg::SNAPSHOT_CLOSE, |e| {
        e.u64(image);
    })
    .unwrap();
    let e = a
        .call_with(msg::SNAPSHOT_CLOSE, |e| {
            e.u64(image);
        })
        .unwrap_err();
    assert!(e.to_string().contains("snapshot"), "{e}");
    // The same helper boots it, and so does another process.
    boot(&a, SourceType::Snapshot, &path);
    assert_eq!(run(&a, "cat /wired"), (b"over the wire\n".to_vec(), 0));
    a.close().unwrap();
    let b = spawn_helper().unwrap();
    boot(&b, SourceType::Snapshot, &path);
    assert_eq!(
        run(&b, "cat /wired; test -e /data/gone || echo gone"),
        (b"over the wire\ngone\n".to_vec(), 0)
    );
    b.call(msg::INSTANCE_CLOSE, &[]).unwrap();
    b.close().unwrap();
}

/// The default image (an initramfs root, not an image disk): its root is an overlay too,
/// recorded as a one-layer image at the first snapshot; the snapshot boots with the
/// change and the deletion, busybox's applets (hard links) whole.
#[test]
fn the_default_image_snapshots_and_boots_from_its_snapshot() {
    let test = "the_default_image_snapshots_and_boots_from_its_snapshot";
    if !vm_ready(test) {
        return;
    }
    let vm = boot(Image::Default);
    sh(
        &vm,
        "echo hello > /root/hello && rm /etc/hostname && mkdir -p /srv/app && echo v1 > /srv/app/version",
    );
    let snap = vm.snapshot(&SnapshotOptions::default()).unwrap();
    // Again with the same changes: the same key (the root is recorded once).
    assert_eq!(vm.snapshot(&SnapshotOptions::default()).unwrap().cache_key(), snap.cache_key());
    vm.close().unwrap();
    let root = snap.parent().unwrap().expect("the default root, as an image");
    assert!(root.parent().unwrap().is_none());
    let vm = boot(snap.image());
    let seen = sh(
        &vm,
        "cat /root/hello /srv/app/version; test ! -e /etc/hostname && echo no hostname
         [ \"$(stat -c %i /bin/busybox)\" = \"$(stat -c %i /bin/sh)\" ] && echo applets are links
         wget --help 2>&1 | grep -q -- '-T SEC' && echo wget has -T",
    );
    assert_eq!(seen, "hello\nv1\nno hostname\napplets are links\nwget has -T\n");
    vm.close().unwrap();

    // A directory root changed on the host after the guest booted from it is no base.
    let home = TempDir::new("snapdir");
    let root = home.join("root");
    let busybox = vmhost::image::rootfs::busybox_root(
        &vmhost::image::cache_dir(),
        &vmhost::progress::Progress::quiet(),
    )
    .unwrap();
    let st = std::process::Command::new("cp").arg("-a").arg(&busybox).arg(&root).status().unwrap();
    assert!(st.success());
    let vm = boot(Image::Dir(root.clone()));
    sh(&vm, "echo in-guest > /root/note");
    std::fs::write(root.join("host-edit"), b"changed on the host").unwrap();
    let e = vm.snapshot(&SnapshotOptions::default()).unwrap_err().to_string();
    assert!(e.contains("changed since the guest booted"), "{e}");
    vm.close().unwrap();
}

/// Every record in `cache` names an image the store holds whole: nothing half-stored is
/// ever trusted.
fn every_record_is_whole(cache: &Path) {
    let store = vmhost::image::store::Store::open(cache.join("images")).unwrap();
    let dir = vmhost::image::snapshot::records_dir(cache);
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let key = e.file_name().to_string_lossy().into_owned();
        if !vmhost::image::snapshot::is_key(&key) {
            continue;
        }
        let r = vmhost::image::snapshot::load(cache, &key).unwrap();
        // A prune (another test's) may have taken an image: then the record says so.
        if let Err(e) = vmhost::image::snapshot::image(&store, &r) {
            assert!(e.to_string().contains("pruned"), "{key}: {e}");
        }
    }
}

/// The helper killed (SIGKILL) while it stores a large snapshot: no record of it, the
/// guest's QEMU gone with the helper, and the next snapshot of the same image works.
#[test]
fn a_helper_killed_during_a_snapshot_leaves_nothing_trusted() {
    use vmhost::client::spawn_helper;
    use vmhost::wire::{msg, SourceType};
    let test = "a_helper_killed_during_a_snapshot_leaves_nothing_trusted";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    std::env::set_var("VMHOST_HELPER_PATH", common::vmhost_bin());
    let home = TempDir::new("snapkill");
    let l = image(&home);
    // A cache of its own: no other test's records or streams in the way.
    let cache = common::private_cache(home.path()).join("vmhost");
    let c = spawn_helper().unwrap();
    let helper = c.helper_pid().unwrap();
    let options = InstanceOptions { memory_mb: 512, ..Default::default() };
    instance_new(&c, SourceType::Dir, &l.path.display().to_string(), &cache.display().to_string(), options);
    let cmd = c
        .call_with(msg::CMD_NEW, |e| {
            e.string("sh").string_list(&["-c", "dd if=/dev/zero of=/big bs=1M count=120 2>/dev/null"]);
        })
        .unwrap()
        .decoder()
        .u64()
        .unwrap();
    c.call_with(msg::CMD_RUN, |e| {
        e.u64(cmd);
    })
    .unwrap();
    let records = vmhost::image::snapshot::records_dir(&cache);
    let before: std::collections::BTreeSet<_> =
        std::fs::read_dir(&records).unwrap().flatten().map(|e| e.file_name()).collect();
    let ingest = cache.join("images/ingest");
    let started = std::time::SystemTime::now();
    let growing = || {
        std::fs::read_dir(&ingest).unwrap().flatten().any(|e| {
            let m = e.metadata().unwrap();
            e.file_name().to_string_lossy().starts_with("stream-")
                && m.modified().unwrap() >= started
                && m.len() > 0
        })
    };
    let qemu = common::children_of(helper)
        .into_iter()
        .find(|(_, name)| name.contains("qemu"))
        .map(|(pid, _)| pid)
        .expect("the helper's QEMU");
    std::thread::scope(|s| {
        let snapshot = s.spawn(|| {
            c.call_with(msg::FS_SNAPSHOT, |e| {
                e.string_list::<&str>(&[]).string("");
            })
        });
        assert!(common::wait_until(std::time::Duration::from_secs(60), growing), "the layer never started");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper as i32), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        assert!(snapshot.join().unwrap().is_err(), "the call fails with its helper");
    });
    let after: std::collections::BTreeSet<_> =
        std::fs::read_dir(&records).unwrap().flatten().map(|e| e.file_name()).collect();
    let new_records: Vec<_> =
        after.difference(&before).filter(|n| !n.to_string_lossy().starts_with('.')).collect();
    // The image's own record may be new (made at boot); a snapshot's may not.
    for n in &new_records {
        let r = vmhost::image::snapshot::load(&cache, &n.to_string_lossy()).unwrap();
        assert!(r.parent.is_none(), "a snapshot was recorded by a killed helper: {r:?}");
    }
    every_record_is_whole(&cache);
    // What the killed helper left half-written goes at the next prune.
    let store = vmhost::image::store::Store::open(cache.join("images")).unwrap();
    vmhost::image::prune::prune(&store, &cache).unwrap();
    assert!(!growing(), "a stream outlived the prune");
    let left = std::fs::read_dir(&ingest)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stream-"))
        .count();
    assert_eq!(left, 0);
    // The guest went with its helper.
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || !common::alive(qemu)),
        "QEMU (pid {qemu}) outlived its helper"
    );
    // And the next snapshot of that image works.
    let vm = boot(Image::Dir(l.path.clone()));
    sh(&vm, "echo after > /after");
    let snap = vm.snapshot(&SnapshotOptions::default()).unwrap();
    vm.close().unwrap();
    let vm = boot(snap.image());
    assert_eq!(sh(&vm, "cat /after"), "after\n");
    vm.close().unwrap();
}

/// A guest whose writable layer is full (tmpfs, half its memory): the snapshot needs no
/// room in the guest, and the full file comes back whole.
#[test]
fn a_full_guest_disk_still_snapshots() {
    let test = "a_full_guest_disk_still_snapshots";
    if !vm_ready(test) || !tools_ready(test) {
        return;
    }
    let home = TempDir::new("snapfull");
    let l = image(&home);
    let vm =
        Instance::new(Image::Dir(l.path.clone()), InstanceOptions { memory_mb: 160, ..Default::default() })
            .unwrap();
    let out = vm
        .command("sh")
        .arg("-c")
        .arg("dd if=/dev/zero of=/fill bs=1M 2>&1; stat -c %s /fill")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("No space left on device"), "{text}");
    let size: u64 = text.lines().last().unwrap().trim().parse().unwrap();
    assert!(size > 16 << 20, "{text}");
    let e = vm.command("sh").arg("-c").arg("echo x > /one-more").output().unwrap();
    assert!(!e.status.success(), "the disk is full");
    let snap = vm.snapshot(&SnapshotOptions::default()).unwrap();
    vm.close().unwrap();
    let vm = boot(snap.image());
    assert_eq!(sh(&vm, "stat -c %s /fill").trim(), size.to_string());
    vm.close().unwrap();
}
