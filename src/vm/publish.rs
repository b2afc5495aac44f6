//! A guest port published on the host, as `docker run -p` publishes a container's: a
//! TCP listener on a host address (127.0.0.1 unless another is asked for) whose
//! connections go, through the agent's tunnel ([`super::tunnel`]), to the port a guest
//! program listens on. No network device is involved, so it works on both backends and
//! whether or not the guest's network is on.
//!
//! One thread accepts; each connection has two, one per direction. A host client that
//! connects while nothing listens in the guest is closed at once, as docker's proxy does.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::agent_link::AgentLink;
use super::tunnel::{TunnelConn, Wait};
use crate::error::{Error, Result};

/// Bytes moved per read, either way.
const CHUNK: usize = 64 << 10;

/// A published port; unpublished when dropped (connections in progress go on).
pub struct Published {
    host: SocketAddr,
    guest_port: u16,
    listener: Arc<TcpListener>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published").field("host", &self.host).field("guest_port", &self.guest_port).finish()
    }
}

impl Published {
    /// Listens on `host` (port 0: any) and forwards each connection to `guest_port` on
    /// the guest's loopback.
    pub fn start(link: &AgentLink, host: SocketAddr, guest_port: u16) -> Result<Published> {
        let listener = TcpListener::bind(host).map_err(|e| Error::Io {
            op: "publish a guest port on",
            path: host.to_string().into(),
            source: e,
        })?;
        let host = listener.local_addr().map_err(|e| Error::io("publish", host.to_string(), e))?;
        let listener = Arc::new(listener);
        let stopped = Arc::new(AtomicBool::new(false));
        let (l, s, link) = (listener.clone(), stopped.clone(), link.clone());
        thread::Builder::new()
            .name(format!("vmhost-publish-{}", host.port()))
            .spawn(move || accept_loop(&l, &s, &link, guest_port))
            .map_err(|e| Error::io("start the publisher", host.to_string(), e))?;
        log::info!("published {host} -> guest port {guest_port}");
        Ok(Published { host, guest_port, listener, stopped })
    }

    /// The host address it listens on.
    pub fn host_addr(&self) -> SocketAddr {
        self.host
    }

    /// The guest port it forwards to.
    pub fn guest_port(&self) -> u16 {
        self.guest_port
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accepting thread (accept fails on a shut-down socket).
        // SAFETY: shutdown on a descriptor the listener owns.
        unsafe { nix::libc::shutdown(self.listener.as_raw_fd(), nix::libc::SHUT_RDWR) };
    }
}

fn accept_loop(listener: &TcpListener, stopped: &AtomicBool, link: &AgentLink, guest_port: u16) {
    loop {
        let accepted = listener.accept();
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        if !link.is_alive() {
            // The VM is gone: refuse the clients still coming, rather than leave them
            // waiting in the backlog until the publication is dropped.
            // SAFETY: shutdown on a descriptor the listener owns.
            unsafe { nix::libc::shutdown(listener.as_raw_fd(), nix::libc::SHUT_RDWR) };
            return;
        }
        let (client, from) = match accepted {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("published port {guest_port}: accept: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let link = link.clone();
        // The connect to the guest waits for the agent: off the accepting thread.
        let spawned = thread::Builder::new()
            .name(format!("vmhost-publish-{guest_port}-conn"))
            .spawn(move || forward(&link, client, from, guest_port));
        if let Err(e) = spawned {
            log::warn!("published port {guest_port}: no thread for {from}: {e}");
        }
    }
}

/// Carries one host client's connection to the guest port, both ways.
fn forward(link: &AgentLink, client: TcpStream, from: SocketAddr, guest_port: u16) {
    let conn = match TunnelConn::connect(link, &format!("127.0.0.1:{guest_port}")) {
        Ok((c, _, _)) => Arc::new(c),
        Err(e) => {
            log::debug!("published port {guest_port}: {from}: {e}");
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let Ok(mut to_host) = client.try_clone() else { return };
    let guest = conn.clone();
    let back = thread::spawn(move || {
        // Guest to host, until the guest's end of stream: then the client's too. A reset
        // or the VM's end closes the client's connection whole, which also ends the
        // other direction's read.
        let how = loop {
            match guest.read(CHUNK, Wait::FOREVER) {
                Ok(d) if d.is_empty() => break Shutdown::Write,
                Ok(d) => {
                    if to_host.write_all(&d).is_err() {
                        break Shutdown::Both;
                    }
                }
                Err(_) => break Shutdown::Both,
            }
        };
        let _ = to_host.shutdown(how);
    });
    // Host to guest, until the client's end of stream.
    let mut buf = vec![0u8; CHUNK];
    let mut client = client;
    loop {
        match client.read(&mut buf) {
            Ok(0) => {
                conn.shutdown_write();
                break;
            }
            Ok(n) => {
                if conn.write(&buf[..n], Wait::FOREVER).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The client reset: the guest hears of it, which also wakes the other
                // direction's read.
                conn.close();
                break;
            }
        }
    }
    let _ = back.join();
    conn.close();
}

/// A `-p` value as docker takes it: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]`, the host
/// address 127.0.0.1 when none is given (not every address, as docker's default is: a
/// guest's port is this machine's business unless asked), an empty HOST_PORT any free
/// port. An IPv6 address goes in brackets: `[::1]:8080:80`.
pub fn parse_publish(spec: &str) -> std::result::Result<(SocketAddr, u16), String> {
    let bad = |why: &str| format!("-p {spec:?}: {why}; give [HOST_IP:]HOST_PORT:GUEST_PORT");
    let body = match spec.rsplit_once('/') {
        Some((b, proto)) if proto.eq_ignore_ascii_case("tcp") => b,
        Some((_, proto)) => return Err(bad(&format!("only tcp is published, not {proto}"))),
        None => spec,
    };
    let (rest, guest) = body.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
    let guest: u16 = guest.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("bad guest port"))?;
    let (ip, host_port) = match rest.rsplit_once(':') {
        Some((ip, port)) => match ip.strip_prefix('[') {
            Some(inner) => (inner.strip_suffix(']').ok_or_else(|| bad("an unclosed ["))?, port),
            None => (ip, port),
        },
        None => ("127.0.0.1", rest),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad(&format!("{ip:?} is not an IP address")))?;
    let port: u16 =
        if host_port.is_empty() { 0 } else { host_port.parse().map_err(|_| bad("bad host port"))? };
    Ok((SocketAddr::new(ip, port), guest))
}

#[cfg(test)]
mod tests {
    use super::parse_publish;

    #[test]
    fn publish_specs_parse_as_docker_takes_them() {
        let ok = |s: &str| parse_publish(s).map(|(a, g)| (a.to_string(), g)).unwrap();
        assert_eq!(ok("8080:80"), ("127.0.0.1:8080".into(), 80));
        assert_eq!(ok("0.0.0.0:8080:80"), ("0.0.0.0:8080".into(), 80));
        assert_eq!(ok("127.0.0.1::80/tcp"), ("127.0.0.1:0".into(), 80));
        assert_eq!(ok("[::1]:2222:22"), ("[::1]:2222".into(), 22));
        assert_eq!(ok("8080:80/TCP"), ("127.0.0.1:8080".into(), 80));
        for bad in ["80", "8080:80/udp", "x:1:2", "8080:0", "99999:80", "a:b", "[::1:8080:80"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }
}
