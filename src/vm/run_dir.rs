//! Each VM's private run directory (sockets, console log), under one private directory
//! per user, and the sweep of those left behind by processes that died.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::unix;

/// A private directory for one VM's sockets and logs, removed when dropped.
pub(crate) struct RunDir(pub(crate) PathBuf);

impl RunDir {
    pub(crate) fn new() -> Result<RunDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let private = run_base();
        unix::ensure_private_dir(&private)?;
        sweep_stale(&private);
        let dir = private.join(format!("vm-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        unix::ensure_private_dir(&dir)?;
        Ok(RunDir(dir))
    }
}

/// Removes run directories (`vm-<pid>-<n>`) whose owning process is gone: what a
/// process killed with SIGKILL could not clean up itself.
pub fn sweep_stale(private: &Path) {
    let Ok(entries) = std::fs::read_dir(private) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix("vm-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("removing stale VM directory {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The private directory all VM run directories of this user live in.
pub fn run_base() -> PathBuf {
    let base = ["XDG_RUNTIME_DIR", "TMPDIR"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let private = base.join(format!("vmhost-{}", nix::unistd::geteuid().as_raw()));
    if private.as_os_str().len() > 60 {
        PathBuf::from(format!("/tmp/vmhost-{}", nix::unistd::geteuid().as_raw()))
    } else {
        private
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
