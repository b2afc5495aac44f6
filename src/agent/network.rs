//! The guest's network: lo at boot, and eth0 for QEMU's user-mode network when the host
//! connects it (NetworkUp).

use super::{say, trace};
use crate::contract::{DNS, GATEWAY, GUEST_ADDR};

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
pub(super) fn is_up(name: &str) -> bool {
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap_or_default();
    let flags = flags.trim().trim_start_matches("0x");
    u32::from_str_radix(flags, 16).is_ok_and(|f| f & nix::libc::IFF_UP as u32 != 0)
}

/// Brings an interface up, optionally with an IPv4 address and netmask.
pub(super) fn interface_up(name: &str, addr: Option<([u8; 4], [u8; 4])>) -> std::io::Result<()> {
    set_interface(name, addr, true)
}

/// Takes eth0 down (its routes go with it) when the host disconnects the network
/// (NetworkDown): a guest program's connection then fails at once (network
/// unreachable) instead of waiting on a link that carries nothing. Harmless when it is
/// down already or missing.
pub(crate) fn unconfigure_network() -> Result<(), String> {
    if !std::path::Path::new("/sys/class/net/eth0").exists() {
        return Ok(());
    }
    set_interface("eth0", None, false).map_err(|e| format!("eth0 down: {e}"))?;
    trace(format_args!("eth0 down"));
    Ok(())
}

/// Sets an interface up or down, first giving it an IPv4 address and netmask if asked.
fn set_interface(name: &str, addr: Option<([u8; 4], [u8; 4])>, up: bool) -> std::io::Result<()> {
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
            let flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if up {
                req.ifr_ifru.ifru_flags |= flags;
            } else {
                req.ifr_ifru.ifru_flags &= !flags;
            }
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
