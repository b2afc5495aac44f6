//! PID 1 in the guest: links, mounts, modules, power button, the server, power-off.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::time::Instant;

use nix::mount::{mount, MsFlags};

use super::network::{interface_up, is_up};
use super::power::{power_button_thread, power_off, watch_power_button};
use super::{say, trace};
use crate::contract::MODULES_LIST;

/// Runs the agent as PID 1; powers the VM off when its server ends.
pub fn run() -> ! {
    // A panic on any thread (a bug, or no memory for a thread) would leave a guest that
    // cannot answer, or that loses PID 1 and panics its kernel: sync and power off.
    std::panic::set_hook(Box::new(|info| {
        say(format_args!("{info}; powering off"));
        power_off();
    }));
    // The kernel starts init in the root already; said here because the links below
    // are made relative to it.
    if let Err(e) = std::env::set_current_dir("/") {
        say(format_args!("chdir /: {e}"));
    }
    let links = make_links();
    mount_filesystems();
    trace(format_args!("init: {links} hard links made, filesystems mounted"));
    let modules = module_list();
    load_modules(&modules);
    if let Some(fstype) = root_disk() {
        if let Err(e) = switch_to_overlay_root(Lower::Disk(&fstype)) {
            say(format_args!("cannot make the image's disk the root: {e}; powering off"));
            power_off();
        }
        trace(format_args!("init: the root is the image's disk ({fstype}) under an overlay"));
    } else {
        // The initramfs itself under an overlay, so that snapshots find the changes.
        // Without overlayfs (a stock kernel has it as a module) the root stays as it
        // is, and only snapshots are refused.
        match switch_to_overlay_root(Lower::Initramfs) {
            Ok(()) => trace(format_args!("init: the root is the initramfs under an overlay")),
            Err(e) => trace(format_args!("init: the root stays the initramfs ({e}): no snapshots")),
        }
    }
    let _ = nix::unistd::sethostname("vmhost");
    super::tunnel::name_the_host();
    super::user::take_root_groups();
    // eth0 is configured only when the host first connects the network
    // (proto::NETWORK_UP).
    // vmhost's own kernel has brought lo up during boot (kernel/patches/0002-*).
    if !is_up("lo") {
        if let Err(e) = interface_up("lo", None) {
            say(format_args!("cannot bring lo up: {e}"));
        }
    }
    mount_shared();
    // All of the setup is done before the server says Hello, on this thread: commands
    // never see a half-configured guest, and nothing waits for setup. A setup thread
    // cost the first command two thread starts (the setup's and its waiter's), more
    // than running beside the server's start saved.
    trace(format_args!("setup done"));
    // The command the host put on the kernel command line, if any: the server starts
    // it right after its Hello (see serve::run).
    let first = std::env::var_os(crate::contract::proto::FIRST_EXEC_VAR);
    // The power button is an input device of ACPI machines (a stock kernel's).
    if !modules.is_empty() || std::path::Path::new("/dev/input").exists() {
        power_button_thread(watch_power_button);
    }
    // The server runs on this thread, in PID 1 itself: no fork, no second address space.
    let code = super::serve::run(first);
    say(format_args!("agent server ended ({code}); powering off"));
    power_off();
}

/// The longest name in the list of hard links (PATH_MAX).
const MAX_LINK_NAME: u64 = 4096;

/// Makes the hard links the initramfs lists instead of archiving them (a tar image's:
/// `crate::contract::LINKS_FILE`), then gives each directory that gained a name
/// its times from the image back, so the guest sees the image as it was written. The
/// list is removed after (an image made from this guest's root must not carry it).
/// Returns how many links it made.
///
/// The names are read into two reused buffers, NUL-terminated as the list stores them,
/// and passed to link(2) as they are (relative to PID 1's working directory, the root).
fn make_links() -> usize {
    use std::io::BufRead;
    use std::os::unix::ffi::OsStrExt;
    let list = std::path::Path::new("/").join(crate::contract::LINKS_FILE);
    let mut reader = match File::open(&list) {
        Ok(f) => std::io::BufReader::with_capacity(64 << 10, f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            say(format_args!("read {}: {e}", list.display()));
            return 0;
        }
    };
    // Reads the next NUL-terminated name into `buf` (NUL included); false at the end or
    // on a bad list.
    let next = |reader: &mut std::io::BufReader<File>, buf: &mut Vec<u8>| -> bool {
        buf.clear();
        match reader.by_ref().take(MAX_LINK_NAME + 1).read_until(0, buf) {
            Ok(0) => false,
            Ok(_) if buf.last() == Some(&0) && buf.len() > 1 => true,
            Ok(_) => {
                say(format_args!("{}: a name without its end; the rest is skipped", list.display()));
                false
            }
            Err(e) => {
                say(format_args!("read {}: {e}", list.display()));
                false
            }
        }
    };
    // Each directory that gains a name, with its times from before (NUL-terminated).
    let mut times: std::collections::HashMap<Vec<u8>, (nix::libc::timespec, nix::libc::timespec)> =
        std::collections::HashMap::new();
    let (mut target, mut name) = (Vec::with_capacity(256), Vec::with_capacity(256));
    let mut made = 0;
    while next(&mut reader, &mut target) && next(&mut reader, &mut name) {
        // The directory that gains the name ("." for the root); through a symbolic
        // link, its target.
        let dir = match name.iter().rposition(|&b| b == b'/') {
            Some(i) => &name[..i],
            None => &b"."[..],
        };
        if !times.contains_key(dir) {
            let mut key = Vec::with_capacity(dir.len() + 1);
            key.extend_from_slice(dir);
            key.push(0);
            // SAFETY: a zeroed stat is a valid value of this plain C struct.
            let mut st: nix::libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: stat on a NUL-terminated path into the stat we own.
            if unsafe { nix::libc::stat(key.as_ptr().cast(), &mut st) } == 0 {
                let at = nix::libc::timespec { tv_sec: st.st_atime, tv_nsec: st.st_atime_nsec };
                let mt = nix::libc::timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec };
                key.pop();
                times.insert(key, (at, mt));
            }
        }
        // SAFETY: both names are NUL-terminated (checked by `next`).
        if unsafe { nix::libc::link(target.as_ptr().cast(), name.as_ptr().cast()) } == 0 {
            made += 1;
        } else {
            let e = std::io::Error::last_os_error();
            let show =
                |b: &[u8]| std::path::Path::new(std::ffi::OsStr::from_bytes(&b[..b.len() - 1])).to_owned();
            say(format_args!("hard link /{} -> /{}: {e}", show(&name).display(), show(&target).display()));
        }
    }
    for (mut dir, (at, mt)) in times {
        dir.push(0);
        let ts = [at, mt];
        // SAFETY: utimensat on a NUL-terminated path with two timespecs; following a
        // symbolic link, as the stat above did.
        unsafe { nix::libc::utimensat(nix::libc::AT_FDCWD, dir.as_ptr().cast(), ts.as_ptr(), 0) };
    }
    if let Err(e) = std::fs::remove_file(&list) {
        say(format_args!("remove {}: {e}", list.display()));
    }
    made
}

fn mount_filesystems() {
    let mounts: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        ("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(*src), *target, Some(*fstype), *flags, *data) {
            if e != nix::errno::Errno::EBUSY {
                say(format_args!("mount {target}: {e}"));
            }
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/0", "/dev/stdin");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/1", "/dev/stdout");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/2", "/dev/stderr");
}

/// The root disk's filesystem, when the host gave the guest one
/// ([`crate::contract::ROOT_DISK_PARAM`]).
fn root_disk() -> Option<String> {
    kernel_param(crate::contract::ROOT_DISK_PARAM).filter(|t| t == "erofs")
}

/// The writable disk's filesystem, when the host gave the overlay one
/// ([`crate::contract::RW_DISK_PARAM`]).
fn rw_disk() -> Option<String> {
    kernel_param(crate::contract::RW_DISK_PARAM).filter(|t| t == "ext4")
}

/// The value of `prefix` (`name=`) on the kernel command line (read once).
fn kernel_param(prefix: &str) -> Option<String> {
    static CMDLINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cmdline = CMDLINE.get_or_init(|| std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(prefix)).map(str::to_string)
}

/// What the root's overlay lies on.
enum Lower<'a> {
    /// The image's read-only disk, of this filesystem type.
    Disk(&'a str),
    /// The initramfs, as unpacked (a bind mount of `/`, without what is mounted on it).
    Initramfs,
}

/// Makes an overlay the root: the image's read-only disk or the initramfs as its lower
/// layer, its upper layer on tmpfs (what the guest writes lives in its memory, the image
/// is never copied there) or on the writable disk the host gave it; the mounts made so
/// far moved into it, then the overlay moved onto `/` and entered, as switch_root does.
/// Over the initramfs, a failure before the overlay is up leaves the root as it was.
fn switch_to_overlay_root(lower: Lower<'_>) -> std::io::Result<()> {
    use crate::contract::ROOT_DISK_DEVICE;
    let err = |what: &str, e: nix::errno::Errno| std::io::Error::other(format!("{what}: {e}"));
    for d in ["/vmhost/lower", "/vmhost/rw"] {
        std::fs::create_dir_all(d)?;
    }
    match lower {
        Lower::Disk(fstype) => {
            mount(Some(ROOT_DISK_DEVICE), "/vmhost/lower", Some(fstype), MsFlags::MS_RDONLY, None::<&str>)
                .map_err(|e| err(&format!("mount {ROOT_DISK_DEVICE}"), e))?
        }
        Lower::Initramfs => {
            if let Err(e) = overlay_initramfs(&err) {
                for m in ["/vmhost/rw/root", "/vmhost/rw", "/vmhost/lower"] {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
                return Err(e);
            }
            return enter_overlay(&err);
        }
    }
    mount_rw_and_overlay(&err, None)?;
    enter_overlay(&err)
}

/// The initramfs as the lower layer, and the overlay over it.
fn overlay_initramfs(err: &dyn Fn(&str, nix::errno::Errno) -> std::io::Error) -> std::io::Result<()> {
    mount(Some("/"), "/vmhost/lower", None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| err("bind the initramfs", e))?;
    // The image and the writes shared the initramfs's bound (half the memory, tmpfs's
    // default); they still do: the writable layer gets what the image leaves of it.
    let (total, used) = unsafe {
        // SAFETY: both calls fill the zeroed structures they are given.
        let mut si: nix::libc::sysinfo = std::mem::zeroed();
        let mut fs: nix::libc::statfs = std::mem::zeroed();
        let ok = nix::libc::sysinfo(&mut si) == 0 && nix::libc::statfs(c"/".as_ptr(), &mut fs) == 0;
        let total = if ok { si.totalram as u64 * si.mem_unit as u64 } else { 0 };
        let used = if ok { (fs.f_blocks - fs.f_bfree) as u64 * fs.f_bsize as u64 } else { 0 };
        (total, used)
    };
    let size = (total / 2).saturating_sub(used).max(16 << 20);
    mount_rw_and_overlay(err, (total > 0).then_some(size))
}

/// The writable layer (tmpfs, or the writable disk) and the overlay on
/// `/vmhost/rw/root`.
fn mount_rw_and_overlay(
    err: &dyn Fn(&str, nix::errno::Errno) -> std::io::Error,
    tmpfs_size: Option<u64>,
) -> std::io::Result<()> {
    let tmpfs_options = match tmpfs_size {
        Some(bytes) => format!("mode=0755,size={bytes}"),
        None => "mode=0755".to_string(),
    };
    match rw_disk() {
        Some(fs) => mount(
            Some(crate::contract::RW_DISK_DEVICE),
            "/vmhost/rw",
            Some(fs.as_str()),
            MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(|e| err(&format!("mount the writable disk {}", crate::contract::RW_DISK_DEVICE), e))?,
        None => {
            mount(Some("tmpfs"), "/vmhost/rw", Some("tmpfs"), MsFlags::empty(), Some(tmpfs_options.as_str()))
                .map_err(|e| err("mount the writable layer", e))?
        }
    }
    for d in ["/vmhost/rw/upper", "/vmhost/rw/work", "/vmhost/rw/root"] {
        std::fs::create_dir_all(d)?;
    }
    mount(
        Some("overlay"),
        "/vmhost/rw/root",
        Some("overlay"),
        MsFlags::empty(),
        Some("lowerdir=/vmhost/lower,upperdir=/vmhost/rw/upper,workdir=/vmhost/rw/work"),
    )
    .map_err(|e| err("mount the overlay", e))?;
    Ok(())
}

/// Moves the kernel's filesystems into the overlay and makes it the root. Everything a
/// move needs is checked before the first one, and a failure moves back what moved: the
/// root is switched whole or not at all (but for a failing chroot after the move).
fn enter_overlay(err: &dyn Fn(&str, nix::errno::Errno) -> std::io::Error) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Opened now, while a path leads to it; kept for snapshots once the root has moved.
    let rw = super::snapshot::open_rw_dir(std::path::Path::new("/vmhost/rw"));
    let root_dev = std::fs::metadata("/")?.dev();
    let mut moves = Vec::new();
    for m in ["/dev", "/proc", "/sys", "/tmp", "/run"] {
        // Only what is mounted there (a mount that failed left nothing to move).
        match std::fs::symlink_metadata(m) {
            Ok(md) if md.is_dir() && md.dev() != root_dev => {}
            _ => continue,
        }
        let target = format!("/vmhost/rw/root{m}");
        match std::fs::symlink_metadata(&target) {
            Ok(t) if t.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!("{m} in the image is not a directory")));
            }
            Err(_) => std::fs::create_dir(&target)?,
        }
        moves.push((m, target));
    }
    let mut moved: Vec<&(&str, String)> = Vec::new();
    let undo = |moved: &[&(&str, String)]| {
        for (m, target) in moved.iter().rev() {
            let _ = mount(Some(target.as_str()), *m, None::<&str>, MsFlags::MS_MOVE, None::<&str>);
        }
    };
    for mv in &moves {
        let (m, target) = mv;
        if let Err(e) = mount(Some(*m), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
            undo(&moved);
            return Err(err(&format!("move {m}"), e));
        }
        moved.push(mv);
    }
    std::env::set_current_dir("/vmhost/rw/root")?;
    if let Err(e) = mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
        let _ = std::env::set_current_dir("/");
        undo(&moved);
        return Err(err("move the root", e));
    }
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    std::env::set_current_dir("/")?;
    // Its upper directory is where snapshots find the changes; no path leads there now.
    match rw {
        Ok(fd) => super::snapshot::keep_rw_dir(fd),
        Err(e) => say(format_args!("keep the overlay's upper directory for snapshots: {e}")),
    }
    Ok(())
}

/// Loads the modules of [`MODULES_LIST`] in order, with their parameters.
/// The modules of [`MODULES_LIST`]: (file, parameters), in load order.
fn module_list() -> Vec<(String, String)> {
    let list = std::fs::read_to_string(MODULES_LIST).unwrap_or_default();
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (f, p) = l.split_once(' ').unwrap_or((l, ""));
            (f.to_string(), p.to_string())
        })
        .collect()
}

/// Loads modules in order, with their parameters.
fn load_modules(modules: &[(String, String)]) {
    for (file, params) in modules {
        let path = format!("{}/modules/{file}", crate::contract::AGENT_DIR);
        // PCI transports are for machines with a PCI bus (not microvm).
        if file.starts_with("virtio_pci") && !has_pci() {
            continue;
        }
        let t = Instant::now();
        let loaded = File::open(&path).map_err(|e| errno_of(&e)).and_then(|f| {
            let params = CString::new(params.as_str()).unwrap_or_default();
            nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty())
        });
        match loaded {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {
                trace(format_args!("module {file}: {} ms", t.elapsed().as_millis()))
            }
            Err(e) => say(format_args!("load module {file}: {e}")),
        }
    }
}

fn has_pci() -> bool {
    std::fs::read_dir("/sys/bus/pci/devices").is_ok_and(|mut d| d.next().is_some())
}

fn errno_of(e: &std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

/// Mounts the host directories the host listed on the kernel command line
/// (`vmhost.mounts=TAG:rw,TAG:ro`) at `/mnt/TAG`, over virtio-9p. A read-only one is
/// mounted read-only here and is read-only in QEMU too.
fn mount_shared() {
    let Some(list) = kernel_param(crate::contract::MOUNTS_PARAM) else { return };
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let (tag, mode) = item.rsplit_once(':').unwrap_or((item, "rw"));
        if tag.is_empty() || tag.contains('/') || tag == "." || tag == ".." {
            say(format_args!("bad mount tag {tag:?}"));
            continue;
        }
        let target = format!("{}/{tag}", crate::contract::MOUNT_ROOT);
        // Made by vmhost, not by the guest's programs: snapshots leave them out.
        for dir in [crate::contract::MOUNT_ROOT, target.as_str()] {
            if !std::path::Path::new(dir).exists() {
                super::snapshot::made_by_vmhost(dir);
            }
        }
        let _ = std::fs::create_dir_all(&target);
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if mode == "ro" {
            flags |= MsFlags::MS_RDONLY;
        }
        // 512 KiB messages: fewer round trips for large files than the 8 KiB default.
        let opts = "trans=virtio,version=9p2000.L,msize=524288,cache=none";
        match mount(Some(tag), target.as_str(), Some("9p"), flags, Some(opts)) {
            Ok(()) => trace(format_args!("mounted host {tag} at {target} ({mode})")),
            Err(e) => say(format_args!("mount host directory {tag} at {target}: {e}")),
        }
    }
}
