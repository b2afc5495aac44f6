//! Progress of long work (kernel download, image unpacking, boot): shown on a terminal,
//! quiet otherwise (then only logged).

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Reports steps of long work to the user.
#[derive(Debug, Clone)]
pub struct Progress {
    enabled: bool,
    start: Instant,
}

impl Progress {
    /// Shown when stderr is a terminal.
    pub fn auto() -> Progress {
        Progress { enabled: std::io::stderr().is_terminal(), start: Instant::now() }
    }

    /// Never shown (only logged).
    pub fn quiet() -> Progress {
        Progress { enabled: false, start: Instant::now() }
    }

    /// Whether steps are shown.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Reports one step.
    pub fn step(&self, what: &str) {
        log::info!("{what}");
        if self.enabled {
            let _ =
                writeln!(std::io::stderr(), "vmhost: [{:5.1}s] {what}", self.start.elapsed().as_secs_f64());
        }
    }
}
