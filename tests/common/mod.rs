//! Shared test support: short temporary directories (`src/test_dir.rs`, shared with the
//! unit tests: socket paths must stay under 108 bytes), file-descriptor counts, and
//! bounded waits used as hang guards.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod registry;
#[path = "../../src/test_dir.rs"]
mod test_dir;
pub use test_dir::TempDir;

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Polls `cond` every 5 ms until it holds or `limit` passes (a hang guard, not a timing
/// assertion); returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// The vmhost binary built for these tests.
pub fn vmhost_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmhost"))
}

/// Whether this run is CI (`CI=true`): missing prerequisites fail instead of skipping.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The QEMU binary, or `None` (with the reason printed) when it is missing outside CI.
/// Under CI a missing QEMU fails the test.
pub fn qemu_binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("qemu-system-x86_64")).find(|c| c.is_file()));
    if found.is_none() {
        let msg = "qemu-system-x86_64 not found; install it with \
                   apt-get install -y --no-install-recommends qemu-system-x86 (scripts/test.sh does)";
        if under_ci() {
            panic!("{test}: {msg}");
        }
        eprintln!("SKIP {test}: {msg}");
    }
    found
}

/// A QEMU with no guest (`-M none`) serving QMP on a Unix socket; killed on drop.
pub struct Qemu {
    pub child: std::process::Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Qemu {
    /// Starts it, or `None` when QEMU is missing outside CI; returns once its QMP socket
    /// listens.
    ///
    /// `wait=on`: QEMU accepts its first QMP client before it sets the monitor up, so
    /// the first client of each QEMU must be the test's own. With `wait=off`, a client
    /// that connects early (as every test does) is accepted by QEMU 7.2's main loop while
    /// the monitor's I/O thread is still taking the socket over: under load about one
    /// early connection in 700 then gets no greeting, no answer to `qmp_capabilities`, a
    /// second greeting or a closed connection.
    pub fn start(test: &str) -> Option<Qemu> {
        let bin = qemu_binary(test)?;
        let dir = TempDir::new("qemu");
        let socket = dir.join("qmp.sock");
        let child = std::process::Command::new(bin)
            .args(["-M", "none", "-nodefaults", "-display", "none", "-m", "16M", "-qmp"])
            .arg(format!("unix:{},server=on,wait=on", socket.display()))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start qemu");
        // The file appears at bind(2), a moment before listen(2); a client that does not
        // retry a refused connection (the `vmhost qmp` command) must come after both.
        // Not probed with a connection: that would be QEMU's first client.
        assert!(
            wait_until(Duration::from_secs(20), || listening(&socket)),
            "QEMU did not listen on its QMP socket"
        );
        Some(Qemu { child, socket, _dir: dir })
    }

    /// A connection to QEMU's QMP socket. The socket's file exists from QEMU's bind(2),
    /// a moment before its listen(2): a connect in between is refused, so refused
    /// connects are retried, as vmhost's own dial does.
    pub fn stream(&self) -> std::os::unix::net::UnixStream {
        vmhost::internals::unix::connect_retry(
            &self.socket,
            Duration::from_secs(20),
            Duration::from_millis(5),
        )
        .expect("connect to QMP socket")
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
}

/// Whether a Unix socket listens at `path`: /proc/net/unix lists it with the
/// `__SO_ACCEPTCON` flag (00010000).
fn listening(path: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7] == path
    })
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Whether VM tests can run: QEMU, the static agent, and a kernel (cached, or one apt
/// can fetch). Under CI a missing piece fails the test; elsewhere it is skipped with
/// the reason printed.
pub fn vm_ready(test: &str) -> bool {
    if qemu_binary(test).is_none() {
        return false;
    }
    if let Err(e) = vmhost::image::initramfs::find_agent() {
        let msg = format!("{e} (scripts/test.sh builds it)");
        if under_ci() {
            panic!("{test}: {msg}");
        }
        eprintln!("SKIP {test}: {msg}");
        return false;
    }
    let cache = vmhost::image::cache_dir();
    let have_kernel = std::env::var_os("VMHOST_KERNEL").is_some()
        || vmhost::image::kernel::cached_default(&cache).ok().flatten().is_some()
        || std::process::Command::new("apt-get").arg("--version").output().is_ok();
    if !have_kernel {
        let msg = "no guest kernel: run `vmhost kernel fetch` or set VMHOST_KERNEL";
        if under_ci() {
            panic!("{test}: {msg}");
        }
        eprintln!("SKIP {test}: {msg}");
        return false;
    }
    true
}

/// Child processes of `pid` (from /proc/*/stat).
pub fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_string();
        let ppid = stat[close + 2..].split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push((p, comm));
        }
    }
    out
}

pub fn alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rfind(')').is_some_and(|i| !s[i + 2..].starts_with('Z')))
}

/// One guest behind the real helper process, booted by the first test of a test
/// binary that asks and shared by all of them (boots are slow under TCG); None when VM
/// tests cannot run here (outside CI; under CI that fails instead).
pub fn shared_guest(test: &str) -> Option<&'static vmhost::Instance> {
    static VM: std::sync::OnceLock<vmhost::Instance> = std::sync::OnceLock::new();
    if !vm_ready(test) {
        return None;
    }
    Some(VM.get_or_init(|| {
        std::env::set_var("VMHOST_HELPER_PATH", vmhost_bin());
        let opts = vmhost::InstanceOptions { timeout: Some(Duration::from_secs(900)), ..Default::default() };
        vmhost::Instance::new_with_helper(vmhost::Image::Default, opts).expect("boot the shared guest")
    }))
}

/// `n` deterministic bytes (xorshift64 from `seed`) that do not repeat in a pattern.
pub fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A cache of its own under `home` for a `vmhost` child process (its `XDG_CACHE_HOME`,
/// returned): copies of the built minimal kernel and of the default image's root, so
/// that what the child writes to its cache is seen alone, and a user without access to
/// ours (root's cache is under /root, 0700) can boot.
pub fn private_cache(home: &std::path::Path) -> PathBuf {
    let cache = vmhost::image::cache_dir();
    let xdg = home.join("cache");
    let theirs = xdg.join("vmhost");
    std::fs::create_dir_all(theirs.join("kernels")).unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(st.success(), "cp -a {} {}", from.display(), to.display());
    };
    for e in std::fs::read_dir(cache.join("kernels")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("minimal") {
            copy(&e.path(), &theirs.join("kernels"));
        }
    }
    copy(&cache.join("rootfs"), &theirs);
    xdg
}

/// Boots the default image on QEMU through the library's own machine API (no helper
/// protocol): what `vmhost host` does before it serves the VM.
pub fn boot_qemu_machine() -> vmhost::vm::Machine {
    let spec = vmhost::vm::InstanceSpec {
        source: vmhost::image::rootfs::Source::Default,
        cache_dir: vmhost::image::cache_dir(),
        options: vmhost::wire::InstanceOptions { backend: vmhost::wire::Backend::Qemu, ..Default::default() },
        first_command: None,
        image: None,
        lease: None,
        snapshot_base: None,
    };
    spec.boot(&vmhost::progress::Progress::quiet()).unwrap()
}

/// The median of timings (the upper middle one of an even count), for the benches.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
