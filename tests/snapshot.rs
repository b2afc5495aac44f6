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

/// The busybox image with a layer to change: /data/keep, /data/gone, /opaque/old.
fn image(home: &TempDir) -> Layout {
    let l = busybox_layout(home);
    l.layer(|root| {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/keep"), b"original\n").unwrap();
        std::fs::write(root.join("data/gone"), b"to delete\n").unwrap();
        std::fs::create_dir_all(root.join("opaque/sub")).unwrap();
        std::fs::write(root.join("opaque/old"), b"old\n").unwrap();
    });
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
    sh(&vm, &change("600"));
    let snap = snapshot(&vm);
    vm.close().unwrap();
    assert_eq!(snap.cache_key().len(), 32);
    // Its parent is the image; past the image, none.
    let parent = snap.parent().unwrap().expect("the image");
    assert!(parent.parent().unwrap().is_none());

    let again = boot(snap.image());
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
         test ! -e /tmp/not-captured && echo tmp not captured",
    );
    assert_eq!(
        seen,
        "new\nchanged\n/data/keep 600 0:0\n/data/new 644 1000:2000\ngone stays gone\nfresh\n/data/new\n\
         one file\nfifo\nexcluded\ntmp not captured\n",
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
    assert_eq!(two.parent().unwrap().unwrap().cache_key(), snap.cache_key());
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
    vm.close().unwrap();
    let vm = boot(Image::Ref("snapshot-test:three".into()));
    assert_eq!(sh(&vm, "cat /data/three"), "three\n");
    vm.close().unwrap();
    let chain: Vec<String> = std::iter::successors(Some(three.clone()), |s| s.parent().unwrap())
        .map(|s| s.cache_key().to_string())
        .collect();
    assert_eq!(chain.len(), 4, "three snapshots and the image: {chain:?}");
    assert!(Path::new(&three.path()).is_file());
}
