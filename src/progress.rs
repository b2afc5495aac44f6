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

/// Progress bars, one line each, for work done side by side (a pull's layers, as
/// `docker pull` shows them): redrawn in place on a terminal at most ten times a
/// second; on anything else only the finished lines are logged.
#[derive(Debug)]
pub struct Bars {
    enabled: bool,
    state: parking_lot::Mutex<BarsState>,
}

#[derive(Debug)]
struct BarsState {
    bars: Vec<Bar>,
    /// Lines drawn last time (to move back over them).
    drawn: usize,
    last: Option<Instant>,
}

#[derive(Debug)]
struct Bar {
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    status: Option<String>,
}

impl Bars {
    /// Bars shown when `progress` shows steps.
    pub fn new(progress: &Progress) -> Bars {
        Bars {
            enabled: progress.enabled(),
            state: parking_lot::Mutex::new(BarsState { bars: Vec::new(), drawn: 0, last: None }),
        }
    }

    /// A new bar: `label`, out of `total` bytes when known. Returns its index.
    pub fn add(&self, label: &str, total: Option<u64>) -> usize {
        let mut st = self.state.lock();
        st.bars.push(Bar { label: label.into(), total, done: 0, started: Instant::now(), status: None });
        st.bars.len() - 1
    }

    /// Bar `i` has done `done` bytes.
    pub fn set(&self, i: usize, done: u64) {
        let mut st = self.state.lock();
        if let Some(b) = st.bars.get_mut(i) {
            b.done = done;
        }
        let due = st.last.is_none_or(|t| t.elapsed().as_millis() >= 100);
        if self.enabled && due {
            self.draw(&mut st);
        }
    }

    /// Bar `i` is finished with `status` ("Pull complete", "Already exists").
    pub fn finish(&self, i: usize, status: &str) {
        let mut st = self.state.lock();
        if let Some(b) = st.bars.get_mut(i) {
            b.status = Some(status.into());
            log::info!("{}: {status}", b.label);
        }
        if self.enabled {
            self.draw(&mut st);
        }
    }

    fn draw(&self, st: &mut BarsState) {
        let mut out = String::new();
        if st.drawn > 0 {
            out.push_str(&format!("\x1b[{}F", st.drawn));
        }
        for b in &st.bars {
            let line = match &b.status {
                Some(s) => format!("{}: {s}", b.label),
                None => {
                    let secs = b.started.elapsed().as_secs_f64().max(0.001);
                    let rate = b.done as f64 / secs;
                    match b.total {
                        Some(t) => format!(
                            "{}: Downloading {} / {} ({}/s)",
                            b.label,
                            human(b.done),
                            human(t),
                            human(rate as u64)
                        ),
                        None => {
                            format!("{}: Downloading {} ({}/s)", b.label, human(b.done), human(rate as u64))
                        }
                    }
                }
            };
            out.push_str(&line);
            out.push_str("\x1b[K\n");
        }
        st.drawn = st.bars.len();
        st.last = Some(Instant::now());
        let _ = std::io::stderr().write_all(out.as_bytes());
    }
}

/// Bytes for people: `12.3 MB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
