//! The user QEMU runs as.
//!
//! When vmhost runs as root, QEMU does not: each VM's QEMU gets a user of its own, a uid
//! (and a gid of the same number, no supplementary groups but the one that opens
//! `/dev/kvm` under KVM) from a range no account uses, [`DYNAMIC_UID_FIRST`] on, taken
//! for as long as that QEMU runs (a lock file per uid in `/run/vmhost/qemu-uids`, and
//! never a uid a live process has). Like Firecracker's jailer with a uid per microVM: a
//! QEMU taken over by its guest can touch no file that is not open to everyone, and not
//! the other VMs' QEMUs (`/proc/PID/mem`, signals).
//!
//! What QEMU opens by name is made reachable for that user: its run directory is given
//! to it (and the private directory above it left traversable, 0711, not listable); the
//! kernel and the initramfs are passed as open descriptors (`/proc/self/fd/N`), so that
//! they may live under a private home. Shared directories are the user's to grant: a
//! share the VM's user cannot read (or, writable, write) by its mode bits is refused
//! before the boot, saying so. `VMHOST_QEMU_USER` chooses otherwise: a user name or uid
//! (every VM's QEMU runs as that user: a share owned by it works), or `root` (QEMU keeps
//! vmhost's own user, as when vmhost is not root).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Accel;
use crate::error::{Error, Result};

/// The first uid (and gid) of the range the VMs' own users come from: 0x70000000, in
/// the range systemd leaves unused (above the containers' 524288..1879048191).
pub const DYNAMIC_UID_FIRST: u32 = 0x7000_0000;

/// How many uids the range holds: as many QEMUs as run at once.
pub const DYNAMIC_UIDS: u32 = 65536;

/// Who QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuUser {
    /// vmhost's own user (the default when vmhost is not root).
    Same,
    /// A user of its own per VM (the default when vmhost is root).
    PerVm,
    /// This uid and gid.
    Fixed {
        /// The uid.
        uid: u32,
        /// The gid.
        gid: u32,
    },
}

impl QemuUser {
    /// From `VMHOST_QEMU_USER`: unset or `auto` ([`QemuUser::PerVm`] when vmhost is
    /// root, else [`QemuUser::Same`]), `root` or `same` (vmhost's own user), or a user
    /// name or uid (with its primary group; a uid without an account gets the gid of
    /// its number).
    pub fn from_env() -> Result<QemuUser> {
        let value = std::env::var("VMHOST_QEMU_USER").unwrap_or_default();
        QemuUser::parse(value.trim(), nix::unistd::geteuid().is_root())
    }

    fn parse(value: &str, root: bool) -> Result<QemuUser> {
        let bad = |message: String| Error::InvalidArgument { op: "VMHOST_QEMU_USER".into(), message };
        match value {
            "" | "auto" => return Ok(if root { QemuUser::PerVm } else { QemuUser::Same }),
            "root" | "same" => return Ok(QemuUser::Same),
            _ => {}
        }
        let (uid, gid) = match value.parse::<u32>() {
            Ok(uid) => {
                let account = nix::unistd::User::from_uid(uid.into()).ok().flatten();
                (uid, account.map_or(uid, |u| u.gid.as_raw()))
            }
            Err(_) => match nix::unistd::User::from_name(value) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                _ => {
                    return Err(bad(format!("{value:?} is not a user of this host, a uid, `root` or `auto`")))
                }
            },
        };
        if uid == nix::unistd::geteuid().as_raw() {
            return Ok(QemuUser::Same);
        }
        if !root {
            return Err(bad(format!(
                "QEMU can run as {value:?} only when vmhost runs as root; unset VMHOST_QEMU_USER"
            )));
        }
        Ok(QemuUser::Fixed { uid, gid })
    }

    /// The credentials QEMU takes on before it starts (none: it keeps ours); a
    /// [`QemuUser::PerVm`] uid is held until the credentials drop.
    pub(crate) fn credentials(self, accel: Accel) -> Result<Option<Credentials>> {
        let (uid, gid, lock) = match self {
            QemuUser::Same => return Ok(None),
            QemuUser::Fixed { uid, gid } => (uid, gid, None),
            QemuUser::PerVm => {
                let (uid, lock) = take_uid()?;
                (uid, uid, Some(lock))
            }
        };
        // Under KVM, the group that may open /dev/kvm (QEMU opens it by name).
        let groups = match accel {
            Accel::Kvm => std::fs::metadata("/dev/kvm")
                .ok()
                .filter(|m| m.mode() & 0o060 == 0o060 && m.gid() != 0)
                .map(|m| vec![m.gid()])
                .unwrap_or_default(),
            Accel::Tcg => Vec::new(),
        };
        Ok(Some(Credentials { uid, gid, groups, _lock: lock }))
    }
}

/// A uid, gid and groups for QEMU, and the lock that holds a VM's own uid.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    groups: Vec<u32>,
    _lock: Option<File>,
}

impl Credentials {
    /// Whether these credentials may open `path` with `want` (`r`, `w`, `x` bits of a
    /// mode's "other" triple: 4, 2, 1), searching every directory above it, by the mode
    /// bits (access control lists aside).
    fn may(&self, path: &Path, want: u32) -> bool {
        let mut above = PathBuf::new();
        for part in path.parent().into_iter().flat_map(|p| p.components()) {
            above.push(part);
            match std::fs::metadata(&above) {
                Ok(m) if self.allows(&m, 1) => {}
                _ => return false,
            }
        }
        std::fs::metadata(path).is_ok_and(|m| self.allows(&m, want))
    }

    /// Whether a file of metadata `m` gives these credentials `want` (a mode's "other"
    /// triple: 4, 2, 1), as the kernel decides it: the owner's bits for its owner, the
    /// group's for its group, the others' for everyone else.
    fn allows(&self, m: &std::fs::Metadata, want: u32) -> bool {
        let mode = m.mode();
        let bits = if m.uid() == self.uid {
            mode >> 6
        } else if m.gid() == self.gid || self.groups.contains(&m.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// Refuses a shared directory QEMU could not serve as this user.
    pub(crate) fn check_share(&self, m: &crate::wire::MountConfig) -> Result<()> {
        let path = Path::new(&m.host_path);
        let want = if m.writable { 7 } else { 5 };
        if self.may(path, want) {
            return Ok(());
        }
        let grant = if m.writable { "write" } else { "read" };
        Err(Error::InvalidArgument {
            op: "mount".into(),
            message: format!(
                "{} is not open to QEMU's user (uid {}): when vmhost runs as root, each VM's QEMU runs \
                 as a user of its own, which may {grant} only what every user may (chmod o+{} on the \
                 directory, o+x on those above it), or set VMHOST_QEMU_USER to a user that may \
                 {grant} it (its owner), or to root to keep QEMU as root",
                path.display(),
                self.uid,
                if m.writable { "rwx" } else { "rx" },
            ),
        })
    }

    /// Refuses a kernel or initramfs QEMU could not read as this user (it opens them
    /// through `/proc/self/fd`, which checks the file's own mode).
    pub(crate) fn check_readable(&self, what: &str, path: &Path) -> Result<()> {
        if std::fs::metadata(path).is_ok_and(|m| self.allows(&m, 4)) {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            op: "start VM".into(),
            message: format!(
                "the {what} {} is not readable by QEMU's user (uid {}): make it readable by every user \
                 (chmod o+r), or set VMHOST_QEMU_USER=root to keep QEMU as root",
                path.display(),
                self.uid
            ),
        })
    }

    /// Takes these credentials on, in the child between fork and exec: only
    /// async-signal-safe calls on memory allocated before the fork.
    pub(crate) fn assume(&self) -> std::io::Result<()> {
        let groups: &[nix::libc::gid_t] = &self.groups;
        // SAFETY: plain system calls; `groups` outlives them.
        unsafe {
            if nix::libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || nix::libc::setresgid(self.gid, self.gid, self.gid) != 0
                || nix::libc::setresuid(self.uid, self.uid, self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Where the per-VM uids are locked: one place for every vmhost of the host, in root's
/// /run, or else in root's private run directory (checked to be root's and closed).
fn uid_lock_dir() -> Result<PathBuf> {
    if Path::new("/run").is_dir() {
        return Ok(PathBuf::from("/run/vmhost/qemu-uids"));
    }
    let base = super::super::run_dir::run_base();
    crate::unix::ensure_private_dir(&base)?;
    Ok(base.join("qemu-uids"))
}

/// Takes the first free uid of the range: one whose lock file nobody holds and that no
/// live process runs as.
fn take_uid() -> Result<(u32, File)> {
    let dir = uid_lock_dir()?;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io("create the QEMU uid locks' directory", &dir, e))?;
    let busy = uids_in_use();
    for n in 0..DYNAMIC_UIDS {
        let uid = DYNAMIC_UID_FIRST + n;
        if busy.contains(&uid) {
            continue;
        }
        let path = dir.join(uid.to_string());
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("open QEMU uid lock", &path, e))?;
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe {
            use std::os::fd::AsRawFd;
            nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) == 0
        };
        // Locked, and still no process of that uid (one may have started between the
        // look at /proc and the lock): ours.
        if locked && !uids_in_use().contains(&uid) {
            return Ok((uid, file));
        }
    }
    Err(Error::Vm {
        op: "start VM".into(),
        message: format!("all {DYNAMIC_UIDS} uids for QEMU users are taken (from {DYNAMIC_UID_FIRST})"),
    })
}

/// The uids of the range that live processes run as.
fn uids_in_use() -> std::collections::HashSet<u32> {
    let range = DYNAMIC_UID_FIRST..DYNAMIC_UID_FIRST + DYNAMIC_UIDS;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
        .filter(|uid| range.contains(uid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_read_as_documented() {
        assert_eq!(QemuUser::parse("", true).unwrap(), QemuUser::PerVm);
        assert_eq!(QemuUser::parse("auto", false).unwrap(), QemuUser::Same);
        assert_eq!(QemuUser::parse("root", true).unwrap(), QemuUser::Same);
        assert_eq!(QemuUser::parse("4000000", true).unwrap(), QemuUser::Fixed { uid: 4000000, gid: 4000000 });
        assert!(QemuUser::parse("no-such-user-here", true).is_err());
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(QemuUser::parse(&me.to_string(), false).unwrap(), QemuUser::Same);
        let e = QemuUser::parse(&(me + 1).to_string(), false).unwrap_err().to_string();
        assert!(e.contains("only when vmhost runs as root"), "{e}");
    }

    #[test]
    fn access_is_judged_by_mode_bits_and_every_directory_above() {
        use std::os::unix::fs::PermissionsExt;
        let c = Credentials { uid: DYNAMIC_UID_FIRST, gid: DYNAMIC_UID_FIRST, groups: vec![], _lock: None };
        let top = std::env::temp_dir().join(format!("vmhost-user-test-{}", std::process::id()));
        let inner = top.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let set =
            |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        set(&top, 0o755);
        set(&inner, 0o755);
        assert!(c.may(&inner, 5) && !c.may(&inner, 7));
        set(&inner, 0o777);
        assert!(c.may(&inner, 7));
        // A directory above that others cannot search hides it.
        set(&top, 0o750);
        assert!(!c.may(&inner, 5));
        set(&top, 0o755);
        // The owner's bits decide for the owner, as the kernel does: a file every other
        // user may read is not readable by its owner whose bits say no.
        let file = top.join("f");
        std::fs::write(&file, b"x").unwrap();
        set(&file, 0o044);
        let owner = std::fs::metadata(&file).unwrap().uid();
        let as_owner = Credentials { uid: owner, gid: DYNAMIC_UID_FIRST, groups: vec![], _lock: None };
        assert!(as_owner.check_readable("kernel", &file).is_err());
        assert!(c.check_readable("kernel", &file).is_ok());
        std::fs::remove_dir_all(&top).unwrap();
    }
}
