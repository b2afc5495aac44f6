//! Connections between host programs and guest programs, like [`std::net`]: a
//! [`Listener`] in the guest that guest programs connect to (at `host.internal:PORT`,
//! that is `10.42.0.1:PORT`), and [`Instance::connect`](super::instance::Instance::connect)
//! to a port a guest program listens on. No socket is opened on the host's network; the
//! bytes go over the agent's channel, so no network device is needed either.
//!
//! Both types are `Sync` and their methods take `&self`: one thread may block in
//! [`Listener::accept`] or a read while others write, read or close. Reads return 0 at
//! the end of the stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::transport::{answer, Transport};
use crate::error::Result;
use crate::wire::{self, Request};

/// The most one read asks the helper for.
const READ_CHUNK: usize = 1 << 20;
/// The most one write sends to the helper.
const WRITE_CHUNK: usize = 1 << 20;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// A listener in the guest, like [`std::net::TcpListener`]: guest programs connect to
/// [`Listener::local_addr`] (`10.42.0.1:PORT`, also `host.internal:PORT`). Closed on drop.
///
/// ```no_run
/// use std::io::{Read, Write};
/// use vmhost::{Image, Instance, InstanceOptions};
///
/// let vm = Instance::new(Image::Default, InstanceOptions::default())?;
/// let listener = vm.listen(":8080")?;
/// let guest = vm.command("sh").arg("-c").arg("echo hello | nc host.internal 8080").spawn()?;
/// let (mut conn, _) = listener.accept()?;
/// let mut got = String::new();
/// conn.read_to_string(&mut got)?;
/// assert_eq!(got, "hello\n");
/// # drop(guest);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Listener<'a> {
    t: &'a Transport,
    handle: u64,
    local: SocketAddr,
    closed: AtomicBool,
}

impl<'a> Listener<'a> {
    pub(super) fn bind(t: &'a Transport, address: &str) -> Result<Listener<'a>> {
        let handle = answer!(
            t,
            Request::NetListen { network: "tcp".into(), address: address.into() },
            NetListen { handle }
        );
        let local = answer!(t, Request::ListenerAddr { handle }, ListenerAddr { address });
        Ok(Listener { t, handle, local: addr(&local), closed: AtomicBool::new(false) })
    }

    /// The address guest programs connect to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// The next connection a guest program made, and its address. Blocks until one
    /// comes; an error once the listener is closed (by [`Listener::close`] from another
    /// thread, or the instance's end).
    pub fn accept(&self) -> io::Result<(Conn<'a>, SocketAddr)> {
        let handle =
            answer!(self.t, Request::ListenerAccept { handle: self.handle }, ListenerAccept { handle });
        let conn = Conn::from_handle(self.t, handle)?;
        let peer = conn.peer;
        Ok((conn, peer))
    }

    /// The connections as they come, like [`std::net::TcpListener::incoming`].
    pub fn incoming(&self) -> Incoming<'_, 'a> {
        Incoming { listener: self }
    }

    /// Stops listening: a pending [`Listener::accept`] (on another thread) returns an
    /// error, and guest programs' connections are refused.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.t.call(&Request::ListenerClose { handle: self.handle })
    }
}

impl Drop for Listener<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::debug!("closing listener {}: {e}", self.local);
        }
    }
}

impl std::fmt::Debug for Listener<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("addr", &self.local).field("handle", &self.handle).finish()
    }
}

/// The connections of a [`Listener`], as they come.
#[derive(Debug)]
pub struct Incoming<'l, 'a> {
    listener: &'l Listener<'a>,
}

impl<'a> Iterator for Incoming<'_, 'a> {
    type Item = io::Result<Conn<'a>>;
    fn next(&mut self) -> Option<io::Result<Conn<'a>>> {
        Some(self.listener.accept().map(|(c, _)| c))
    }
}

/// A connection between this program and a guest program, like
/// [`std::net::TcpStream`]: `Read` and `Write` (on `&Conn` too, for use from several
/// threads), [`Conn::shutdown`]. Closed on drop.
pub struct Conn<'a> {
    t: &'a Transport,
    handle: u64,
    local: SocketAddr,
    peer: SocketAddr,
    closed: AtomicBool,
    /// Read and write timeouts, as last set.
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
}

impl<'a> Conn<'a> {
    pub(super) fn from_handle(t: &'a Transport, handle: u64) -> Result<Conn<'a>> {
        let local = answer!(t, Request::ConnLocalAddr { handle }, ConnLocalAddr { address });
        let peer = answer!(t, Request::ConnRemoteAddr { handle }, ConnRemoteAddr { address });
        Ok(Conn {
            t,
            handle,
            local: addr(&local),
            peer: addr(&peer),
            closed: AtomicBool::new(false),
            timeouts: Mutex::new((None, None)),
        })
    }

    pub(super) fn connect(t: &'a Transport, port: u16) -> Result<Conn<'a>> {
        let handle = answer!(
            t,
            Request::NetConnect { network: "tcp".into(), address: format!("127.0.0.1:{port}") },
            NetConnect { handle }
        );
        Conn::from_handle(t, handle).inspect_err(|_| {
            let _ = t.call(&Request::ConnClose { handle });
        })
    }

    /// This end's address: for a guest program's connection to a [`Listener`], the
    /// listener's; for [`Instance::connect`](super::instance::Instance::connect), the guest
    /// socket's that stands in for this program.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// The guest program's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }

    /// Shuts the writing side (the guest program reads the end of the stream), or all
    /// of it (closes the connection), like [`std::net::TcpStream::shutdown`]. The reading
    /// side alone cannot be shut.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match how {
            Shutdown::Write => Ok(self.t.call(&Request::ConnCloseWrite { handle: self.handle })?),
            Shutdown::Both => Ok(self.close_now()?),
            Shutdown::Read => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a guest connection's reading side cannot be shut",
            )),
        }
    }

    /// How long a read waits for bytes before failing with [`io::ErrorKind::TimedOut`]
    /// (`None`: without end), like [`std::net::TcpStream::set_read_timeout`]; a zero
    /// duration is refused. A read that times out loses nothing.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let mut t = self.timeouts.lock();
        self.set_timeouts(timeout, t.1)?;
        t.0 = timeout;
        Ok(())
    }

    /// How long a write waits for the guest to take bytes before failing with
    /// [`io::ErrorKind::TimedOut`] (or returning how many it took).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let mut t = self.timeouts.lock();
        self.set_timeouts(t.0, timeout)?;
        t.1 = timeout;
        Ok(())
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.timeouts.lock().0)
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.timeouts.lock().1)
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        let ms = |d: Option<Duration>| -> io::Result<u32> {
            match d {
                None => Ok(0),
                Some(d) if d.is_zero() => {
                    Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero timeout (use None for none)"))
                }
                Some(d) => Ok(d.as_millis().clamp(1, u32::MAX as u128) as u32),
            }
        };
        let req = Request::ConnSetTimeouts { handle: self.handle, read_ms: ms(read)?, write_ms: ms(write)? };
        Ok(self.t.call(&req)?)
    }

    fn close_now(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.t.call(&Request::ConnClose { handle: self.handle })
    }

    /// Closes it, reporting any error.
    pub fn close(self) -> Result<()> {
        self.close_now()
    }

    fn read_some(&self, max: usize) -> Result<Vec<u8>> {
        let max = max.min(READ_CHUNK) as u32;
        Ok(answer!(self.t, Request::ConnRead { handle: self.handle, max }, ConnRead { data }))
    }

    fn write_some(&self, data: &[u8]) -> Result<usize> {
        let data = data[..data.len().min(WRITE_CHUNK)].to_vec();
        let written =
            answer!(self.t, Request::ConnWrite { handle: self.handle, data }, ConnWrite { written });
        Ok(written as usize)
    }
}

impl Read for &Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let data = self.read_some(buf.len())?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(self.write_some(buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // each write is sent as it is made
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.close_now() {
            log::debug!("closing connection to {}: {e}", self.peer);
        }
    }
}

impl std::fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .field("handle", &self.handle)
            .finish()
    }
}
