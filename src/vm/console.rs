//! The guest's serial console as every backend keeps it: the last [`TAIL`] bytes in
//! memory (for error messages), up to [`LOG_MAX`] bytes in `console.log`, and a copy on
//! our stderr in dmesg mode.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use parking_lot::Mutex;

use crate::status::VmEnd;

/// The longest partial line kept while scanning for the kernel's last words (longer
/// lines keep their end: the markers are short and end lines).
const LINE_MAX: usize = 512;

/// Called with each end the guest kernel announces on its console.
pub type EndHook = Box<dyn Fn(ConsoleEnd) + Send + Sync>;

/// How much of the console is kept in memory for error messages.
pub const TAIL: usize = 64 << 10;
/// How much of the console goes to `console.log` (a guest may print without end, and
/// the run directory is usually in RAM).
pub const LOG_MAX: u64 = 8 << 20;

struct LogFile {
    file: Option<File>,
    written: u64,
}

/// One VM's console output.
pub struct ConsoleLog {
    tail: Mutex<VecDeque<u8>>,
    log: Mutex<LogFile>,
    dmesg: bool,
    /// The line being received, and the last end the kernel announced.
    scan: Mutex<(Vec<u8>, Option<ConsoleEnd>)>,
    on_end: std::sync::OnceLock<EndHook>,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLog").finish_non_exhaustive()
    }
}

impl ConsoleLog {
    /// A console log writing `path` (when it can be created), copying to stderr when
    /// `dmesg`.
    pub fn new(path: Option<&Path>, dmesg: bool) -> ConsoleLog {
        let file = path.and_then(|p| File::create(p).ok());
        ConsoleLog {
            tail: Mutex::new(VecDeque::new()),
            log: Mutex::new(LogFile { file, written: 0 }),
            dmesg,
            scan: Mutex::new((Vec::new(), None)),
            on_end: std::sync::OnceLock::new(),
        }
    }

    /// Has `hook` called with each end the guest kernel announces (halt, power-off,
    /// restart, panic), from the thread that reads the console. Set once.
    pub fn on_end(&self, hook: EndHook) {
        let _ = self.on_end.set(hook);
    }

    /// The last end the guest kernel announced on its console.
    pub fn last_end(&self) -> Option<ConsoleEnd> {
        self.scan.lock().1
    }

    /// Scans complete lines for the kernel's last words.
    fn scan(&self, data: &[u8]) {
        let mut found = Vec::new();
        {
            let mut scan = self.scan.lock();
            let (line, last) = &mut *scan;
            for chunk in data.split_inclusive(|&b| b == b'\n') {
                line.extend_from_slice(chunk);
                if line.len() > LINE_MAX {
                    line.drain(..line.len() - LINE_MAX);
                }
                if line.ends_with(b"\n") {
                    if let Some(end) = ConsoleEnd::in_line(line) {
                        *last = Some(end);
                        found.push(end);
                    }
                    line.clear();
                }
            }
        }
        if let Some(hook) = self.on_end.get() {
            for end in found {
                hook(end);
            }
        }
    }

    /// Takes in what the guest printed.
    pub fn append(&self, data: &[u8]) {
        self.scan(data);
        {
            let mut tail = self.tail.lock();
            tail.extend(data);
            let excess = tail.len().saturating_sub(TAIL);
            tail.drain(..excess);
        }
        let mut log = self.log.lock();
        let room = LOG_MAX.saturating_sub(log.written) as usize;
        let n = data.len().min(room);
        if let Some(f) = log.file.as_mut() {
            let _ = f.write_all(&data[..n]);
        }
        log.written += n as u64;
        if log.written >= LOG_MAX {
            if let Some(mut f) = log.file.take() {
                let _ = f.write_all(b"\n[vmhost: console log truncated here; the rest is not kept]\n");
            }
        }
        drop(log);
        if self.dmesg {
            let _ = std::io::stderr().write_all(data);
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let text: Vec<u8> = self.tail.lock().iter().copied().collect();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// What a boot error shows of the console, on lines of its own: from the kernel's
    /// panic line when there is one (its stack trace follows it), else the last lines;
    /// or that the guest printed nothing.
    pub fn boot_excerpt(&self) -> String {
        let all = self.tail(200);
        let lines: Vec<&str> = all.lines().collect();
        let from = lines
            .iter()
            .rposition(|l| l.contains("Kernel panic"))
            .map_or(lines.len().saturating_sub(25), |i| i.min(lines.len().saturating_sub(12)));
        let excerpt = lines[from..lines.len().min(from + 40)].join("\n");
        if excerpt.trim().is_empty() {
            "\nthe guest console stayed empty".into()
        } else {
            format!("\nlast console lines:\n{}", excerpt.trim_end())
        }
    }
}

/// A [`Write`] into a shared [`ConsoleLog`], for device models that print.
#[derive(Debug)]
pub struct ConsoleWriter(pub std::sync::Arc<ConsoleLog>);

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.append(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the guest kernel says on its console as it ends the machine, in the order it
/// says it: these lines are printed at the highest level (KERN_EMERG), so `quiet` and
/// `loglevel=1` keep them. Only the kernel and guest root can write the console, and a
/// guest that fakes one only ends its own VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// `reboot: System halted` (halt, and power-off without power-off hardware).
    Halted,
    /// `reboot: Power down`.
    PowerDown,
    /// `reboot: Restarting system`.
    Restarting,
    /// `Kernel panic - not syncing`.
    Panic,
}

impl ConsoleEnd {
    /// The marker a console line carries, if any.
    pub fn in_line(line: &[u8]) -> Option<ConsoleEnd> {
        const MARKERS: [(&[u8], ConsoleEnd); 4] = [
            (b"reboot: System halted", ConsoleEnd::Halted),
            (b"reboot: Power down", ConsoleEnd::PowerDown),
            (b"reboot: Restarting system", ConsoleEnd::Restarting),
            (b"Kernel panic - not syncing", ConsoleEnd::Panic),
        ];
        MARKERS.iter().find(|(m, _)| line.windows(m.len()).any(|w| w == *m)).map(|(_, e)| *e)
    }

    /// Whether the machine stays up after it: a halted guest never ends its VM by
    /// itself, so the host has to.
    pub fn host_must_end(self) -> bool {
        matches!(self, ConsoleEnd::Halted | ConsoleEnd::PowerDown)
    }

    /// The end it means.
    pub fn end(self) -> VmEnd {
        match self {
            ConsoleEnd::Halted | ConsoleEnd::PowerDown => VmEnd::GuestShutdown,
            ConsoleEnd::Restarting => VmEnd::GuestReboot,
            ConsoleEnd::Panic => VmEnd::GuestPanic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_a_bounded_log() {
        let dir = crate::test_dir::TempDir::new("console");
        let path = dir.join("console.log");
        let c = ConsoleLog::new(Some(&path), false);
        c.append(b"one\ntwo\n");
        c.append(b"three\n");
        assert_eq!(c.tail(2), "two\nthree");
        let big = vec![b'x'; (LOG_MAX as usize) + 1000];
        c.append(&big);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= LOG_MAX + 100, "console.log grew to {len}");
        assert!(c.tail.lock().len() <= TAIL);
    }

    #[test]
    fn announces_the_kernels_last_words_split_across_reads() {
        let c = ConsoleLog::new(None, false);
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        c.on_end(Box::new(move |e| s2.lock().push(e)));
        c.append(b"[    1.0] booting\n[    2.0] reboot: Sys");
        assert_eq!(c.last_end(), None);
        c.append(b"tem halted\r");
        assert_eq!(c.last_end(), None, "not before the line ends");
        c.append(b"\n");
        assert_eq!(c.last_end(), Some(ConsoleEnd::Halted));
        // A line longer than the scan keeps is still matched by its end.
        let mut long = vec![b'x'; 10_000];
        long.extend_from_slice(b"Kernel panic - not syncing: x\n");
        c.append(&long);
        assert_eq!(*seen.lock(), [ConsoleEnd::Halted, ConsoleEnd::Panic]);
    }

    #[test]
    fn console_markers() {
        assert_eq!(ConsoleEnd::in_line(b"[   12.3] reboot: System halted\r"), Some(ConsoleEnd::Halted));
        assert_eq!(ConsoleEnd::in_line(b"reboot: Power down"), Some(ConsoleEnd::PowerDown));
        assert_eq!(ConsoleEnd::in_line(b"reboot: Restarting system"), Some(ConsoleEnd::Restarting));
        assert_eq!(
            ConsoleEnd::in_line(b"Kernel panic - not syncing: Attempted to kill init!"),
            Some(ConsoleEnd::Panic)
        );
        assert_eq!(ConsoleEnd::in_line(b"reboot: System"), None);
        assert!(ConsoleEnd::Halted.host_must_end() && !ConsoleEnd::Panic.host_must_end());
        assert_eq!(ConsoleEnd::Panic.end(), VmEnd::GuestPanic);
    }

    #[test]
    fn boot_excerpt_starts_at_the_panic() {
        let c = ConsoleLog::new(None, false);
        for i in 0..50 {
            c.append(format!("line {i}\n").as_bytes());
        }
        c.append(b"Kernel panic - not syncing: VFS\n trace 1\n trace 2\n");
        let e = c.boot_excerpt();
        // The panic with the lines just before it (at least 12 lines are shown).
        assert!(e.starts_with("\nlast console lines:\nline 41\n") && e.ends_with("trace 2"), "{e}");
        assert!(!e.contains("line 30"), "{e}");
    }
}
