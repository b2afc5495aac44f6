//! PID 1 in the guest: links, mounts, modules, power button, the server, power-off.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use super::{say, trace};
use crate::contract::{DNS, GATEWAY, GUEST_ADDR, MODULES_LIST};

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
    let _ = nix::unistd::sethostname("vmhost");
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

/// Configures eth0 for QEMU's user-mode network: address, netmask, up, default route,
/// and /etc/resolv.conf when the image has none. Idempotent: a second call finds it
/// configured (the route already there) and succeeds. The error names the step.
pub(crate) fn configure_network() -> Result<(), String> {
    if !std::path::Path::new("/sys/class/net/eth0").exists() {
        return Err("the guest has no eth0".into());
    }
    interface_up("eth0", Some((GUEST_ADDR, [255, 255, 255, 0])))
        .map_err(|e| format!("address, netmask and up on eth0: {e}"))?;
    match default_route(GATEWAY) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
        r => r.map_err(|e| format!("default route via eth0: {e}"))?,
    }
    // Best effort: an image's resolv.conf may be a dangling link (systemd-resolved's),
    // which must not cost the guest its network.
    // Only a missing or empty regular file is written: this runs on the server's read
    // loop, and a FIFO there would block it.
    let resolv = std::path::Path::new("/etc/resolv.conf");
    if std::fs::metadata(resolv).map_or(true, |m| m.is_file() && m.len() == 0) {
        if let Err(e) = std::fs::write(resolv, format!("nameserver {DNS}\n")) {
            say(format_args!("cannot write {}: {e}", resolv.display()));
        }
    }
    trace(format_args!("eth0 configured"));
    Ok(())
}

/// Mounts the host directories the host listed on the kernel command line
/// (`vmhost.mounts=TAG:rw,TAG:ro`) at `/mnt/TAG`, over virtio-9p. A read-only one is
/// mounted read-only here and is read-only in QEMU too.
fn mount_shared() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(list) = cmdline.split_whitespace().find_map(|w| w.strip_prefix(crate::contract::MOUNTS_PARAM))
    else {
        return;
    };
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let (tag, mode) = item.rsplit_once(':').unwrap_or((item, "rw"));
        if tag.is_empty() || tag.contains('/') || tag == "." || tag == ".." {
            say(format_args!("bad mount tag {tag:?}"));
            continue;
        }
        let target = format!("{}/{tag}", crate::contract::MOUNT_ROOT);
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

fn sockaddr_in(ip: [u8; 4]) -> nix::libc::sockaddr {
    use nix::libc;
    // SAFETY: sockaddr_in fits in sockaddr (16 bytes each); all-zero is a valid start.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(ip);
        std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
    }
}

/// Whether an interface is up, as sysfs says (its `flags`, IFF_UP). vmhost's own kernel
/// brings lo up during boot (kernel/patches/0002-*); reading the file costs the boot
/// less than the socket, ioctl and close that would ask the same, whose kernel paths
/// (the socket's close above all) run for the first time and are translated first.
fn is_up(name: &str) -> bool {
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap_or_default();
    let flags = flags.trim().trim_start_matches("0x");
    u32::from_str_radix(flags, 16).is_ok_and(|f| f & nix::libc::IFF_UP as u32 != 0)
}

/// Brings an interface up, optionally with an IPv4 address and netmask.
fn interface_up(name: &str, addr: Option<([u8; 4], [u8; 4])>) -> std::io::Result<()> {
    use nix::libc;
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: plain socket and ioctl calls on a zeroed ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let mut r = 0;
        if let Some((ip, mask)) = addr {
            req.ifr_ifru.ifru_addr = sockaddr_in(ip);
            r = libc::ioctl(fd, libc::SIOCSIFADDR as _, &req);
            if r == 0 {
                req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
                r = libc::ioctl(fd, libc::SIOCSIFNETMASK as _, &req);
            }
        }
        if r == 0 {
            r = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        }
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Adds the default IPv4 route through `gw`.
fn default_route(gw: [u8; 4]) -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: a zeroed rtentry with its sockaddrs set, passed to SIOCADDRT.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut rt: libc::rtentry = std::mem::zeroed();
        rt.rt_dst = sockaddr_in([0, 0, 0, 0]);
        rt.rt_genmask = sockaddr_in([0, 0, 0, 0]);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        let r = libc::ioctl(fd, libc::SIOCADDRT as _, &rt);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The name of the threads that watch the power button (which a test looks for).
pub const POWER_BUTTON_THREAD: &str = "power-button";

fn power_button_thread(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(POWER_BUTTON_THREAD.into()).spawn(f) {
        say(format_args!("cannot watch the power button: {e}"));
    }
}

/// Watches every input device for the power key and powers off when it is pressed.
fn watch_power_button() {
    // Devices may appear a little after the modules load.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watched = Vec::new();
    while Instant::now() < deadline {
        if let Ok(dir) = std::fs::read_dir("/dev/input") {
            for e in dir.flatten() {
                let path = e.path();
                let is_event =
                    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("event"));
                if is_event && !watched.contains(&path) {
                    watched.push(path.clone());
                    power_button_thread(move || watch_device(&path));
                }
            }
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn watch_device(path: &std::path::Path) {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Ok(mut f) = File::open(path) else { return };
    // struct input_event on 64-bit: struct timeval (16 bytes), u16 type, u16 code, i32 value.
    let mut ev = [0u8; 24];
    while f.read_exact(&mut ev).is_ok() {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if ty == EV_KEY && code == KEY_POWER && value == 1 {
            say(format_args!("power button pressed; powering off"));
            power_off();
        }
    }
}

/// Syncs and ends the VM. The host runs QEMU with `-no-reboot`, so a reboot ends it on
/// every machine type, with or without ACPI.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        thread::sleep(Duration::from_secs(1));
    }
}
