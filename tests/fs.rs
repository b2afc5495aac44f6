//! The guest filesystem against a real guest: every Fs* and File* message, through the
//! real helper process (so every request crosses the wire), plus the library's std::fs
//! mirror on top of them.
//!
//! One guest serves every test here (boots are slow under TCG); each test works in a
//! directory of its own.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, UNIX_EPOCH};

use common::{noise, shared_guest};
use vmhost::wire::{ErrorCode, FileMode, Request, Response};
use vmhost::{Error, Instance};

fn sh(vm: &Instance, script: &str) -> String {
    let out = vm.command("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn remote_code(e: &Error) -> ErrorCode {
    match e {
        Error::Remote(ef) => ef.code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn path_operations_mirror_std_fs() {
    let Some(vm) = shared_guest("path_operations_mirror_std_fs") else { return };
    let fs = vm.fs();
    let d = "/tmp/paths";
    fs.create_dir_all(format!("{d}/a/b/c")).unwrap();
    fs.create_dir_all(format!("{d}/a/b/c")).unwrap(); // existing: fine
    assert!(fs.metadata(format!("{d}/a/b/c")).unwrap().is_dir());
    fs.create_dir(format!("{d}/single")).unwrap();
    let e = fs.create_dir(format!("{d}/single")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");

    fs.write(format!("{d}/hello.txt"), b"hello\n").unwrap();
    assert_eq!(fs.read(format!("{d}/hello.txt")).unwrap(), b"hello\n");
    assert_eq!(fs.read_to_string(format!("{d}/hello.txt")).unwrap(), "hello\n");
    assert_eq!(sh(vm, &format!("cat {d}/hello.txt")), "hello\n", "the guest sees what we wrote");
    let m = fs.metadata(format!("{d}/hello.txt")).unwrap();
    assert_eq!((m.len(), m.is_file(), m.is_dir(), m.name()), (6, true, false, "hello.txt"));

    // Symlinks: metadata follows them, symlink_metadata does not.
    fs.symlink("hello.txt", format!("{d}/link")).unwrap();
    assert_eq!(fs.read_link(format!("{d}/link")).unwrap().to_str(), Some("hello.txt"));
    let followed = fs.metadata(format!("{d}/link")).unwrap();
    assert!(followed.is_file() && !followed.is_symlink() && followed.len() == 6);
    let own = fs.symlink_metadata(format!("{d}/link")).unwrap();
    assert!(own.is_symlink() && !own.is_file());
    assert_ne!(own.file_mode().0 & FileMode::SYMLINK, 0, "Go symlink bit");

    // Permissions and ownership, seen by Stat and by the guest.
    fs.set_permissions(format!("{d}/hello.txt"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    let m = fs.metadata(format!("{d}/hello.txt")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o4751);
    assert_eq!(m.file_mode().0 & (FileMode::PERM | FileMode::SETUID), 0o751 | FileMode::SETUID);
    fs.chown(format!("{d}/hello.txt"), Some(65534), Some(65534)).unwrap();
    assert_eq!(sh(vm, &format!("stat -c %u:%g {d}/hello.txt")), "65534:65534\n");
    fs.chown(format!("{d}/hello.txt"), None, Some(0)).unwrap();
    assert_eq!(sh(vm, &format!("stat -c %u:%g {d}/hello.txt")), "65534:0\n", "None leaves the uid");

    // Times.
    let t = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs.set_times(format!("{d}/hello.txt"), t, t).unwrap();
    assert_eq!(fs.metadata(format!("{d}/hello.txt")).unwrap().modified(), t);
    assert_eq!(sh(vm, &format!("stat -c %X:%Y {d}/hello.txt")), "1000000000:1000000000\n");

    // Listing with names, kinds and modes, sorted.
    fs.write(format!("{d}/a/f1"), b"1").unwrap();
    fs.set_permissions(format!("{d}/a/f1"), std::fs::Permissions::from_mode(0o600)).unwrap();
    fs.symlink("/nowhere", format!("{d}/a/dangling")).unwrap();
    let list: Vec<_> = fs.read_dir(format!("{d}/a")).unwrap().map(Result::unwrap).collect();
    let names: Vec<&str> = list.iter().map(|e| e.file_name()).collect();
    assert_eq!(names, ["b", "dangling", "f1"]);
    assert!(list[0].is_dir() && list[0].file_mode().is_dir());
    assert!(list[1].is_symlink() && !list[1].is_dir());
    assert!(list[2].is_file());
    assert_eq!(list[2].file_mode().perm(), 0o600);
    assert_eq!(list[2].path(), std::path::Path::new("/tmp/paths/a/f1"));

    // Rename, then removal of each kind.
    fs.rename(format!("{d}/hello.txt"), format!("{d}/renamed.txt")).unwrap();
    assert!(!fs.exists(format!("{d}/hello.txt")).unwrap());
    assert!(fs.exists(format!("{d}/renamed.txt")).unwrap());
    let e = fs.remove_file(format!("{d}/single")).unwrap_err();
    assert!(e.to_string().contains("Is a directory"), "{e}");
    fs.remove_dir(format!("{d}/single")).unwrap();
    let e = fs.remove_dir(format!("{d}/a")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::DirectoryNotEmpty, "{e}");
    fs.remove_file(format!("{d}/link")).unwrap();
    assert!(fs.exists(format!("{d}/renamed.txt")).unwrap(), "removing a link keeps its target");
    fs.remove_dir_all(d).unwrap();
    assert!(!fs.exists(d).unwrap());
    assert_eq!(sh(vm, &format!("ls {d} 2>/dev/null || echo gone")), "gone\n");
}

#[test]
fn file_handles_read_write_seek_at_both_ends() {
    let Some(vm) = shared_guest("file_handles_read_write_seek_at_both_ends") else { return };
    let fs = vm.fs();
    fs.create_dir_all("/tmp/handles").unwrap();
    let p = "/tmp/handles/f";
    let mut f = fs.create(p).unwrap();
    assert_eq!(f.name(), p);
    f.write_all(b"0123456789").unwrap();
    assert_eq!(f.stream_position().unwrap(), 10);
    assert_eq!(f.seek(SeekFrom::Start(0)).unwrap(), 0);
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "0123456789");
    assert_eq!(f.read(&mut [0u8; 4]).unwrap(), 0, "EOF at the end");
    assert_eq!(f.seek(SeekFrom::End(-3)).unwrap(), 7);
    let mut buf = [0u8; 3];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"789");
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 10);
    f.write_all(b"ab").unwrap();
    assert!(f.seek(SeekFrom::Current(-100)).is_err(), "before the start");
    f.set_len(4).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.len(), m.name()), (4, "f"));
    f.sync_all().unwrap();
    f.close().unwrap();
    assert_eq!(fs.read(p).unwrap(), b"0123");

    // OpenOptions: append, create_new, read-only.
    let mut a = fs.options().append(true).open(p).unwrap();
    a.write_all(b"XY").unwrap();
    drop(a);
    assert_eq!(fs.read(p).unwrap(), b"0123XY");
    let e = fs.options().write(true).create_new(true).open(p).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    let mut n = fs.options().write(true).create_new(true).mode(0o640).open("/tmp/handles/new").unwrap();
    n.write_all(b"new").unwrap();
    n.close().unwrap();
    assert_eq!(fs.metadata("/tmp/handles/new").unwrap().permissions().mode() & 0o777, 0o640);
    let mut r = fs.open(p).unwrap();
    assert!(r.write_all(b"no").is_err(), "opened read-only");
    assert!(fs.options().truncate(true).open(p).is_err(), "truncate without write is refused");

    // FileName and the raw messages' answers.
    let h = fs.open(p).unwrap();
    let name = vm.answer(&Request::FileName { handle: h.handle() }).unwrap();
    assert_eq!(name, Response::FileName { name: p.into() });
}

#[test]
fn sixty_four_mib_round_trip_is_byte_identical() {
    let Some(vm) = shared_guest("sixty_four_mib_round_trip_is_byte_identical") else { return };
    let fs = vm.fs();
    let data = noise(64 << 20, 0x9E37_79B9_7F4A_7C15);
    fs.write("/tmp/big", &data).unwrap();
    assert_eq!(fs.metadata("/tmp/big").unwrap().len(), 64 << 20);
    let back = fs.read("/tmp/big").unwrap();
    assert!(back == data, "64 MiB read back differs (len {})", back.len());
    // Through a handle too: the last bytes after a seek from the end.
    let mut f = fs.open("/tmp/big").unwrap();
    f.seek(SeekFrom::End(-5)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, data[data.len() - 5..]);
    assert_eq!(sh(vm, "stat -c %s /tmp/big"), "67108864\n", "the guest sees the whole file");
    fs.remove_file("/tmp/big").unwrap();
}

#[test]
fn sixteen_threads_do_file_io_at_once() {
    let Some(vm) = shared_guest("sixteen_threads_do_file_io_at_once") else { return };
    let fs = vm.fs();
    fs.create_dir_all("/tmp/threads").unwrap();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            s.spawn(move || {
                let fs = vm.fs();
                let p = format!("/tmp/threads/{t}");
                for round in 0..5u64 {
                    let data = noise(10_000 + (t * 997 + round * 31) as usize, t * 100 + round + 1);
                    let mut f = fs.create(&p).unwrap();
                    f.write_all(&data).unwrap();
                    f.seek(SeekFrom::Start(0)).unwrap();
                    let mut back = Vec::new();
                    f.read_to_end(&mut back).unwrap();
                    assert!(back == data, "thread {t} round {round}");
                    f.close().unwrap();
                    assert_eq!(fs.metadata(&p).unwrap().len(), data.len() as u64);
                }
            });
        }
    });
    let names: Vec<_> =
        fs.read_dir("/tmp/threads").unwrap().map(|e| e.unwrap().file_name().to_string()).collect();
    assert_eq!(names.len(), 16);
}

#[test]
fn bad_paths_and_handles_are_clear_errors() {
    let Some(vm) = shared_guest("bad_paths_and_handles_are_clear_errors") else { return };
    let fs = vm.fs();
    // A missing file: IO, with the path, NotFound for std.
    let e = fs.read("/no/such/file").unwrap_err();
    match &e {
        Error::Remote(ef) => {
            assert_eq!(ef.code, ErrorCode::Io);
            assert_eq!(ef.path, "/no/such/file");
            assert_eq!(ef.op, "FsReadFile");
            assert!(ef.message.contains("No such file"), "{ef}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    for req in [
        Request::FsStat { path: "/no/such".into() },
        Request::FsOpen { path: "/no/such".into() },
        Request::FsReadDir { path: "/no/such".into() },
        Request::FsReadlink { path: "/etc/passwd".into() }, // not a link: EINVAL
        Request::FsRemove { path: "/no/such".into() },
        Request::FsRename { from: "/no/such".into(), to: "/tmp/x".into() },
        Request::FsChmod { path: "/no/such".into(), mode: FileMode(0o644) },
        Request::FsChown { path: "/no/such".into(), uid: 0, gid: 0 },
        Request::FsChtimes { path: "/no/such".into(), atime: 0, mtime: 0 },
        Request::FsMkdir { path: "/no/such/dir".into(), perm: FileMode(0o755) },
    ] {
        let e = vm.answer(&req).unwrap_err();
        assert_eq!(remote_code(&e), ErrorCode::Io, "{} -> {e}", req.name());
    }
    // FsRemoveAll of a missing path is no error (Go's os.RemoveAll).
    vm.answer(&Request::FsRemoveAll { path: "/no/such".into() }).unwrap();

    // A handle never given: InvalidHandle. One closed: AlreadyClosed.
    let e = vm.answer(&Request::FileRead { handle: 987_654, max: 10 }).unwrap_err();
    assert_eq!(remote_code(&e), ErrorCode::InvalidHandle, "{e}");
    let f = fs.open("/etc/passwd").unwrap();
    let h = f.handle();
    f.close().unwrap();
    for req in [
        Request::FileRead { handle: h, max: 10 },
        Request::FileWrite { handle: h, data: b"x".to_vec() },
        Request::FileSeek { handle: h, offset: 0, whence: 0 },
        Request::FileStat { handle: h },
        Request::FileClose { handle: h },
    ] {
        let e = vm.answer(&req).unwrap_err();
        assert_eq!(remote_code(&e), ErrorCode::AlreadyClosed, "{} -> {e}", req.name());
    }
    // Bad arguments: whence, negative size, the whole root.
    let g = fs.open("/etc/passwd").unwrap();
    let e = vm.answer(&Request::FileSeek { handle: g.handle(), offset: 0, whence: 7 }).unwrap_err();
    assert_eq!(remote_code(&e), ErrorCode::InvalidArgument, "{e}");
    let e = vm.answer(&Request::FileTruncate { handle: g.handle(), size: -1 }).unwrap_err();
    assert_eq!(remote_code(&e), ErrorCode::InvalidArgument, "{e}");
    for root in ["/", "/tmp/..", "tmp/../", "..", "/tmp/x/.."] {
        let e = vm.answer(&Request::FsRemoveAll { path: root.into() }).unwrap_err();
        assert_eq!(remote_code(&e), ErrorCode::InvalidArgument, "{root}: {e}");
    }
    assert!(fs.exists("/etc/passwd").unwrap());
    // After all that, the guest and the helper still work.
    assert_eq!(fs.read_to_string("/etc/hostname").unwrap(), "vmhost\n");
    assert_eq!(sh(vm, "echo ok"), "ok\n");
}

#[test]
fn a_blocked_fifo_open_does_not_stall_other_requests() {
    let Some(vm) = shared_guest("a_blocked_fifo_open_does_not_stall_other_requests") else { return };
    let fs = vm.fs();
    assert_eq!(sh(vm, "rm -f /tmp/fifo; mkfifo /tmp/fifo; echo made"), "made\n");
    std::thread::scope(|s| {
        // Opening a FIFO for reading blocks until a writer comes.
        let reader = s.spawn(|| {
            let mut f = vm.fs().open("/tmp/fifo").unwrap();
            let mut got = String::new();
            f.read_to_string(&mut got).unwrap();
            got
        });
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..5 {
            assert!(fs.metadata("/etc/passwd").unwrap().is_file());
            fs.write("/tmp/side", b"x").unwrap();
        }
        assert_eq!(sh(vm, "echo through > /tmp/fifo; echo wrote"), "wrote\n");
        assert_eq!(reader.join().unwrap(), "through\n");
    });
}
