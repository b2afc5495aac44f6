//! [`Session`]: what the helper keeps of an instance apart from its VM.

use std::sync::Arc;

use parking_lot::Mutex;

use super::command::Cmd;
use super::console::Console;
use super::table::Table;

/// What the helper keeps of an instance apart from its VM: the user its commands run
/// as, its tables of handles, its console. The Cmd*, Fs* and File* handlers serve
/// against a session and an agent link, with or without a guest behind the link.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) cmds: Mutex<Table<Arc<Cmd>>>,
    pub(super) files: super::fs::Files,
    pub(super) console: Console,
}

impl Session {
    pub(super) fn new(user: String) -> Session {
        Session {
            user,
            cmds: Mutex::new(Table::new()),
            files: Mutex::new(Table::new()),
            console: Console::default(),
        }
    }
}
