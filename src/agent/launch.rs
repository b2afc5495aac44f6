//! What every way of starting a guest process shares ([`super::spawn`]'s and
//! [`super::main_process`]'s): what to start ([`Spec`]), the agent's ends of it
//! ([`Ends`]), exec's strings prepared before the process is made, whether it runs as
//! the agent's own identity, and the terminal size as the kernel takes it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc;

/// What to start.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The program: a path, or a name looked up in the environment's PATH.
    pub program: &'a str,
    /// Arguments after `argv[0]` (which is `program` as given).
    pub args: &'a [String],
    /// The whole environment.
    pub env: &'a [(String, String)],
    /// The working directory.
    pub dir: &'a str,
    /// Whether stdin is a pipe (else /dev/null).
    pub stdin: bool,
    /// User, primary group and supplementary groups to run as.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: &'a [u32],
    /// A terminal of (cols, rows) instead of pipes.
    pub tty: Option<(u16, u16)>,
    /// The instance's main process: PID 1 of a PID namespace of its own
    /// ([`super::main_process`]).
    pub main: bool,
}

/// The agent's ends of a started process's standard descriptors.
#[derive(Debug)]
pub struct Ends {
    /// The write end of its stdin, when piped.
    pub stdin: Option<File>,
    /// The read end of its stdout (a terminal's master side with a tty).
    pub stdout: File,
    /// The read end of its stderr (none with a tty: it goes to the terminal).
    pub stderr: Option<File>,
    /// The terminal's master side, to resize it.
    pub pty: Option<File>,
}

/// The agent's supplementary groups. Not nix's `getgroups`: it asks `sysconf` for
/// NGROUPS_MAX first, which glibc reads from /proc/sys/kernel/ngroups_max, and that
/// first read of a sysctl file cost every guest's first command 12-17 ms under TCG.
fn supplementary_groups() -> Option<Vec<u32>> {
    loop {
        // SAFETY: with a size of 0 getgroups only counts.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut groups = vec![0 as libc::gid_t; usize::try_from(n).ok()?];
        // SAFETY: `groups` has room for `n` gids.
        let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        match usize::try_from(got) {
            Ok(got) => {
                groups.truncate(got);
                return Some(groups);
            }
            // The groups grew between the calls: count again.
            Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) => {}
            Err(_) => return None,
        }
    }
}

/// Whether `uid`, `gid` and `groups` are exactly the agent's own identity (then no
/// change of user is needed before exec).
pub(super) fn same_identity(uid: u32, gid: u32, groups: &[u32]) -> bool {
    if uid != nix::unistd::geteuid().as_raw() || gid != nix::unistd::getegid().as_raw() {
        return false;
    }
    let Some(mut mine) = supplementary_groups() else { return false };
    let mut want = groups.to_vec();
    mine.sort_unstable();
    mine.dedup();
    want.sort_unstable();
    want.dedup();
    mine == want
}

pub(super) fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in an argument"))
}

/// What exec takes, prepared before the process is made: the program's path, and the
/// arguments and environment with their NULL-terminated arrays of pointers (into the
/// strings, which must outlive them).
pub(super) struct ExecStrings {
    pub(super) path: CString,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) argv_p: Vec<*mut libc::c_char>,
    pub(super) envp_p: Vec<*mut libc::c_char>,
}

impl ExecStrings {
    pub(super) fn new(spec: &Spec<'_>, program: &Path) -> io::Result<ExecStrings> {
        let path = cstring(program.as_os_str().as_bytes())?;
        let mut argv = vec![cstring(spec.program.as_bytes())?];
        for a in spec.args {
            argv.push(cstring(a.as_bytes())?);
        }
        let envp: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
            .collect::<io::Result<_>>()?;
        // Pointers to the strings' heap buffers, which moving the vectors does not move.
        let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr() as *mut _).collect();
        argv_p.push(std::ptr::null_mut());
        let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|a| a.as_ptr() as *mut _).collect();
        envp_p.push(std::ptr::null_mut());
        Ok(ExecStrings { path, argv, envp, argv_p, envp_p })
    }
}

/// The terminal size as the kernel takes it.
pub fn winsize(cols: u16, rows: u16) -> nix::pty::Winsize {
    nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}
