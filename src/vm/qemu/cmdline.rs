//! QEMU's command line and the guest kernel's, built from a [`BootConfig`], and the
//! descriptors QEMU gets instead of names ([`QemuFds`]).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::{Accel, BootConfig, MachineType};
use crate::error::{Error, Result};
use crate::unix;

/// The id of the guest's network device.
pub(super) const NET_ID: &str = "net0";

/// What QEMU gets as open descriptors rather than names, all made by us in the VM's
/// run directory, which only we can enter: its listening sockets (QMP, the agent's
/// port, the network device's and slirp's streams), bound here and listened on by
/// QEMU (`fd=N`), and its end of the console's socket pair. Nothing QEMU (or a guest
/// that took it over) does can put something else at a path we later connect to or
/// read.
pub(super) struct QemuFds {
    /// Our end of the console.
    pub(super) console: File,
    /// QEMU's descriptors, in [`QemuFds::ORDER`]: closed here once QEMU has its copies.
    pub(super) for_qemu: Vec<OwnedFd>,
}

impl QemuFds {
    /// The sockets, in the order of `for_qemu`, by the name of their path.
    const ORDER: [&'static str; 4] = ["qmp.sock", "agent.sock", "guest-net.sock", "slirp.sock"];

    pub(super) fn new(dir: &Path) -> Result<QemuFds> {
        let mut for_qemu: Vec<OwnedFd> = Vec::new();
        for name in QemuFds::ORDER {
            for_qemu.push(unix::bind_socket(&dir.join(name))?.into());
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::io("create the console socket", dir, e))?;
        for_qemu.push(theirs.into());
        Ok(QemuFds { console: File::from(OwnedFd::from(ours)), for_qemu })
    }

    /// The descriptor number QEMU gets for the socket `name` (one of [`QemuFds::ORDER`])
    /// or, for "console", its end of the console.
    fn fd(&self, name: &str) -> i32 {
        let i = QemuFds::ORDER.iter().position(|n| *n == name).unwrap_or(QemuFds::ORDER.len());
        self.for_qemu[i].as_raw_fd()
    }
}

/// The local APIC timer's period for vmhost's own kernel (kernel/patches/0005-*): bus
/// cycles per jiffy, QEMU's (and KVM's) 1 GHz APIC bus at the kernel's HZ (250 when the
/// kernel's config is not beside it, as vmhost's kernel.config sets it).
pub(super) fn lapic_timer_period_arg(hz: Option<u32>) -> String {
    format!("lapic_timer_period={}", 1_000_000_000 / hz.filter(|&h| h > 0).unwrap_or(250))
}

/// The kernel parameter that has vmhost's own kernel warm the agent up
/// (kernel/patches/0004-*, [`crate::agent::main`]).
const WARM_UP_ARG: &str = "vmhost.warm_up=/init";

/// The kernel's command line, and whether it carries the first command.
pub(super) fn kernel_cmdline(cfg: &BootConfig) -> (String, bool) {
    let minimal = cfg.kernel.is_minimal();
    // The host's TSC rate, so that guest clocks keep the host's time (see vm::qemu::clock).
    let tsc = super::clock::kernel_args(cfg.kernel.hz());
    let mut append = vec!["console=ttyS0", "panic=-1"];
    append.extend(tsc.iter().map(String::as_str));
    append.push("cryptomgr.notests");
    let lapic_period = lapic_timer_period_arg(cfg.kernel.hz());
    if minimal {
        // No ACPI: devices come on the command line (QEMU's microvm adds them), reboot
        // by triple fault (which -no-reboot turns into QEMU exiting).
        append.extend(["reboot=t", "no_timer_check", "8250.nr_uarts=1"]);
        // The local APIC timer, whose one-shot mode lets an idle vCPU go without ticks
        // (with nolapic_timer, the PIT's periodic broadcast cost an idle VM 7.7 % of a
        // core), with its period given: QEMU's APIC bus runs at 1 GHz, 4000000 cycles a
        // jiffy at HZ=250, so the kernel skips its ~220 ms calibration against the PIT
        // (kernel/patches/0005-*). The stock kernel calibrates (it has no such patch).
        append.push(&lapic_period);
        if cfg.machine == MachineType::Microvm {
            append.push("pci=off");
        }
        // With a second vCPU, idle while the first finishes the kernel's start-up, the
        // kernel runs `/init --warm-up` there first, so that init's exec and first steps
        // are translated when init runs them (kernel/patches/0004-*). With one vCPU it
        // would only run beside init.
        if cfg.cpus > 1 {
            append.push(WARM_UP_ARG);
        }
    }
    // The agent mounts each shared directory (crate::agent::init reads this).
    let mounts_arg = (!cfg.mounts.is_empty()).then(|| {
        let list: Vec<String> = cfg
            .mounts
            .iter()
            .map(|m| format!("{}:{}", m.tag, if m.writable { "rw" } else { "ro" }))
            .collect();
        format!("{}{}", crate::contract::MOUNTS_PARAM, list.join(","))
    });
    append.extend(mounts_arg.as_deref());
    let root_disk_arg = cfg.root_disk.as_ref().map(|_| format!("{}erofs", crate::contract::ROOT_DISK_PARAM));
    append.extend(root_disk_arg.as_deref());
    let rw_disk_arg = (cfg.root_disk.is_some() && cfg.rw_disk_mb.is_some())
        .then(|| format!("{}ext4", crate::contract::RW_DISK_PARAM));
    append.extend(rw_disk_arg.as_deref());
    if !cfg.dmesg {
        append.extend(["quiet", "loglevel=1"]);
    }
    // The first command, for the agent (crate::contract::proto::FIRST_EXEC_VAR), where it
    // fits. The kernel keeps COMMAND_LINE_SIZE (2048) bytes with their NUL and cuts the
    // rest, and QEMU's microvm adds a `virtio_mmio.device=512@0xfeb00e00:12` for each
    // device. The command line then goes to QEMU in a file (see `cmdline_args`), whose
    // values hold at most QEMU_CONFIG_VALUE bytes and no double quote.
    let disks = usize::from(cfg.root_disk.is_some()) * (1 + usize::from(cfg.rw_disk_mb.is_some()));
    let devices = VIRTIO_DEVICES + cfg.mounts.len() + disks;
    let room = 2048usize.saturating_sub(40 * devices).min(QEMU_CONFIG_VALUE + 1);
    let given = append.iter().copied().chain(cfg.extra_args.iter().map(String::as_str));
    let used: usize = given.clone().map(|a| a.len() + 1).sum();
    let quoted = given.clone().any(|a| a.contains('"'));
    let first_param = cfg.first_command.as_ref().map(crate::contract::proto::encode_first_exec);
    let first_param = first_param.filter(|p| !quoted && used + p.len() < room);
    if cfg.first_command.is_some() && first_param.is_none() {
        log::debug!("the first command does not fit on the kernel command line: it starts when run");
    }
    append.extend(first_param.as_deref());
    // Last, so that they can override any of the above.
    append.extend(cfg.extra_args.iter().map(String::as_str));
    (append.join(" "), first_param.is_some())
}

/// Refuses kernel parameters that would break the machine: on microvm without ACPI (our
/// own kernel's), QEMU appends its devices' parameters (`virtio_mmio.device=`) after all
/// of ours, so after a `--` they would become init's arguments and the guest would find
/// no devices (no agent port: a boot that times out).
pub(super) fn check_extra_args(cfg: &BootConfig) -> Result<()> {
    let devices_on_cmdline = cfg.machine == MachineType::Microvm && cfg.kernel.is_minimal();
    if devices_on_cmdline && cfg.extra_args.iter().any(|a| a == "--") {
        return Err(Error::InvalidArgument {
            op: "boot".into(),
            message: "`--` in the kernel parameters (VMHOST_KERNEL_ARGS): QEMU's microvm adds its devices \
                      after them, which would go to init as arguments and leave the guest without devices; \
                      drop the `--` and what follows"
                .into(),
        });
    }
    Ok(())
}

/// QEMU's `-sandbox` option (see `command_line`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The virtio devices of every VM besides its mounts: the agent's serial port, the
/// network device and the balloon (see [`command_line`]).
const VIRTIO_DEVICES: usize = 3;

/// The longest value a QEMU configuration file (`-readconfig`) takes: 1023 bytes.
const QEMU_CONFIG_VALUE: usize = 1023;

/// QEMU's arguments that give the kernel its command line: `-append` with it, or, when
/// it carries a command (`private`), `-readconfig` with a file in the VM's private run
/// directory that holds it. QEMU's own arguments are readable by every user of the host
/// (`ps`); the file is not.
pub(super) fn cmdline_args(
    append: String,
    private: bool,
    dir: &Path,
    other_user: bool,
) -> Result<([String; 2], Option<OwnedFd>)> {
    if !private {
        return Ok((["-append".into(), append], None));
    }
    let path = dir.join("cmdline.cfg");
    let text = format!("[machine]\n  append = \"{append}\"\n");
    std::fs::write(&path, text).map_err(|e| Error::io("write the kernel command line", &path, e))?;
    if !other_user {
        return Ok((["-readconfig".into(), path.display().to_string()], None));
    }
    // A QEMU of another user reads it through the descriptor (reopened by
    // /proc/self/fd, which checks the file's mode, not the directory's): 0644 in a
    // directory only we enter.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("chmod", &path, e))?;
    let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let arg = format!("/proc/self/fd/{}", f.as_raw_fd());
    Ok((["-readconfig".into(), arg], Some(f.into())))
}

/// QEMU's arguments, with `cmdline` giving the kernel its command line.
pub(super) fn command_line(
    cfg: &BootConfig,
    cmdline: [String; 2],
    fds: &QemuFds,
    rw_disk: Option<&Path>,
) -> Vec<String> {
    let minimal = cfg.kernel.is_minimal();
    let (machine, serial_dev, net_dev, balloon_dev) = match cfg.machine {
        MachineType::Microvm if minimal => {
            ("microvm,acpi=off", "virtio-serial-device", "virtio-net-device", "virtio-balloon-device")
        }
        MachineType::Microvm => {
            ("microvm", "virtio-serial-device", "virtio-net-device", "virtio-balloon-device")
        }
        MachineType::Pc => ("pc", "virtio-serial-pci", "virtio-net-pci", "virtio-balloon-pci"),
    };
    let kernel = cfg.kernel_image.as_ref().unwrap_or(&cfg.kernel.vmlinux);
    let cpu = cpu_model(cfg.accel);
    let mut args: Vec<String> = vec![
        "-M".into(),
        machine.into(),
        "-accel".into(),
        accel_option(cfg),
        "-cpu".into(),
        cpu,
        "-m".into(),
        format!("{}M", cfg.memory_mb),
        "-smp".into(),
        cfg.cpus.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // QEMU's seccomp filter, as libvirt sets it: no obsolete system calls, no
        // set*id, no fork or exec, no scheduler or resource changes. A guest that takes
        // QEMU over through a device bug cannot spawn a shell or raise privileges; QEMU
        // is killed on the spot instead.
        "-sandbox".into(),
        SANDBOX.into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        cfg.initramfs.display().to_string(),
        "-chardev".into(),
        format!("socket,id=con,fd={}", fds.fd("console")),
        "-serial".into(),
        "chardev:con".into(),
        // Two ports (0, kept for a console, and the agent's), not the default 31: the
        // guest driver sets up two virtqueues per port, 64 of them by default, which
        // cost ~10 ms of boot under TCG (`initcall_debug`).
        "-device".into(),
        format!("{serial_dev},max_ports=2"),
        "-chardev".into(),
        format!("socket,id=agent,fd={},server=on,wait=off", fds.fd("agent.sock")),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={}", crate::contract::PORT_NAME),
        // wait=on: QEMU accepts us before it sets its monitor up. With wait=off, QEMU 7.2
        // can lose an early client's greeting or commands under load (its main loop
        // accepts while the monitor's I/O thread takes the socket over); we connect at
        // once, so it waits at most one dial interval for us.
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=on", fds.fd("qmp.sock")),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // The network device and QEMU's user-mode network, each on a socket of its own
        // that net_filter joins when the network is first enabled (slirp behind a hub,
        // IPv6 off); the device's link starts down (see QemuVm::set_network).
        "-netdev".into(),
        format!("stream,id={NET_ID},server=on,addr.type=fd,addr.str={}", fds.fd("guest-net.sock")),
        "-device".into(),
        format!("{net_dev},netdev={NET_ID}"),
        "-netdev".into(),
        "user,id=slirp,ipv6=off".into(),
        "-netdev".into(),
        "hubport,id=slirp-port,hubid=0,netdev=slirp".into(),
        "-netdev".into(),
        format!("stream,id=slirp-net,server=on,addr.type=fd,addr.str={}", fds.fd("slirp.sock")),
        "-netdev".into(),
        "hubport,id=filter-port,hubid=0,netdev=slirp-net".into(),
        // Memory the guest frees goes back to the host (free page reporting: the guest
        // reports free 2 MiB blocks, QEMU discards them), so an idle guest holds what it
        // uses, not all it ever touched (the initramfs it unpacked, boot-time buffers).
        "-device".into(),
        format!("{balloon_dev},free-page-reporting=on"),
    ];
    args.extend(cmdline);
    // A container image's root: read-only to QEMU too (the guest writes to an overlay on
    // tmpfs). First of the disks, so the guest sees it as /dev/vda.
    if let Some(disk) = &cfg.root_disk {
        let blk = if cfg.machine == MachineType::Pc { "virtio-blk-pci" } else { "virtio-blk-device" };
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,id=root,format=raw,readonly=on,cache=writethrough",
            disk.display().to_string().replace(',', ",,")
        ));
        args.push("-device".into());
        args.push(format!("{blk},drive=root"));
        // Its overlay's writable disk, second: /dev/vdb.
        if let Some(rw) = rw_disk {
            args.push("-drive".into());
            args.push(format!(
                "file={},if=none,id=rw,format=raw,cache=unsafe,discard=unmap",
                rw.display().to_string().replace(',', ",,")
            ));
            args.push("-device".into());
            args.push(format!("{blk},drive=rw"));
        }
    }
    let ninep = if cfg.machine == MachineType::Pc { "virtio-9p-pci" } else { "virtio-9p-device" };
    for (i, m) in cfg.mounts.iter().enumerate() {
        // In QEMU option values a comma is written twice.
        let path = m.host_path.replace(',', ",,");
        // A writable share keeps what the guest sets (owners, modes with setuid and
        // setgid, symlinks, device nodes) in user.virtfs.* extended attributes: on the
        // host, files and directories the guest makes are plain, owned by the user
        // running vmhost, 0644 and 0755 (see `crate::vm::check_mounts`).
        let model = if m.writable {
            "security_model=mapped-xattr,fmode=0644,dmode=0755"
        } else {
            "security_model=none,readonly=on"
        };
        args.push("-fsdev".into());
        args.push(format!("local,id=fs{i},path={path},{model}"));
        args.push("-device".into());
        args.push(format!("{ninep},fsdev=fs{i},mount_tag={}", m.tag));
    }
    if cfg.accel == Accel::Kvm && cfg.machine == MachineType::Microvm {
        args.push("-global".into());
        args.push("kvm-pit.lost_tick_policy=discard".into());
    }
    args
}

/// The `-accel` option: the accelerator, and under TCG a translation buffer sized for
/// the guest ([`tb_size_mb`]) instead of QEMU's 1 GiB, whose touched part stays in QEMU's
/// memory for as long as the VM runs.
pub(super) fn accel_option(cfg: &BootConfig) -> String {
    match cfg.accel {
        Accel::Kvm => "kvm".into(),
        Accel::Tcg => format!("tcg,tb-size={}", tb_size_mb(cfg.memory_mb)),
    }
}

/// TCG's translation buffer for a guest of `memory_mb`, in MiB: an eighth of the guest's
/// memory, 16 to 256 MiB (`VMHOST_TB_SIZE` overrides). The boot of vmhost's guest
/// translates ~48,000 blocks, about 12 MiB of host code; a full buffer is flushed and
/// refilled, which costs time, not correctness.
pub fn tb_size_mb(memory_mb: u64) -> u64 {
    if let Some(mb) = std::env::var("VMHOST_TB_SIZE").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return mb.max(1);
    }
    (memory_mb / 8).clamp(16, 256)
}

/// The `-cpu` model for `accel`: `VMHOST_CPU` when set, else `host` under KVM and
/// `max,-erms,-fsrm` under TCG.
///
/// Under TCG the guest is told it has no ERMS/FSRM ("fast rep movsb/stosb"): TCG
/// emulates `rep movsb` one byte per iteration, so with them every kernel and glibc
/// memcpy and memset moves a byte at a time; without them they move 8 bytes or a vector
/// at a time. Guest file throughput doubles (BENCHMARKS.md, fs_io: 89 -> 175 MB/s).
pub fn cpu_model(accel: Accel) -> String {
    std::env::var("VMHOST_CPU").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| {
        match accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max,-erms,-fsrm",
        }
        .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::proto::ExecRequest;
    use crate::image::kernel::Kernel;
    use crate::vm::qemu::QemuUser;
    use std::time::Duration;

    fn config(mounts: usize, extra: &str, args: &str) -> BootConfig {
        let kernel = Kernel {
            vmlinux: "/nonexistent/vmlinux".into(),
            modules: Vec::new(),
            origin: "test".into(),
            kind: crate::image::kernel::KernelKind::Minimal,
        };
        BootConfig {
            memory_mb: 256,
            cpus: 1,
            kernel,
            kernel_image: None,
            initramfs: "/nonexistent/initramfs".into(),
            dmesg: false,
            timeout: None,
            boot_timeout: Duration::from_secs(1),
            machine: MachineType::Microvm,
            accel: Accel::Tcg,
            mounts: (0..mounts)
                .map(|i| crate::wire::MountConfig {
                    tag: format!("t{i}"),
                    host_path: "/".into(),
                    writable: true,
                })
                .collect(),
            extra_args: extra.split_whitespace().map(String::from).collect(),
            host_loopback: false,
            first_command: Some(ExecRequest {
                program: "sh".into(),
                args: vec![args.into()],
                ..Default::default()
            }),
            qemu_user: QemuUser::Same,
            root_disk: None,
            rw_disk_mb: None,
        }
    }

    #[test]
    fn the_first_command_goes_on_the_kernel_command_line_only_where_it_fits() {
        // QEMU's microvm adds " virtio_mmio.device=512@0xfeb00e00:12" per device.
        let added = " virtio_mmio.device=512@0xfeb00e00:12".len();
        let (mut carried, mut left) = (0, 0);
        for (mounts, cpus) in [0, 1, 5, 20, 30, 60].into_iter().flat_map(|m| [(m, 1), (m, 2)]) {
            for extra in ["", "a=b c=d", &"x=y ".repeat(100)] {
                for len in [0, 50, 200, 400, 800] {
                    let mut cfg = config(mounts, extra, &"a".repeat(len));
                    cfg.cpus = cpus;
                    let (line, private) = kernel_cmdline(&cfg);
                    assert_eq!(private, line.contains("VMHOST_EXEC="), "{line}");
                    if private {
                        carried += 1;
                        assert!(line.len() + added * (3 + mounts) < 2048, "{mounts} mounts: {line}");
                        assert!(line.len() <= QEMU_CONFIG_VALUE, "{line}");
                    } else {
                        left += 1;
                    }
                    // The user's parameters stay last, so that they can override.
                    assert!(line.ends_with(extra.trim_end()), "{line}");
                }
            }
        }
        assert!(carried > 0 && left > 0, "{carried} carried, {left} left out");
        // `--` would hand microvm's devices to init.
        let e = check_extra_args(&config(0, "quiet -- a", "")).unwrap_err().to_string();
        assert!(e.contains("VMHOST_KERNEL_ARGS") && e.contains("drop the `--`"), "{e}");
        assert!(check_extra_args(&config(0, "quiet a=--", "")).is_ok());
        // A double quote cannot go in QEMU's configuration file.
        assert!(!kernel_cmdline(&config(0, "a=\"b\"", "")).1);
        assert!(kernel_cmdline(&config(0, "", "")).1);
    }

    #[test]
    fn our_kernel_warms_the_agent_up_only_with_a_second_vcpu() {
        let line = |cpus, kind| {
            let mut cfg = config(0, "", "");
            cfg.cpus = cpus;
            cfg.kernel.kind = kind;
            kernel_cmdline(&cfg).0.split(' ').any(|a| a == WARM_UP_ARG)
        };
        use crate::image::kernel::KernelKind::{Minimal, Stock};
        assert!(line(2, Minimal) && line(4, Minimal));
        assert!(!line(1, Minimal));
        // A stock kernel has no such parameter (kernel/patches/ are ours).
        assert!(!line(2, Stock));
    }
}
