//! [`Console`]: the instance's console size (InstanceSetConsole) and the commands
//! running on a terminal, which follow it.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::vm::agent_link::Process;

/// The console's size and the live terminals sized by it.
pub(super) struct Console {
    size: Mutex<(u16, u16)>,
    ttys: Mutex<Vec<Weak<Process>>>,
}

impl Default for Console {
    fn default() -> Console {
        Console { size: Mutex::new((80, 24)), ttys: Mutex::new(Vec::new()) }
    }
}

impl Console {
    /// Columns and rows.
    pub(super) fn size(&self) -> (u16, u16) {
        *self.size.lock()
    }

    /// Sets the size and resizes every live terminal.
    pub(super) fn resize(&self, cols: u16, rows: u16) {
        *self.size.lock() = (cols, rows);
        let live: Vec<Arc<Process>> = self.ttys.lock().iter().filter_map(Weak::upgrade).collect();
        for p in live {
            if let Err(e) = p.resize(cols, rows) {
                log::debug!("resizing a guest terminal: {e}"); // it may just have exited
            }
        }
    }

    /// Registers a process started on a terminal of size `started_at`: it follows the
    /// console from now on, and catches up with a resize that came during its start.
    pub(super) fn attach(&self, p: &Arc<Process>, started_at: Option<(u16, u16)>) {
        let mut ttys = self.ttys.lock();
        ttys.retain(|w| w.strong_count() > 0);
        ttys.push(Arc::downgrade(p));
        drop(ttys);
        let now = self.size();
        if Some(now) != started_at {
            let _ = p.resize(now.0, now.1);
        }
    }
}
