//! The network family (0x05xx): listeners in the guest that the host program owns and
//! guest programs connect to (NetListen, ListenerAccept, ListenerClose, ListenerAddr),
//! connections to guest ports (NetConnect, vmhost's addition), and the connections'
//! bytes (ConnRead, ConnWrite, ConnCloseWrite, ConnClose, ConnLocalAddr,
//! ConnRemoteAddr). All of it goes through the agent's tunnel ([`crate::vm::tunnel`]):
//! no socket is opened on the host's network, and no network device is needed.
//!
//! A guest program reaches a listener at `10.42.0.1:PORT` (`host.internal`), the address
//! ListenerAddr and an accepted connection's ConnLocalAddr answer. ConnRead returns
//! empty bytes at the end of the stream. ListenerClose wakes a pending ListenerAccept
//! (on another connection) with AlreadyClosed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::session::Session;
use super::{frame, HandlerResult};
use crate::contract::HOST_ADDR;
use crate::vm::agent_link::AgentLink;
use crate::vm::tunnel::{TunnelConn, TunnelListener, Wait};
use crate::wire::{ErrorCode, ErrorFrame, Request, Response};

/// The most ConnRead answers with at once.
pub const MAX_READ: u32 = 1 << 20;

/// A listener of the session.
pub(super) struct NetListener {
    tunnel: TunnelListener,
    closed: AtomicBool,
}

/// A connection of the session, with its addresses as the host program is told them
/// and its timeouts (ConnSetTimeouts; none at first).
pub(super) struct NetConn {
    tunnel: TunnelConn,
    local: String,
    remote: String,
    timeouts: parking_lot::Mutex<(Option<Duration>, Option<Duration>)>,
}

impl NetConn {
    fn new(tunnel: TunnelConn, local: String, remote: String) -> Arc<NetConn> {
        Arc::new(NetConn { tunnel, local, remote, timeouts: parking_lot::Mutex::new((None, None)) })
    }
}

/// Whether `req` is this family's: its messages, and the Conn* ones on any handle but
/// a pipe's (those are the pipes'; an unknown one is answered InvalidHandle here).
pub(super) fn is_net(session: &Session, req: &Request) -> bool {
    match req {
        Request::NetListen { .. }
        | Request::ListenerAccept { .. }
        | Request::ListenerClose { .. }
        | Request::ListenerAddr { .. }
        | Request::NetConnect { .. }
        | Request::ConnCloseWrite { .. }
        | Request::ConnSetTimeouts { .. } => true,
        Request::ConnRead { handle, .. }
        | Request::ConnWrite { handle, .. }
        | Request::ConnClose { handle }
        | Request::ConnLocalAddr { handle }
        | Request::ConnRemoteAddr { handle } => {
            session.conns.lock().knows(*handle) || !super::fs::is_pipe_or_closed(&session.files, *handle)
        }
        _ => false,
    }
}

fn invalid(op: &str, message: String) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::InvalidArgument, op, message)
}

/// The port of a Go-style address `[HOST]:PORT` for `network` (`tcp` or `tcp4`), and its
/// host part.
fn parse(op: &str, network: &str, address: &str) -> Result<(String, u16), ErrorFrame> {
    if network != "tcp" && network != "tcp4" {
        return Err(invalid(op, format!("network {network:?}: only tcp and tcp4 are supported")));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| invalid(op, format!("address {address:?}: give [HOST]:PORT")))?;
    let port = port.parse().map_err(|_| invalid(op, format!("address {address:?}: bad port {port:?}")))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// Serves one request of the family.
pub(super) fn serve(
    agent: &AgentLink,
    session: &Session,
    handle: &dyn Fn() -> u64,
    cancelled: &dyn Fn() -> bool,
    req: Request,
) -> HandlerResult {
    let op = req.name();
    let wait = Wait { cancelled, deadline: None };
    match req {
        Request::NetListen { network, address } => {
            // The host part is ignored, as in the original: guests dial HOST_ADDR.
            let (_, port) = parse(op, &network, &address)?;
            let tunnel = TunnelListener::listen(agent, port).map_err(|e| frame(&e, ""))?;
            let h = handle();
            session
                .listeners
                .lock()
                .insert(h, Arc::new(NetListener { tunnel, closed: AtomicBool::new(false) }));
            Ok(Response::NetListen { handle: h }.into())
        }
        Request::ListenerAccept { handle: lh } => {
            let l = session.listeners.lock().get(lh, "listener")?;
            let gone = || cancelled() || l.closed.load(Ordering::SeqCst);
            let got = l.tunnel.accept(Wait { cancelled: &gone, deadline: None });
            let closed =
                || ErrorFrame::new(ErrorCode::AlreadyClosed, op, format!("listener {lh} was closed"));
            match got {
                Ok(Some((tunnel, peer, local))) => {
                    let h = handle();
                    session.conns.lock().insert(h, NetConn::new(tunnel, local, peer));
                    Ok(Response::ListenerAccept { handle: h }.into())
                }
                Ok(None) => Err(closed()),
                Err(_) if l.closed.load(Ordering::SeqCst) => Err(closed()),
                Err(e) => Err(e.to_frame(op)),
            }
        }
        Request::ListenerClose { handle: lh } => {
            let l = session.listeners.lock().remove(lh, "listener")?;
            l.closed.store(true, Ordering::SeqCst);
            l.tunnel.close().map_err(|e| frame(&e, ""))?;
            Ok(Response::ListenerClose {}.into())
        }
        Request::ListenerAddr { handle: lh } => {
            let l = session.listeners.lock().get(lh, "listener")?;
            let ip = std::net::Ipv4Addr::from(HOST_ADDR);
            Ok(Response::ListenerAddr { address: format!("{ip}:{}", l.tunnel.port()) }.into())
        }
        Request::NetConnect { network, address } => {
            let (host, port) = parse(op, &network, &address)?;
            let target = match host.as_str() {
                "" => format!("127.0.0.1:{port}"),
                h if h.contains(':') => format!("[{h}]:{port}"),
                h => format!("{h}:{port}"),
            };
            let (tunnel, local, remote) = TunnelConn::connect(agent, &target).map_err(|e| frame(&e, ""))?;
            let h = handle();
            session.conns.lock().insert(h, NetConn::new(tunnel, local, remote));
            Ok(Response::NetConnect { handle: h }.into())
        }
        Request::ConnRead { handle: ch, max } => {
            let c = conn(session, ch)?;
            let deadline = c.timeouts.lock().0.map(|t| Instant::now() + t);
            let data = c
                .tunnel
                .read(max.min(MAX_READ) as usize, Wait { deadline, ..wait })
                .map_err(|e| frame(&e, ""))?;
            Ok(Response::ConnRead { data }.into())
        }
        Request::ConnWrite { handle: ch, data } => {
            let c = conn(session, ch)?;
            let deadline = c.timeouts.lock().1.map(|t| Instant::now() + t);
            let written = c.tunnel.write(&data, Wait { deadline, ..wait }).map_err(|e| frame(&e, ""))?;
            Ok(Response::ConnWrite { written: written as u32 }.into())
        }
        Request::ConnSetTimeouts { handle: ch, read_ms, write_ms } => {
            let ms = |v: u32| (v > 0).then(|| Duration::from_millis(v as u64));
            *conn(session, ch)?.timeouts.lock() = (ms(read_ms), ms(write_ms));
            Ok(Response::ConnSetTimeouts {}.into())
        }
        Request::ConnCloseWrite { handle: ch } => {
            conn(session, ch)?.tunnel.shutdown_write();
            Ok(Response::ConnCloseWrite {}.into())
        }
        Request::ConnClose { handle: ch } => {
            let c = session.conns.lock().remove(ch, "connection")?;
            c.tunnel.close();
            Ok(Response::ConnClose {}.into())
        }
        Request::ConnLocalAddr { handle: ch } => {
            Ok(Response::ConnLocalAddr { address: conn(session, ch)?.local.clone() }.into())
        }
        Request::ConnRemoteAddr { handle: ch } => {
            Ok(Response::ConnRemoteAddr { address: conn(session, ch)?.remote.clone() }.into())
        }
        other => Err(invalid(op, format!("{} is not a network message", other.name()))),
    }
}

fn conn(session: &Session, h: u64) -> Result<Arc<NetConn>, ErrorFrame> {
    session.conns.lock().get(h, "connection")
}

/// Ends every listener and connection of a session (InstanceClose) on this side: their
/// waiters wake and their handles are freed; the guest is going away, so it is not asked.
pub(super) fn close_all(session: &Session) {
    let listeners = session.listeners.lock().drain();
    for l in listeners {
        l.closed.store(true, Ordering::SeqCst);
        l.tunnel.forget();
    }
    let conns = session.conns.lock().drain();
    for c in conns {
        c.tunnel.forget();
    }
    session.published.lock().clear();
}
