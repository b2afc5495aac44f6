//! The guest end of the tunnel ([`proto::LISTEN`] and the rest): listeners on
//! [`HOST_ADDR`] whose connections go to the host, connections the host opens to guest
//! ports, and the bytes of both over the agent channel within each side's credit.
//!
//! Each connection has two threads: one reads the socket and sends what the host has
//! room for, one writes what the host sent (never more than this side granted, so
//! nothing piles up here) and grants it again once written.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::network::interface_up;
use super::say;
use super::writer::Writer;
use crate::contract::proto::{self, AgentError};
use crate::contract::{HOST_ADDR, HOST_NAME};
use crate::wire::{Encoder, ErrorCode};

/// The tunnel's listeners and connections.
pub(super) struct Tunnel {
    writer: Writer,
    listeners: Mutex<HashMap<u32, Arc<TcpListener>>>,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
    next_conn: AtomicU32,
    /// Connects in progress, and whether the host closed them meanwhile (it gave up
    /// waiting): such a connection is dropped when it completes, never announced.
    connecting: Mutex<HashMap<u32, bool>>,
    /// Whether [`HOST_ADDR`] is on the loopback interface yet.
    addressed: Mutex<bool>,
}

/// What the writing thread of a connection is given.
enum ToSocket {
    Data(Vec<u8>),
    /// Shut the writing side (the host will send no more).
    Shut,
    /// The connection is gone: stop.
    End,
}

/// One tunnelled connection.
struct Conn {
    stream: TcpStream,
    /// Bytes the host may still take (its grants less what was sent).
    credit: Mutex<u64>,
    credit_cv: Condvar,
    /// What the host sent, for the writing thread.
    to_socket: Sender<ToSocket>,
    /// Bytes the host sent that are not written yet, against this side's grants.
    unwritten: Mutex<u64>,
    closed: AtomicBool,
    /// The host shut its writing side (a second time means nothing).
    shut: AtomicBool,
}

impl Tunnel {
    pub(super) fn new(writer: Writer) -> Tunnel {
        Tunnel {
            writer,
            listeners: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU32::new(1),
            connecting: Mutex::new(HashMap::new()),
            addressed: Mutex::new(false),
        }
    }

    /// Puts [`HOST_ADDR`] on the loopback interface (once): guest programs connect to
    /// it, and with it local no packet for it ever leaves the guest.
    pub(super) fn address(&self) -> Result<(), AgentError> {
        let mut done = self.addressed.lock();
        if !*done {
            interface_up("lo:host", Some((HOST_ADDR, [255, 255, 255, 255]))).map_err(|e| {
                AgentError::new(ErrorCode::Network, format!("put {} on lo: {e}", addr_text(HOST_ADDR)))
            })?;
            *done = true;
        }
        Ok(())
    }

    /// [`proto::LISTEN`] `id`: listens on `port`; answers with the port bound.
    pub(super) fn listen(self: &Arc<Self>, id: u32, port: u16) {
        let bound = self.address().and_then(|()| {
            TcpListener::bind((std::net::Ipv4Addr::from(HOST_ADDR), port)).map_err(|e| {
                with_errno(
                    AgentError::new(
                        ErrorCode::Network,
                        format!("listen on {}:{port}: {e}", addr_text(HOST_ADDR)),
                    ),
                    &e,
                )
            })
        });
        let listener = match bound {
            Ok(l) => Arc::new(l),
            Err(e) => return self.writer.fail(id, &e),
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        self.listeners.lock().insert(id, listener.clone());
        self.writer.ok(id, &port.to_be_bytes());
        let me = self.clone();
        thread::spawn(move || me.accept_loop(id, &listener));
    }

    fn accept_loop(self: &Arc<Self>, id: u32, listener: &TcpListener) {
        loop {
            let accepted = listener.accept();
            if !self.listeners.lock().contains_key(&id) {
                break; // closed (the shutdown that woke us)
            }
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or memory, an aborted connection: the listener
                    // stays; wait a little and go on.
                    say(format_args!("accept on listener {id}: {e}"));
                    thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let conn = self.fresh_conn_id();
            let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut e = Encoder::new();
            e.u32(conn).string(&peer.to_string()).string(&local);
            // The host hears of it before any of its data (which it would drop), and
            // it is registered before that: the host's data may come right after.
            // It starts with a small window: the host grants the rest when its program
            // accepts, so that unaccepted connections hold little there.
            self.adopt(conn, stream, proto::ACCEPT_WINDOW, || {
                self.writer.send(proto::ACCEPTED, id, e.as_bytes())
            });
        }
    }

    /// An id for an accepted connection: bit 31 set, none in use.
    fn fresh_conn_id(&self) -> u32 {
        loop {
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed) | proto::GUEST_CONN_BIT;
            if !self.conns.lock().contains_key(&id) {
                return id;
            }
        }
    }

    /// [`proto::LISTEN_CLOSE`] `id`: stops listener `listener`.
    pub(super) fn close_listener(&self, id: u32, listener: u32) {
        match self.listeners.lock().remove(&listener) {
            Some(l) => {
                // Wakes the accepting thread (accept fails on a shut-down socket).
                // SAFETY: shutdown on a descriptor the listener owns.
                unsafe { nix::libc::shutdown(l.as_raw_fd(), nix::libc::SHUT_RDWR) };
                self.writer.ok(id, &[]);
            }
            None => self.writer.error(id, ErrorCode::InvalidHandle, &format!("no listener {listener}")),
        }
    }

    /// [`proto::CONNECT`] `id`: connects to `address` in the guest, off the read loop (a
    /// full backlog makes a connect wait).
    pub(super) fn connect(self: &Arc<Self>, id: u32, address: String) {
        self.connecting.lock().insert(id, false);
        let me = self.clone();
        thread::spawn(move || {
            let addr: SocketAddr = match address.parse() {
                Ok(a) => a,
                Err(_) => {
                    me.connecting.lock().remove(&id);
                    return me.writer.error(
                        id,
                        ErrorCode::InvalidArgument,
                        &format!("{address:?} is not IP:PORT"),
                    );
                }
            };
            let connected = TcpStream::connect(addr);
            let given_up = me.connecting.lock().remove(&id).unwrap_or(true);
            if given_up {
                return; // the host closed it meanwhile: the stream drops here
            }
            match connected {
                Ok(stream) => {
                    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let mut e = Encoder::new();
                    e.string(&local).string(&addr.to_string());
                    me.adopt(id, stream, proto::CONN_WINDOW, || me.writer.ok(id, e.as_bytes()));
                }
                Err(e) => me.writer.fail(
                    id,
                    &with_errno(
                        AgentError::new(ErrorCode::Network, format!("connect to {addr} in the guest: {e}")),
                        &e,
                    ),
                ),
            }
        });
    }

    /// Makes `stream` connection `id`: registers it, runs `announce` (which tells the
    /// host), then starts its two threads.
    /// `window`: what the host may be sent before it grants more.
    fn adopt(self: &Arc<Self>, id: u32, stream: TcpStream, window: u32, announce: impl FnOnce()) {
        let _ = stream.set_nodelay(true);
        let (tx, rx) = crossbeam_channel::unbounded();
        let conn = Arc::new(Conn {
            stream,
            credit: Mutex::new(window as u64),
            credit_cv: Condvar::new(),
            to_socket: tx,
            unwritten: Mutex::new(0),
            closed: AtomicBool::new(false),
            shut: AtomicBool::new(false),
        });
        self.conns.lock().insert(id, conn.clone());
        announce();
        let (me, c) = (self.clone(), conn.clone());
        thread::spawn(move || me.socket_to_host(id, &c));
        let me = self.clone();
        thread::spawn(move || me.host_to_socket(id, &conn, rx));
    }

    fn socket_to_host(&self, id: u32, c: &Conn) {
        let mut buf = vec![0u8; proto::OUTPUT_CHUNK];
        loop {
            let room = {
                let mut credit = c.credit.lock();
                while *credit == 0 && !c.closed.load(Ordering::SeqCst) {
                    c.credit_cv.wait(&mut credit);
                }
                *credit
            };
            if c.closed.load(Ordering::SeqCst) {
                return drain(c, &mut buf);
            }
            let want = buf.len().min(room as usize);
            let got = (&c.stream).read(&mut buf[..want]);
            if c.closed.load(Ordering::SeqCst) {
                // Closed meanwhile: the host takes nothing more.
                return drain(c, &mut buf);
            }
            match got {
                Ok(0) => {
                    // The guest program shut its writing side: so does the host's.
                    self.writer.send(proto::CONN_DATA, id, &[]);
                    return;
                }
                Ok(n) => {
                    *c.credit.lock() -= n as u64;
                    self.writer.send(proto::CONN_DATA, id, &buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Reset: the host hears of it unless it closed first.
                    if self.forget(id).is_some() {
                        self.writer.send(proto::CONN_CLOSE, id, &[]);
                    }
                    let _ = c.stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    fn host_to_socket(&self, id: u32, c: &Conn, rx: Receiver<ToSocket>) {
        for item in rx {
            match item {
                ToSocket::Data(data) => {
                    if (&c.stream).write_all(&data).is_err() {
                        if self.forget(id).is_some() {
                            self.writer.send(proto::CONN_CLOSE, id, &[]);
                        }
                        // Wakes the reading thread.
                        let _ = c.stream.shutdown(Shutdown::Both);
                        return;
                    }
                    let n = data.len();
                    super::buffers::give(data);
                    *c.unwritten.lock() -= n as u64;
                    if c.closed.load(Ordering::SeqCst) {
                        // Written after the host closed it: nobody to grant.
                        continue;
                    }
                    let mut e = Encoder::new();
                    e.u32(n as u32);
                    self.writer.send(proto::CONN_CREDIT, id, e.as_bytes());
                }
                ToSocket::Shut => {
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
                ToSocket::End => {
                    // Everything the host sent is written: now the end of the stream.
                    // The reading thread drains what the guest program still sends
                    // until it closes too, so that the close is a FIN, not a reset that
                    // would throw away what it has not read yet.
                    let _ = c.stream.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    }

    /// [`proto::CONN_DATA`] from the host for connection `id`.
    /// (The payload is taken as it was read: the writing thread gives it back to
    /// [`super::buffers`] once written, with no copy between.)
    pub(super) fn data(&self, id: u32, data: Vec<u8>) {
        let Some(c) = self.conns.lock().get(&id).cloned() else { return };
        if data.is_empty() {
            if !c.shut.swap(true, Ordering::SeqCst) {
                let _ = c.to_socket.send(ToSocket::Shut);
            }
            return;
        }
        if c.shut.load(Ordering::SeqCst) {
            return; // after its end: nothing to write it to
        }
        // The host is held to the window: more would pile up here without bound.
        let over = {
            let mut unwritten = c.unwritten.lock();
            *unwritten += data.len() as u64;
            *unwritten > proto::CONN_WINDOW as u64
        };
        if over {
            say(format_args!("the host overran connection {id}'s window: closing it"));
            self.abort(id);
            self.writer.send(proto::CONN_CLOSE, id, &[]);
            return;
        }
        let _ = c.to_socket.send(ToSocket::Data(data));
    }

    /// [`proto::CONN_CREDIT`] from the host for connection `id`.
    pub(super) fn credit(&self, id: u32, n: u32) {
        if let Some(c) = self.conns.lock().get(&id) {
            *c.credit.lock() += n as u64;
            c.credit_cv.notify_all();
        }
    }

    /// [`proto::CONN_CLOSE`] from the host: closes connection `id` once what the host
    /// sent before is written (the writing thread ends the stream at the end of its
    /// queue), as a socket's close sends what it holds first; a guest program that takes
    /// none of it for [`LINGER`] loses it. A connect still in progress is dropped when
    /// it completes.
    pub(super) fn close(&self, id: u32) {
        if let Some(given_up) = self.connecting.lock().get_mut(&id) {
            *given_up = true;
            return;
        }
        let Some(c) = self.forget(id) else { return };
        if *c.unwritten.lock() > 0 {
            thread::spawn(move || {
                thread::sleep(LINGER);
                let _ = c.stream.shutdown(Shutdown::Both);
            });
        }
    }

    /// Closes connection `id` at once, dropping what is queued (the host broke its rules).
    fn abort(&self, id: u32) {
        if let Some(c) = self.forget(id) {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    fn forget(&self, id: u32) -> Option<Arc<Conn>> {
        let c = self.conns.lock().remove(&id)?;
        {
            // Under the lock the reading thread checks `closed` in: no lost wakeup.
            let _credit = c.credit.lock();
            c.closed.store(true, Ordering::SeqCst);
            c.credit_cv.notify_all();
        }
        let _ = c.to_socket.send(ToSocket::End);
        Some(c)
    }
}

/// How long a connection the host closed may take to write what the host sent before,
/// or to close after the end of its stream, before it is cut.
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and drops what a guest program still sends on a connection the host closed,
/// until it closes too (or [`LINGER`] passes), then closes the socket.
fn drain(c: &Conn, buf: &mut [u8]) {
    let _ = c.stream.set_read_timeout(Some(LINGER));
    while matches!((&c.stream).read(buf), Ok(n) if n > 0) {}
    let _ = c.stream.shutdown(Shutdown::Both);
}

fn with_errno(mut e: AgentError, io: &std::io::Error) -> AgentError {
    e.errno = io.raw_os_error().unwrap_or(0);
    e
}

fn addr_text(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

/// Adds [`HOST_NAME`] to `/etc/hosts` when it lacks it, so guest programs find the
/// host's listeners by name whether or not the guest has a network.
pub(super) fn name_the_host() {
    let path = "/etc/hosts";
    let now = std::fs::read_to_string(path).unwrap_or_default();
    if now.split_whitespace().any(|w| w == HOST_NAME) {
        return;
    }
    let mut text = now;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{}\t{HOST_NAME}\n", addr_text(HOST_ADDR)));
    // Only a regular file (or none) is written: an image's /etc/hosts may be a link.
    let regular = std::fs::symlink_metadata(path).map_or(true, |m| m.is_file());
    if regular {
        if let Err(e) = std::fs::write(path, text) {
            say(format_args!("cannot name {HOST_NAME} in {path}: {e}"));
        }
    }
}
