//! A table of handles: the helper's commands, files and pipes by the numbers it gives
//! its clients.

use std::collections::{HashMap, HashSet};

use crate::wire::{ErrorCode, ErrorFrame};

/// A table of handles of one kind. Handles come from one counter shared by every table,
/// starting at 1; a handle this table gave out and took back is "already closed", any
/// other unknown one is "invalid".
pub(crate) struct Table<T> {
    live: HashMap<u64, T>,
    freed: HashSet<u64>,
}

impl<T: Clone> Table<T> {
    pub(crate) fn new() -> Table<T> {
        Table { live: HashMap::new(), freed: HashSet::new() }
    }

    pub(crate) fn insert(&mut self, h: u64, v: T) {
        self.live.insert(h, v);
    }

    pub(crate) fn get(&self, h: u64, what: &str) -> Result<T, ErrorFrame> {
        match self.live.get(&h) {
            Some(v) => Ok(v.clone()),
            None if self.freed.contains(&h) => Err(ErrorFrame::new(
                ErrorCode::AlreadyClosed,
                "",
                format!("{what} handle {h} was already freed"),
            )),
            None => Err(ErrorFrame::new(ErrorCode::InvalidHandle, "", format!("no {what} with handle {h}"))),
        }
    }

    /// Whether `h` was given out by this table (and is live or taken back).
    pub(crate) fn knows(&self, h: u64) -> bool {
        self.live.contains_key(&h) || self.freed.contains(&h)
    }

    /// Every live handle's value, taken out.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let all: Vec<(u64, T)> = self.live.drain().collect();
        all.into_iter()
            .map(|(h, v)| {
                self.freed.insert(h);
                v
            })
            .collect()
    }

    /// Whether `h` was given out by this table and taken back.
    pub(crate) fn was_freed(&self, h: u64) -> bool {
        self.freed.contains(&h)
    }

    pub(crate) fn remove(&mut self, h: u64, what: &str) -> Result<T, ErrorFrame> {
        let v = self.get(h, what)?;
        self.live.remove(&h);
        // Remembered to tell "already closed" from "invalid"; bounded, so that a
        // long-lived helper does not grow (beyond it, old handles read as invalid).
        if self.freed.len() >= 1 << 16 {
            self.freed.clear();
        }
        self.freed.insert(h);
        Ok(v)
    }
}
