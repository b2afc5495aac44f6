//! Guest file throughput and small-file operations, through the real helper process:
//! - 64 MiB written to a guest file (`Fs::write`), then read back (`Fs::read`), against
//!   a local `cat` of the same 64 MiB on the host (page cache to a pipe) in the same run;
//! - the same through a guest `File` in 1 MiB writes and reads;
//! - small-file operations per second: FsStat, FsWriteFile + FsReadFile of 4 KiB, and
//!   open + read + close, each sequential on one thread, and FsStat from 8 threads.
//!
//! Run: `cargo bench --bench fs_io` (after scripts/setup.sh and a kernel).

use std::io::{Read, Write};
use std::time::Instant;

use vmhost::{Image, Instance, InstanceOptions};

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    std::env::set_var("VMHOST_HELPER_PATH", env!("CARGO_BIN_EXE_vmhost"));
    let rounds = 3;
    let size = 64usize << 20;
    let mb = size as f64 / 1e6;
    let data = common::noise(size, 0x2545_F491_4F6C_DD1D);
    let vm =
        Instance::new_with_helper(Image::Default, InstanceOptions { memory_mb: 512, ..Default::default() })
            .expect("boot");
    let fs = vm.fs();

    // The reference: `cat` of the same bytes from the host's page cache.
    let local = std::env::temp_dir().join(format!("vmhost-fsbench-{}", std::process::id()));
    std::fs::write(&local, &data).unwrap();
    let (mut cat, mut w, mut r, mut fw, mut fr) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let st = std::process::Command::new("cat")
            .arg(&local)
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(st.stdout.len(), size);
        cat.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        fs.write("/tmp/big", &data).unwrap();
        w.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let back = fs.read("/tmp/big").unwrap();
        r.push(t.elapsed().as_secs_f64());
        assert!(back == data);

        let t = Instant::now();
        let mut f = fs.create("/tmp/big2").unwrap();
        for c in data.chunks(1 << 20) {
            f.write_all(c).unwrap();
        }
        f.close().unwrap();
        fw.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut f = fs.open("/tmp/big2").unwrap();
        let mut back = Vec::with_capacity(size);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        fr.push(t.elapsed().as_secs_f64());
        assert!(back == data);
    }
    let _ = std::fs::remove_file(&local);
    let (cat, w, r, fw, fr) =
        (common::median(cat), common::median(w), common::median(r), common::median(fw), common::median(fr));
    println!("64 MiB guest file through the helper ({}), median of {rounds}", vm.id());
    println!("  local cat (host page cache -> pipe) : {:8.1} ms  {:7.0} MB/s", cat * 1e3, mb / cat);
    println!("  Fs::write                           : {:8.1} ms  {:7.0} MB/s", w * 1e3, mb / w);
    println!("  Fs::read                            : {:8.1} ms  {:7.0} MB/s", r * 1e3, mb / r);
    println!(
        "  write + read                        : {:8.1} ms  {:7.0} MB/s  {:.3}x of local cat (target >= 0.3x, >= 300 MB/s)",
        (w + r) * 1e3,
        2.0 * mb / (w + r),
        (2.0 * mb / (w + r)) / (mb / cat)
    );
    println!("  File, 1 MiB writes                  : {:8.1} ms  {:7.0} MB/s", fw * 1e3, mb / fw);
    println!("  File, 1 MiB reads                   : {:8.1} ms  {:7.0} MB/s", fr * 1e3, mb / fr);

    let small = common::noise(4096, 7);
    fs.create_dir_all("/tmp/small").unwrap();
    let ops = |name: &str, n: usize, f: &dyn Fn(usize)| {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        let s = t.elapsed().as_secs_f64();
        println!("  {name:<36}: {:8.0} /s  ({:.2} ms each)", n as f64 / s, s * 1e3 / n as f64);
    };
    println!("small-file operations, one thread");
    ops("FsStat", 500, &|_| {
        fs.metadata("/etc/passwd").unwrap();
    });
    ops("4 KiB FsWriteFile", 300, &|i| fs.write(format!("/tmp/small/{}", i % 50), &small).unwrap());
    ops("4 KiB FsReadFile", 300, &|i| {
        fs.read(format!("/tmp/small/{}", i % 50)).unwrap();
    });
    ops("open + read 4 KiB + close", 300, &|i| {
        let mut f = fs.open(format!("/tmp/small/{}", i % 50)).unwrap();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        f.close().unwrap();
    });
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..200 {
                    vm.fs().metadata("/etc/passwd").unwrap();
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    println!("  FsStat, 8 threads                   : {:8.0} /s", 1600.0 / secs);
}
