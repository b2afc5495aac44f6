//! Notices clients that go away while their request is being served.
//!
//! A connection serves one request at a time and reads nothing while a handler runs, so
//! a client that dies during a long call (a command's Wait, a streaming run) would go
//! unnoticed until the answer is written: its guest process would run on and the helper
//! would never become idle. One watcher thread per server polls the connections that
//! are inside a handler for hang-up and raises their [`Call`](super::Call)'s cancel flag;
//! blocking handlers check it.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

struct Entry {
    id: u64,
    stream: Arc<UnixStream>,
    flag: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    entries: Mutex<Vec<Entry>>,
    wake: Condvar,
    next: AtomicU64,
    started: AtomicBool,
}

/// The watcher of one server.
#[derive(Default)]
pub(crate) struct Watcher {
    shared: Arc<Shared>,
}

/// Keeps a connection watched; dropping it stops watching.
pub(crate) struct Guard {
    id: u64,
    flag: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Guard {
    /// The flag raised when the client hangs up.
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.flag
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.entries.lock().retain(|e| e.id != self.id);
    }
}

impl Watcher {
    /// Watches `stream` until the guard is dropped. If the stream cannot be cloned the
    /// guard's flag simply never rises.
    pub(crate) fn watch(&self, stream: &UnixStream) -> Guard {
        let flag = Arc::new(AtomicBool::new(false));
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            self.shared.entries.lock().push(Entry { id, stream: Arc::new(clone), flag: flag.clone() });
            self.shared.wake.notify_one();
            if !self.shared.started.swap(true, Ordering::SeqCst) {
                let weak = Arc::downgrade(&self.shared);
                let _ = std::thread::Builder::new().name("vmhost-hangup".into()).spawn(move || run(weak));
            }
        }
        Guard { id, flag, shared: self.shared.clone() }
    }
}

fn run(weak: Weak<Shared>) {
    use nix::libc;
    use std::os::fd::AsRawFd;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let snapshot: Vec<(Arc<UnixStream>, Arc<AtomicBool>)> = {
            let mut entries = shared.entries.lock();
            if entries.is_empty() {
                shared.wake.wait_for(&mut entries, Duration::from_secs(1));
            }
            entries.iter().map(|e| (e.stream.clone(), e.flag.clone())).collect()
        };
        drop(shared);
        if snapshot.is_empty() {
            continue;
        }
        // libc's poll, not nix's: nix drops revents that carry POLLRDHUP, a bit its
        // flag type does not know.
        let mut fds: Vec<libc::pollfd> = snapshot
            .iter()
            .map(|(s, _)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLRDHUP | libc::POLLHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd whose descriptors `snapshot` keeps open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n > 0 {
            for (fd, (_, flag)) in fds.iter().zip(&snapshot) {
                if fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
        // Raised flags stay raised; their entries go when the handlers finish.
        std::thread::sleep(Duration::from_millis(50));
    }
}
