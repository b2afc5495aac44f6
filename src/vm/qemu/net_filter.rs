//! The guest's outbound network, filtered: what keeps the host's loopback out of reach.
//!
//! QEMU's user-mode network (slirp) maps every address of its virtual network but the
//! DNS server's (10.0.2.0/24: the gateway 10.0.2.2 and any other) to the host's
//! 127.0.0.1, and connects to 127.0.0.0/8 as asked: every service the host keeps to
//! itself was open to the guest. QEMU 7.2 has no switch for it, so the guest's network
//! device is not connected to slirp directly: each is a `-netdev stream` QEMU serves on
//! a Unix socket of the run directory (slirp's behind a hub), and a [`NetFilter`] joins
//! the two, passing the guest's frames on only when [`allowed`] lets them.
//!
//! ```text
//! guest eth0 = virtio-net --netdev stream (guest.sock)--> NetFilter
//!     --(allowed frames)--> netdev stream (slirp.sock) = hub = netdev user (slirp)
//! ```
//!
//! Frames on both sockets are QEMU's stream framing: a big-endian u32 length, then the
//! Ethernet frame. Frames from slirp to the guest pass unchanged.

use crate::contract::GATEWAY;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;

use crate::error::{Error, Result};

/// The largest frame either side may send: QEMU's network buffers hold 68 KiB.
pub const MAX_FRAME: usize = 69_632;

/// slirp's virtual network (10.0.2.0/24), its DNS server and the gateway it maps to the
/// host's loopback.
const NETWORK: [u8; 3] = [10, 0, 2];
const DNS: [u8; 4] = [10, 0, 2, 3];

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const IP_TCP: u8 = 6;
const IP_UDP: u8 = 17;

/// Whether a frame the guest sends may reach slirp. ARP passes (slirp answers for its
/// own addresses only). IPv4 passes unless it is for the host's loopback: 127.0.0.0/8,
/// 0.0.0.0/8, or an address of slirp's network other than the DNS server's port 53
/// (unfragmented) and, when `host_loopback`, the gateway. Everything else (IPv6, VLANs,
/// other protocols, runts) is dropped: slirp runs with IPv6 off.
pub fn allowed(frame: &[u8], host_loopback: bool) -> bool {
    if frame.len() < 14 {
        return false;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_ARP => true,
        ETH_IPV4 => ipv4_allowed(&frame[14..], host_loopback),
        _ => false,
    }
}

fn ipv4_allowed(ip: &[u8], host_loopback: bool) -> bool {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return false;
    }
    let header = ((ip[0] & 0x0F) as usize) * 4;
    if header < 20 || ip.len() < header {
        return false;
    }
    if host_loopback {
        return true;
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if dst[0] == 127 || dst[0] == 0 {
        return false;
    }
    if dst[..3] != NETWORK {
        return true;
    }
    if dst == GATEWAY {
        return false;
    }
    // The DNS server: slirp sends it to the host's resolver, which may itself be on the
    // host's loopback (127.0.0.53), at whatever port was asked: port 53 only, and only
    // whole packets (a later fragment could overwrite the port).
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0;
    if dst != DNS || fragmented || !(ip[9] == IP_TCP || ip[9] == IP_UDP) || ip.len() < header + 4 {
        return false;
    }
    u16::from_be_bytes([ip[header + 2], ip[header + 3]]) == 53
}

const IP_ICMP: u8 = 1;

/// The answer to an IPv4 packet [`allowed`] dropped: an ICMP "destination unreachable,
/// communication administratively prohibited" from the gateway, which the guest's
/// kernel turns into EHOSTUNREACH at once, so that a connection to the host's loopback
/// fails rather than hangs. None for what gets no answer: non-IPv4, and ICMP itself
/// (never an error about an error).
pub fn rejection(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() < 14 + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let header = ((ip[0] & 0x0F) as usize) * 4;
    if ip[0] >> 4 != 4 || header < 20 || ip.len() < header || ip[9] == IP_ICMP {
        return None;
    }
    // Only for the first fragment of a packet one host sent to one host (RFC 1122).
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1FFF != 0;
    let group = |a: &[u8]| a[0] >= 224 || a == [255, 255, 255, 255] || a[0] == 0;
    if later_fragment || group(&ip[12..16]) || group(&ip[16..20]) || ip[19] == 255 {
        return None;
    }
    // The original header and the first 8 bytes of what follows it (RFC 792).
    let quoted = &ip[..(header + 8).min(ip.len())];
    let mut icmp = vec![3, 13, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = 20 + icmp.len();
    let mut out = Vec::with_capacity(14 + total);
    out.extend_from_slice(&frame[6..12]); // back to the sender
    out.extend_from_slice(&frame[0..6]); // from the address it sent to (slirp's)
    out.extend_from_slice(&ETH_IPV4.to_be_bytes());
    let mut reply = vec![0x45, 0xC0, 0, 0, 0, 0, 0, 0, 64, IP_ICMP, 0, 0];
    reply[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    reply.extend_from_slice(&GATEWAY);
    reply.extend_from_slice(&ip[12..16]);
    let sum = checksum(&reply);
    reply[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&reply);
    out.extend_from_slice(&icmp);
    Some(out)
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// Reads one stream frame into `buf`; `Ok(false)` at a clean end.
fn read_frame(r: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// The filter between one VM's network device and slirp; its two threads end when
/// either side closes (QEMU exits) or it is dropped.
#[derive(Debug)]
pub struct NetFilter {
    guest: UnixStream,
    net: UnixStream,
}

impl NetFilter {
    /// Connects to QEMU's two network sockets and starts passing frames.
    pub fn start(guest_sock: &Path, net_sock: &Path, host_loopback: bool) -> Result<NetFilter> {
        let connect =
            |p: &Path| UnixStream::connect(p).map_err(|e| Error::io("connect to QEMU's network", p, e));
        let (guest, net) = (connect(guest_sock)?, connect(net_sock)?);
        let clone =
            |s: &UnixStream| s.try_clone().map_err(|e| Error::io("clone a network socket", guest_sock, e));
        let (from_guest, to_net) = (clone(&guest)?, clone(&net)?);
        let (from_net, to_guest) = (clone(&net)?, clone(&guest)?);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| Error::io("start the network filter", net_sock, e))
        };
        // Both directions write to the guest (the filter its rejections): whole frames,
        // one writer at a time.
        let to_guest = std::sync::Arc::new(parking_lot::Mutex::new(to_guest));
        let (out_guest, in_guest) = (to_guest.clone(), to_guest);
        let started =
            spawn("vmhost-net-out", Box::new(move || filter(from_guest, to_net, &out_guest, host_loopback)))
                .and_then(|_| spawn("vmhost-net-in", Box::new(move || pass(from_net, &in_guest))));
        if let Err(e) = started {
            // Ends a thread that did start, and frees QEMU's sockets for a retry.
            let _ = guest.shutdown(std::net::Shutdown::Both);
            let _ = net.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
        log::debug!(
            "guest network filter running (host loopback {})",
            if host_loopback { "open" } else { "closed" }
        );
        Ok(NetFilter { guest, net })
    }
}

/// Writes one stream frame.
fn write_frame(to: &mut UnixStream, frame: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    out.clear();
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    to.write_all(out)
}

/// The guest's frames to slirp, through [`allowed`]; the dropped ones answered with
/// their [`rejection`]. Ends both sides when either ends.
fn filter(
    mut from: UnixStream,
    mut to: UnixStream,
    guest: &parking_lot::Mutex<UnixStream>,
    host_loopback: bool,
) {
    let (mut buf, mut out) = (Vec::with_capacity(2048), Vec::with_capacity(2048));
    let mut dropped = 0u64;
    while let Ok(true) = read_frame(&mut from, &mut buf).inspect_err(|e| log::debug!("guest network: {e}")) {
        let sent = if allowed(&buf, host_loopback) {
            write_frame(&mut to, &buf, &mut out)
        } else {
            dropped += 1;
            match rejection(&buf) {
                Some(r) => write_frame(&mut guest.lock(), &r, &mut out),
                None => Ok(()),
            }
        };
        if sent.is_err() {
            break;
        }
    }
    if dropped > 0 {
        log::debug!("guest network: refused {dropped} frames for the host's loopback or unsupported");
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// slirp's frames to the guest, unchanged. Ends both sides when either ends.
fn pass(mut from: UnixStream, guest: &parking_lot::Mutex<UnixStream>) {
    let (mut buf, mut out) = (Vec::with_capacity(2048), Vec::with_capacity(2048));
    while let Ok(true) = read_frame(&mut from, &mut buf).inspect_err(|e| log::debug!("guest network: {e}")) {
        if write_frame(&mut guest.lock(), &buf, &mut out).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = guest.lock().shutdown(std::net::Shutdown::Both);
}

impl Drop for NetFilter {
    fn drop(&mut self) {
        let _ = self.guest.shutdown(std::net::Shutdown::Both);
        let _ = self.net.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with an IPv4 header to `dst` (protocol `proto`, flags and
    /// fragment offset `frag`) and a transport header whose destination port is `port`.
    fn ipv4(dst: [u8; 4], proto: u8, port: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 2, 15];
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0x80, 0x00]);
        ip.extend_from_slice(&port.to_be_bytes());
        ip.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn the_hosts_loopback_is_out_of_reach_unless_asked() {
        let out = |dst, proto, port, frag| allowed(&ipv4(dst, proto, port, frag), false);
        // The world and the host's own network addresses: reached.
        assert!(out([93, 184, 216, 34], IP_TCP, 80, 0));
        assert!(out([192, 0, 2, 2], IP_TCP, 8080, 0));
        assert!(out([8, 8, 8, 8], IP_UDP, 53, 0x2000), "fragments to the world pass");
        // slirp's gateway, any other address of its network, loopback and 0/8: not.
        assert!(!out(GATEWAY, IP_TCP, 22, 0));
        assert!(!out([10, 0, 2, 100], IP_TCP, 22, 0));
        assert!(!out([10, 0, 2, 255], IP_UDP, 9, 0));
        assert!(!out([127, 0, 0, 1], IP_TCP, 22, 0));
        assert!(!out([127, 1, 2, 3], IP_UDP, 53, 0));
        assert!(!out([0, 0, 0, 0], IP_TCP, 22, 0));
        // The DNS server on port 53 only, whole packets only.
        assert!(out(DNS, IP_UDP, 53, 0));
        assert!(out(DNS, IP_TCP, 53, 0x4000), "don't-fragment is not a fragment");
        assert!(!out(DNS, IP_TCP, 22, 0));
        assert!(!out(DNS, IP_UDP, 53, 0x2000));
        assert!(!out(DNS, IP_UDP, 53, 0x0001));
        assert!(!out(DNS, 1, 53, 0), "ICMP to the DNS server");
        // Asked for: the gateway is the host's loopback.
        assert!(allowed(&ipv4(GATEWAY, IP_TCP, 22, 0), true));
        // ARP passes; IPv6, other types and garbage do not.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        assert!(allowed(&arp, false));
        let mut v6 = ipv4([1, 1, 1, 1], IP_TCP, 80, 0);
        v6[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        assert!(!allowed(&v6, true));
        assert!(!allowed(&[0u8; 13], true));
        let mut short = ipv4(DNS, IP_UDP, 53, 0);
        short.truncate(14 + 20);
        assert!(!allowed(&short, false), "no room for the port");
        let mut bad_ihl = ipv4([1, 1, 1, 1], IP_TCP, 80, 0);
        bad_ihl[14] = 0x4F;
        assert!(!allowed(&bad_ihl, false));
        bad_ihl[14] = 0x44;
        assert!(!allowed(&bad_ihl, false));
    }

    #[test]
    fn a_dropped_packet_is_answered_administratively_prohibited() {
        let mut f = ipv4(GATEWAY, IP_TCP, 22, 0);
        f[0..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let r = rejection(&f).unwrap();
        assert_eq!(&r[0..6], &f[6..12], "to the sender");
        assert_eq!(&r[6..12], &f[0..6]);
        let ip = &r[14..];
        assert_eq!((ip[0], ip[9]), (0x45, IP_ICMP));
        assert_eq!(&ip[12..16], &GATEWAY);
        assert_eq!(&ip[16..20], &[10, 0, 2, 15]);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, ip.len());
        assert_eq!(checksum(&ip[..20]), 0, "IP header checksum");
        let icmp = &ip[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 13));
        assert_eq!(checksum(icmp), 0, "ICMP checksum");
        assert_eq!(&icmp[8..], &f[14..14 + 28], "the original header and 8 bytes");
        // No answer to ICMP, to later fragments, to broadcasts, to non-IPv4, to garbage.
        assert!(rejection(&ipv4(GATEWAY, IP_ICMP, 0, 0)).is_none());
        assert!(rejection(&ipv4(GATEWAY, IP_UDP, 53, 0x0010)).is_none());
        assert!(rejection(&ipv4([10, 0, 2, 255], IP_UDP, 9, 0)).is_none());
        assert!(rejection(&ipv4([224, 0, 0, 1], IP_UDP, 9, 0)).is_none());
        assert!(rejection(&[0u8; 20]).is_none());
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        assert!(rejection(&arp).is_none());
    }

    #[test]
    fn frames_over_the_bound_end_the_stream() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).unwrap();
        let mut buf = Vec::new();
        assert!(read_frame(&mut a, &mut buf).is_err());
        assert!(buf.capacity() < MAX_FRAME, "nothing allocated for it");
        drop(b);
        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(!read_frame(&mut a, &mut buf).unwrap());
    }
}
