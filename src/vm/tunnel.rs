//! The host end of the tunnel (see [`proto::LISTEN`]): listeners in the guest whose
//! connections come to the host, connections to guest ports, each a byte stream over the
//! agent channel within the credit the other side grants.
//!
//! The agent link's reader hands the tunnel's frames to [`Routes::route`]; a
//! [`TunnelListener`] takes its accepted connections from a bounded queue (a host that
//! does not accept gets the guest's connections closed past [`ACCEPT_QUEUE`], never a
//! stalled channel), and a [`TunnelConn`] its bytes from a queue the credit bounds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use super::agent_link::AgentLink;
use crate::contract::proto;
use crate::error::{Error, Result};
use crate::wire::{Decoder, Encoder};

/// Guest connections a listener holds for the host before it turns new ones away.
pub const ACCEPT_QUEUE: usize = 128;

/// Bytes read by the host that are granted back to the guest in one Credit frame (fewer
/// frames; the window stays far larger).
const GRANT_BATCH: u64 = 64 << 10;

/// A guest connection to a listener, as the agent reported it, registered.
struct Accepted {
    id: u32,
    peer: String,
    local: String,
    events: Receiver<Event>,
    send: Arc<SendRoom>,
}

/// What a connection's reader gets.
#[derive(Debug)]
enum Event {
    Data(Vec<u8>),
    /// The guest will send no more.
    Eof,
    /// The guest closed (reset) the connection.
    Closed,
    /// The channel to the guest ended (the VM stopped).
    Ended,
}

/// The host's side of one connection, shared by the reader thread and its users.
struct Slot {
    events: Sender<Event>,
    /// Bytes the guest may still send (what it was granted less what came).
    guest_may_send: u64,
    /// The guest sent the end of its stream.
    eof: bool,
    send: Arc<SendRoom>,
}

/// What the host may send on a connection, and whether it may send at all.
struct SendRoom {
    credit: Mutex<u64>,
    cv: Condvar,
    closed: AtomicBool,
}

impl SendRoom {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.credit.lock();
        self.cv.notify_all();
    }
}

/// The tunnel's listeners and connections, by id, for the agent link's reader.
#[derive(Default)]
pub(crate) struct Routes {
    listeners: Mutex<HashMap<u32, Sender<Accepted>>>,
    conns: Mutex<HashMap<u32, Slot>>,
}

/// What the reader must do after routing a frame.
pub(crate) enum Routed {
    Done,
    /// Tell the guest that connection `id` is closed (the host cannot take it).
    Refuse(u32),
    /// The guest broke the protocol: end the channel.
    Broken(String),
}

impl Routes {
    /// Takes a tunnel frame from the guest.
    pub(crate) fn route(&self, f: proto::Frame) -> Routed {
        match f.ty {
            proto::ACCEPTED => {
                let mut d = Decoder::new(&f.payload);
                let (Ok(id), Ok(peer), Ok(local)) = (d.u32(), d.string(), d.string()) else {
                    return Routed::Broken("a bad Accepted frame".into());
                };
                // The guest picks these ids: never one of ours, never one in use.
                if id & proto::GUEST_CONN_BIT == 0 || self.conns.lock().contains_key(&id) {
                    return Routed::Broken(format!(
                        "Accepted names connection {id:#x}, not a new one of its own"
                    ));
                }
                // Under the lock a listener's close takes: an Accepted is either queued
                // before the close (which then closes it) or refused after.
                let listeners = self.listeners.lock();
                let Some(tx) = listeners.get(&f.id) else { return Routed::Refuse(id) };
                // Registered before it is offered: its data may come next.
                let (events, send) = self.open(id, proto::ACCEPT_WINDOW);
                match tx.try_send(Accepted { id, peer, local, events, send }) {
                    Ok(()) => Routed::Done,
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        drop(listeners);
                        self.forget(id);
                        Routed::Refuse(id)
                    }
                }
            }
            proto::CONN_DATA => {
                let mut conns = self.conns.lock();
                let Some(slot) = conns.get_mut(&f.id) else { return Routed::Done };
                if f.payload.is_empty() {
                    // Once: a guest repeating it must not fill the queue.
                    if !std::mem::replace(&mut slot.eof, true) {
                        let _ = slot.events.send(Event::Eof);
                    }
                    return Routed::Done;
                }
                if slot.eof {
                    return Routed::Broken(format!(
                        "the guest sent data on connection {} after its end",
                        f.id
                    ));
                }
                // The guest is not trusted: beyond its credit we would buffer without bound.
                if f.payload.len() as u64 > slot.guest_may_send {
                    return Routed::Broken(format!("the guest overran connection {}'s window", f.id));
                }
                slot.guest_may_send -= f.payload.len() as u64;
                let _ = slot.events.send(Event::Data(f.payload));
                Routed::Done
            }
            proto::CONN_CREDIT => {
                let n = Decoder::new(&f.payload).u32().unwrap_or(0) as u64;
                if let Some(slot) = self.conns.lock().get(&f.id) {
                    let mut credit = slot.send.credit.lock();
                    *credit = credit.saturating_add(n).min(proto::CONN_WINDOW as u64);
                    slot.send.cv.notify_all();
                }
                Routed::Done
            }
            proto::CONN_CLOSE => {
                self.forget(f.id);
                Routed::Done
            }
            _ => Routed::Done,
        }
    }

    /// Registers connection `id`, which the guest may send `window` bytes before the
    /// host grants more: its events' receiver and its send room.
    fn open(&self, id: u32, window: u32) -> (Receiver<Event>, Arc<SendRoom>) {
        // Unbounded, but never more than the window: `route` enforces it.
        let (tx, rx) = crossbeam_channel::unbounded();
        let send = Arc::new(SendRoom {
            credit: Mutex::new(proto::CONN_WINDOW as u64),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let slot = Slot { events: tx, guest_may_send: window as u64, eof: false, send: send.clone() };
        self.conns.lock().insert(id, slot);
        (rx, send)
    }

    /// Ends connection `id` on this side: its reader gets Closed, its writers wake.
    fn forget(&self, id: u32) -> bool {
        self.forget_with(id, Event::Closed)
    }

    fn forget_with(&self, id: u32, why: Event) -> bool {
        match self.conns.lock().remove(&id) {
            Some(slot) => {
                let _ = slot.events.send(why);
                slot.send.close();
                true
            }
            None => false,
        }
    }

    /// Whether `id` names a listener or a connection (a fresh id must not).
    pub(crate) fn in_use(&self, id: u32) -> bool {
        self.conns.lock().contains_key(&id) || self.listeners.lock().contains_key(&id)
    }

    /// The host read `n` bytes of connection `id`: the guest may send them again.
    fn grant(&self, id: u32, n: u64) {
        if let Some(slot) = self.conns.lock().get_mut(&id) {
            slot.guest_may_send += n;
        }
    }

    /// The channel ended: every listener and connection ends.
    pub(crate) fn end_all(&self) {
        self.listeners.lock().clear();
        let ids: Vec<u32> = self.conns.lock().keys().copied().collect();
        for id in ids {
            self.forget_with(id, Event::Ended);
        }
    }
}

/// Lets the guest send `n` more bytes of connection `id`: counted here before the guest
/// hears of it, since it may send at once.
fn grant(link: &AgentLink, id: u32, n: u32) {
    link.routes().grant(id, n as u64);
    let mut e = Encoder::new();
    e.u32(n);
    link.send_frame(proto::CONN_CREDIT, id, e.as_bytes());
}

/// Where a blocking call stops early: when `cancelled()` turns true (checked every
/// 200 ms), or at `deadline`.
#[derive(Clone, Copy)]
pub struct Wait<'a> {
    /// Gives up when true (a client gone, a close from elsewhere).
    pub cancelled: &'a dyn Fn() -> bool,
    /// Gives up with [`Error::Timeout`] then.
    pub deadline: Option<Instant>,
}

impl std::fmt::Debug for Wait<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wait").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl Wait<'_> {
    /// Waits without end.
    pub const FOREVER: Wait<'static> = Wait { cancelled: &|| false, deadline: None };

    /// Why to stop waiting now, if it is time: cancelled ([`Error::Closed`]) or past the
    /// deadline ([`Error::Timeout`]).
    fn gave_up(&self, op: &str) -> Option<Error> {
        if (self.cancelled)() {
            Some(Error::Closed)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Error::Timeout { op: op.into(), after: Duration::ZERO })
        } else {
            None
        }
    }

    /// How long to block before looking again: 200 ms, less when the deadline is nearer.
    fn step(&self) -> Duration {
        let step = Duration::from_millis(200);
        self.deadline.map_or(step, |d| d.saturating_duration_since(Instant::now()).min(step))
    }

    /// The next item of `rx`; `Ok(None)` when its senders are gone.
    fn recv<T>(&self, rx: &Receiver<T>, op: &str) -> Result<Option<T>> {
        loop {
            if let Some(e) = self.gave_up(op) {
                return Err(e);
            }
            match rx.recv_timeout(self.step()) {
                Ok(v) => return Ok(Some(v)),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }
}

/// A listener in the guest (on [`crate::contract::HOST_ADDR`]).
pub struct TunnelListener {
    id: u32,
    port: u16,
    accepted: Receiver<Accepted>,
    link: AgentLink,
}

impl std::fmt::Debug for TunnelListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelListener").field("port", &self.port).finish_non_exhaustive()
    }
}

impl TunnelListener {
    /// Has the agent listen on `port` (0: any) of [`crate::contract::HOST_ADDR`].
    pub fn listen(link: &AgentLink, port: u16) -> Result<TunnelListener> {
        let id = link.new_id();
        let (tx, accepted) = crossbeam_channel::bounded(ACCEPT_QUEUE);
        // Registered before the request: a guest may connect the moment it listens.
        link.routes().listeners.lock().insert(id, tx);
        let answer =
            link.request_with_id(id, proto::LISTEN, &port.to_be_bytes(), Some(Duration::from_secs(30)));
        let port = match answer.and_then(|p| Decoder::new(&p).u16().map_err(Error::decoding("Listen"))) {
            Ok(p) => p,
            Err(e) => {
                link.routes().listeners.lock().remove(&id);
                if matches!(e, Error::Timeout { .. }) {
                    // It may listen yet: have it stop (its answer goes nowhere).
                    let mut p = Encoder::new();
                    p.u32(id);
                    link.send_frame(proto::LISTEN_CLOSE, link.new_id(), p.as_bytes());
                }
                return Err(e);
            }
        };
        Ok(TunnelListener { id, port, accepted, link: link.clone() })
    }

    /// The port guest programs connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next guest connection, with its peer and local addresses; `Ok(None)` once the
    /// listener is closed; the channel's error once the VM ended.
    pub fn accept(&self, wait: Wait<'_>) -> Result<Option<(TunnelConn, String, String)>> {
        match wait.recv(&self.accepted, "accept")? {
            Some(a) => {
                // Its program takes it now: the rest of the window.
                grant(&self.link, a.id, proto::CONN_WINDOW - proto::ACCEPT_WINDOW);
                Ok(Some((TunnelConn::new(&self.link, a.id, a.events, a.send), a.peer, a.local)))
            }
            None if !self.link.is_alive() => Err(self.link.ended_error("accept")),
            None => Ok(None),
        }
    }

    /// Forgets the listener on this side only (the VM is going away).
    pub fn forget(&self) {
        self.link.routes().listeners.lock().remove(&self.id);
        while let Ok(a) = self.accepted.try_recv() {
            TunnelConn::new(&self.link, a.id, a.events, a.send).forget();
        }
    }

    /// Stops listening: a pending [`TunnelListener::accept`] returns `None`, and the
    /// connections not accepted yet are closed.
    pub fn close(&self) -> Result<()> {
        let was = self.link.routes().listeners.lock().remove(&self.id).is_some();
        while let Ok(a) = self.accepted.try_recv() {
            TunnelConn::new(&self.link, a.id, a.events, a.send).close();
        }
        if was && self.link.is_alive() {
            let mut e = Encoder::new();
            e.u32(self.id);
            self.link.request(proto::LISTEN_CLOSE, e.as_bytes(), Some(Duration::from_secs(30)))?;
        }
        Ok(())
    }
}

impl Drop for TunnelListener {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// One connection between a host program and a guest program.
pub struct TunnelConn {
    id: u32,
    link: AgentLink,
    events: Receiver<Event>,
    send: Arc<SendRoom>,
    /// Bytes received and not read yet, and what is owed back to the guest.
    read: Mutex<ReadState>,
    closed: AtomicBool,
}

#[derive(Default)]
struct ReadState {
    /// Chunks received and not read yet; `taken` bytes of the first are read.
    pending: VecDeque<Vec<u8>>,
    taken: usize,
    owed: u64,
    eof: bool,
    reset: bool,
    /// The channel ended: once what came before is read, reads fail.
    ended: bool,
}

impl ReadState {
    fn take_event(&mut self, ev: Event) {
        match ev {
            Event::Data(d) => self.pending.push_back(d),
            Event::Eof => self.eof = true,
            Event::Closed => self.reset = true,
            Event::Ended => self.ended = true,
        }
    }

    /// Up to `max` of the bytes received, in one piece (a whole chunk without a copy
    /// when it is all that is asked for).
    fn take(&mut self, max: usize) -> Vec<u8> {
        let first = self.pending.front().map_or(0, |c| c.len() - self.taken);
        if self.taken == 0 && first <= max && self.pending.len() == 1 {
            return self.pending.pop_front().unwrap_or_default();
        }
        let mut out = Vec::with_capacity(max.min(self.pending.iter().map(Vec::len).sum::<usize>()));
        while out.len() < max {
            let Some(front) = self.pending.front() else { break };
            let n = (max - out.len()).min(front.len() - self.taken);
            out.extend_from_slice(&front[self.taken..self.taken + n]);
            self.taken += n;
            if self.taken == front.len() {
                self.pending.pop_front();
                self.taken = 0;
            }
        }
        out
    }
}

impl std::fmt::Debug for TunnelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConn").field("id", &self.id).finish_non_exhaustive()
    }
}

impl TunnelConn {
    fn new(link: &AgentLink, id: u32, events: Receiver<Event>, send: Arc<SendRoom>) -> TunnelConn {
        TunnelConn {
            id,
            link: link.clone(),
            events,
            send,
            read: Mutex::new(ReadState::default()),
            closed: AtomicBool::new(false),
        }
    }

    /// Connects to `address` (`IP:PORT` as the guest sees it) in the guest; returns the
    /// connection and the guest socket's local and peer addresses.
    pub fn connect(link: &AgentLink, address: &str) -> Result<(TunnelConn, String, String)> {
        let id = link.new_id();
        let (events, send) = link.routes().open(id, proto::CONN_WINDOW);
        let mut e = Encoder::new();
        e.string(address);
        let answer = link.request_with_id(id, proto::CONNECT, e.as_bytes(), Some(Duration::from_secs(60)));
        let (local, peer) = match answer.and_then(|p| {
            let mut d = Decoder::new(&p);
            d.string().and_then(|l| Ok((l, d.string()?))).map_err(Error::decoding("Connect"))
        }) {
            Ok(a) => a,
            Err(e) => {
                link.routes().forget(id);
                // A connect it still makes (the wait timed out) is dropped when done.
                link.send_frame(proto::CONN_CLOSE, id, &[]);
                return Err(e);
            }
        };
        Ok((TunnelConn::new(link, id, events, send), local, peer))
    }

    /// Up to `max` bytes; empty at the end of the stream. An error when the guest reset
    /// the connection or the VM ended.
    pub fn read(&self, max: usize, wait: Wait<'_>) -> Result<Vec<u8>> {
        // Another read of the same connection may hold it: wait for it as for bytes,
        // within the same deadline and cancellation.
        let mut st = loop {
            if let Some(st) = self.read.try_lock_for(wait.step()) {
                break st;
            }
            if let Some(e) = wait.gave_up("read") {
                return Err(e);
            }
        };
        while st.pending.is_empty() && !st.eof && !st.reset && !st.ended {
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            match wait.recv(&self.events, "read")? {
                Some(ev) => st.take_event(ev),
                None => st.ended = true,
            }
        }
        // What else has come meanwhile goes out in the same answer (what came before the
        // channel's end is read first; the end after).
        while !st.ended {
            match self.events.try_recv() {
                Ok(ev) => st.take_event(ev),
                Err(_) => break,
            }
        }
        if st.pending.is_empty() && st.ended && !st.eof {
            return Err(self.link.ended_error("read"));
        }
        if st.pending.is_empty() {
            if st.reset && !st.eof {
                return Err(Error::io(
                    "read",
                    "guest connection",
                    std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                ));
            }
            return Ok(Vec::new());
        }
        let out = st.take(max);
        st.owed += out.len() as u64;
        if st.owed >= GRANT_BATCH || st.pending.is_empty() {
            let owed = std::mem::take(&mut st.owed);
            drop(st);
            grant(&self.link, self.id, owed as u32);
        }
        Ok(out)
    }

    /// Writes `data` as the guest takes it (blocks while its window is full): all of it,
    /// or, when `wait` gives up after some was sent, how much was.
    pub fn write(&self, data: &[u8], wait: Wait<'_>) -> Result<usize> {
        let mut sent = 0;
        while sent < data.len() {
            let n = {
                let mut credit = self.send.credit.lock();
                loop {
                    if self.send.closed.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
                        return Err(Error::io(
                            "write",
                            "guest connection",
                            std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                        ));
                    }
                    if *credit > 0 {
                        break;
                    }
                    match wait.gave_up("write") {
                        Some(_) if sent > 0 => return Ok(sent),
                        Some(e) => return Err(e),
                        None => {}
                    }
                    self.send.cv.wait_for(&mut credit, wait.step());
                }
                let n = (data.len() - sent).min(*credit as usize).min(proto::OUTPUT_CHUNK);
                *credit -= n as u64;
                n
            };
            self.link.send_frame(proto::CONN_DATA, self.id, &data[sent..sent + n]);
            sent += n;
        }
        Ok(sent)
    }

    /// Shuts the writing side: the guest program reads the end of the stream.
    pub fn shutdown_write(&self) {
        if !self.closed.load(Ordering::SeqCst) {
            self.link.send_frame(proto::CONN_DATA, self.id, &[]);
        }
    }

    /// Forgets the connection on this side only (the VM is going away).
    pub fn forget(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.link.routes().forget(self.id);
    }

    /// Closes the connection: the guest program sees it closed.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) && self.link.routes().forget(self.id) {
            self.link.send_frame(proto::CONN_CLOSE, self.id, &[]);
        }
    }
}

impl Drop for TunnelConn {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u16, id: u32, payload: Vec<u8>) -> proto::Frame {
        proto::Frame { ty, id, payload }
    }

    fn accepted(conn: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(conn).string("10.42.0.1:5000").string("10.42.0.1:80");
        e.as_bytes().to_vec()
    }

    /// A guest breaking the tunnel's rules ends the channel or is refused; it never makes
    /// the host buffer beyond the window it granted.
    #[test]
    fn a_hostile_guest_is_held_to_the_window_and_the_ids() {
        let routes = Routes::default();
        let (tx, rx) = crossbeam_channel::bounded(2);
        routes.listeners.lock().insert(7, tx);
        let conn = proto::GUEST_CONN_BIT | 1;
        assert!(matches!(routes.route(frame(proto::ACCEPTED, 7, accepted(conn))), Routed::Done));
        // An id of the host's range, or one in use: broken.
        assert!(matches!(routes.route(frame(proto::ACCEPTED, 7, accepted(5))), Routed::Broken(_)));
        assert!(matches!(routes.route(frame(proto::ACCEPTED, 7, accepted(conn))), Routed::Broken(_)));
        // To a listener that is not there: refused.
        let other = proto::GUEST_CONN_BIT | 2;
        assert!(
            matches!(routes.route(frame(proto::ACCEPTED, 9, accepted(other)), ), Routed::Refuse(id) if id == other)
        );
        // Past the queue: refused, and forgotten.
        assert!(matches!(routes.route(frame(proto::ACCEPTED, 7, accepted(other))), Routed::Done));
        let third = proto::GUEST_CONN_BIT | 3;
        assert!(
            matches!(routes.route(frame(proto::ACCEPTED, 7, accepted(third))), Routed::Refuse(id) if id == third)
        );
        assert!(!routes.in_use(third));
        // Before its program accepts it, a connection may send ACCEPT_WINDOW, no more.
        let a = rx.recv().unwrap();
        let chunk = vec![0u8; proto::ACCEPT_WINDOW as usize];
        assert!(matches!(routes.route(frame(proto::CONN_DATA, conn, chunk)), Routed::Done));
        assert!(matches!(routes.route(frame(proto::CONN_DATA, conn, vec![1])), Routed::Broken(_)));
        // Its end once: repeated ends are not queued; data after the end is broken.
        let b = rx.recv().unwrap();
        for _ in 0..1000 {
            assert!(matches!(routes.route(frame(proto::CONN_DATA, other, vec![])), Routed::Done));
        }
        assert_eq!(b.events.len(), 1, "one end queued");
        assert!(matches!(routes.route(frame(proto::CONN_DATA, other, vec![1])), Routed::Broken(_)));
        // The channel's end wakes every connection with Ended.
        routes.end_all();
        assert!(matches!(a.events.try_iter().last(), Some(Event::Ended)));
        assert!(routes.listeners.lock().is_empty());
    }
}
