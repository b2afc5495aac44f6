//! The typed payloads: file modes and infos, directory entries, instance options and
//! sources, snapshot and Dockerfile options, stream frames.

use std::collections::BTreeMap;
use std::time::Duration;

use super::codec::DecodeError;
use super::codec::{Decoder, Encoder, Wire};
use super::error::ErrorCode;

/// Go `io/fs.FileMode` bits: permissions in the low 9 bits, the file type and special
/// bits at the top. Not POSIX `S_IFMT` values; [`FileMode::from_unix`] converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileMode(pub u32);

impl FileMode {
    /// Directory.
    pub const DIR: u32 = 1 << 31;
    /// Append-only.
    pub const APPEND: u32 = 1 << 30;
    /// Exclusive use.
    pub const EXCLUSIVE: u32 = 1 << 29;
    /// Temporary file.
    pub const TEMPORARY: u32 = 1 << 28;
    /// Symbolic link.
    pub const SYMLINK: u32 = 1 << 27;
    /// Device file.
    pub const DEVICE: u32 = 1 << 26;
    /// Named pipe (FIFO).
    pub const NAMED_PIPE: u32 = 1 << 25;
    /// Unix domain socket.
    pub const SOCKET: u32 = 1 << 24;
    /// Set-user-ID.
    pub const SETUID: u32 = 1 << 23;
    /// Set-group-ID.
    pub const SETGID: u32 = 1 << 22;
    /// Character device (with [`FileMode::DEVICE`]).
    pub const CHAR_DEVICE: u32 = 1 << 21;
    /// Sticky bit.
    pub const STICKY: u32 = 1 << 20;
    /// Not a regular file, of no known other kind.
    pub const IRREGULAR: u32 = 1 << 19;
    /// The permission bits.
    pub const PERM: u32 = 0o777;
    /// The type bits.
    pub const TYPE: u32 = Self::DIR
        | Self::SYMLINK
        | Self::NAMED_PIPE
        | Self::SOCKET
        | Self::DEVICE
        | Self::CHAR_DEVICE
        | Self::IRREGULAR;

    /// Converts a POSIX `st_mode` the way Go's `os.Stat` does.
    pub fn from_unix(st_mode: u32) -> FileMode {
        let mut m = st_mode & Self::PERM;
        m |= match st_mode & 0o170000 {
            0o060000 => Self::DEVICE,
            0o020000 => Self::DEVICE | Self::CHAR_DEVICE,
            0o040000 => Self::DIR,
            0o010000 => Self::NAMED_PIPE,
            0o120000 => Self::SYMLINK,
            0o100000 => 0,
            0o140000 => Self::SOCKET,
            _ => Self::IRREGULAR,
        };
        if st_mode & 0o4000 != 0 {
            m |= Self::SETUID;
        }
        if st_mode & 0o2000 != 0 {
            m |= Self::SETGID;
        }
        if st_mode & 0o1000 != 0 {
            m |= Self::STICKY;
        }
        FileMode(m)
    }

    /// The POSIX permission and special bits (no file type) for chmod/open.
    pub fn to_unix_perm(self) -> u32 {
        let mut m = self.0 & Self::PERM;
        if self.0 & Self::SETUID != 0 {
            m |= 0o4000;
        }
        if self.0 & Self::SETGID != 0 {
            m |= 0o2000;
        }
        if self.0 & Self::STICKY != 0 {
            m |= 0o1000;
        }
        m
    }

    /// The permission bits.
    pub fn perm(self) -> u32 {
        self.0 & Self::PERM
    }

    /// Whether the directory bit is set.
    pub fn is_dir(self) -> bool {
        self.0 & Self::DIR != 0
    }

    /// Whether the symlink bit is set.
    pub fn is_symlink(self) -> bool {
        self.0 & Self::SYMLINK != 0
    }

    /// Whether no type bit is set.
    pub fn is_regular(self) -> bool {
        self.0 & Self::TYPE == 0
    }
}

/// File metadata: name, size, mode, mtime (Unix seconds), isDir, isSymlink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileInfo {
    /// Base name.
    pub name: String,
    /// Size in bytes.
    pub size: i64,
    /// Go FileMode bits.
    pub mode: FileMode,
    /// Modification time, Unix seconds.
    pub mod_time: i64,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Whether it is a symbolic link.
    pub is_symlink: bool,
}

impl Wire for FileInfo {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.name)
            .i64(self.size)
            .u32(self.mode.0)
            .i64(self.mod_time)
            .bool(self.is_dir)
            .bool(self.is_symlink);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(FileInfo {
            name: dec.string()?,
            size: dec.i64()?,
            mode: FileMode(dec.u32()?),
            mod_time: dec.i64()?,
            is_dir: dec.bool()?,
            is_symlink: dec.bool()?,
        })
    }
}

/// One directory entry: name, isDir, mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirEntry {
    /// Base name.
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Go FileMode bits (type bits; permissions may be absent, as with Go's `Type()`).
    pub mode: FileMode,
}

impl Wire for DirEntry {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.name).bool(self.is_dir).u32(self.mode.0);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(DirEntry { name: dec.string()?, is_dir: dec.bool()?, mode: FileMode(dec.u32()?) })
    }
}

/// A host directory shared into the guest: tag, host path, writable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountConfig {
    /// The mount tag the guest sees.
    pub tag: String,
    /// The host directory.
    pub host_path: String,
    /// Whether the guest may write to it.
    pub writable: bool,
}

impl Wire for MountConfig {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.tag).string(&self.host_path).bool(self.writable);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(MountConfig { tag: dec.string()?, host_path: dec.string()?, writable: dec.bool()? })
    }
}

/// Options of a new instance.
///
/// Wire layout: `u64 memory MB, i32 cpus, u64 timeout ns, string user, bool dmesg,
/// u32 count x MountConfig`, then vmhost's optional `u8 backend` (1 qemu, 2 kvm; 0 auto
/// only before flags) and `u8 network flags` ([`NET_HOST_LOOPBACK`]), each left out when
/// it and what follows are defaults. A timeout of 0 on the wire means none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceOptions {
    /// Guest memory in MiB (0 = the backend's default).
    pub memory_mb: u64,
    /// Virtual CPUs (0 = the backend's default: see `vm::default_cpus`).
    pub cpus: i32,
    /// Wall-clock limit of the instance, `None` for no limit.
    pub timeout: Option<Duration>,
    /// The user commands run as (empty = the image's default).
    pub user: String,
    /// Whether to show the guest kernel's console log.
    pub dmesg: bool,
    /// Host directories shared into the guest.
    pub mounts: Vec<MountConfig>,
    /// Which VMM runs the instance.
    pub backend: Backend,
    /// With its network on, whether the guest reaches the host's own loopback services
    /// through its gateway (10.0.2.2). Off by default: the guest then reaches what any
    /// machine on the host's network reaches, not what the host keeps to itself.
    pub host_loopback: bool,
}

/// The bit of InstanceOptions' optional network-flags byte that lets the guest reach
/// the host's loopback ([`InstanceOptions::host_loopback`]).
pub const NET_HOST_LOOPBACK: u8 = 1;

/// Which VMM runs an instance. On the wire it is an optional trailing `u8` of
/// InstanceOptions (1 qemu, 2 kvm), absent for `Auto`, so that v0.0.2 layouts are
/// unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// KVM where hardware virtualization is present (and the kvm backend can boot the
    /// guest), else QEMU.
    #[default]
    Auto,
    /// QEMU, supervised over QMP.
    Qemu,
    /// vmhost's own VMM on /dev/kvm.
    Kvm,
}

impl Backend {
    /// Its name: "auto", "qemu" or "kvm".
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Qemu => "qemu",
            Backend::Kvm => "kvm",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "qemu" => Ok(Backend::Qemu),
            "kvm" => Ok(Backend::Kvm),
            other => Err(format!("backend {other:?}: use kvm, qemu or auto")),
        }
    }
}

impl Wire for InstanceOptions {
    fn encode(&self, enc: &mut Encoder) {
        let ns = self.timeout.map_or(0, |t| t.as_nanos().min(u64::MAX as u128) as u64);
        enc.u64(self.memory_mb).i32(self.cpus).u64(ns).string(&self.user).bool(self.dmesg);
        enc.u32(self.mounts.len() as u32);
        for m in &self.mounts {
            m.encode(enc);
        }
        // vmhost's trailing bytes: the backend, then the network flags, each left out
        // when it and what follows are defaults (auto is 0 only before flags).
        let flags = if self.host_loopback { NET_HOST_LOOPBACK } else { 0 };
        match (self.backend, flags) {
            (Backend::Auto, 0) => {}
            (Backend::Auto, _) => {
                enc.u8(0);
            }
            (Backend::Qemu, _) => {
                enc.u8(1);
            }
            (Backend::Kvm, _) => {
                enc.u8(2);
            }
        }
        if flags != 0 {
            enc.u8(flags);
        }
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let memory_mb = dec.u64()?;
        let cpus = dec.i32()?;
        let ns = dec.u64()?;
        let user = dec.string()?;
        let dmesg = dec.bool()?;
        // A mount is at least two empty strings and a bool: 9 bytes.
        let n = dec.count("mount list", 9)?;
        let mounts = (0..n).map(|_| MountConfig::decode(dec)).collect::<Result<_, _>>()?;
        // vmhost's optional trailing bytes (InstanceOptions ends InstanceNew): the
        // backend, then the network flags. Defaults are said by leaving bytes out, so
        // that every value has one encoding: auto is 0 only when flags follow, and a
        // flags byte is never 0.
        let backend = if dec.remaining() == 0 {
            Backend::Auto
        } else {
            match dec.u8()? {
                0 if dec.remaining() > 0 => Backend::Auto,
                1 => Backend::Qemu,
                2 => Backend::Kvm,
                b => {
                    return Err(DecodeError::OutOfRange {
                        field: "backend",
                        reason: format!("{b} (1 qemu, 2 kvm; auto is no byte, or 0 before network flags)"),
                    })
                }
            }
        };
        let host_loopback = if dec.remaining() == 0 {
            false
        } else {
            match dec.u8()? {
                NET_HOST_LOOPBACK => true,
                f => {
                    return Err(DecodeError::OutOfRange {
                        field: "network flags",
                        reason: format!("{f:#04x} (bit 0: host loopback; no flags is no byte)"),
                    })
                }
            }
        };
        Ok(InstanceOptions {
            memory_mb,
            cpus,
            timeout: (ns != 0).then(|| Duration::from_nanos(ns)),
            user,
            dmesg,
            mounts,
            backend,
            host_loopback,
        })
    }
}

/// Where a new instance's root filesystem comes from (the InstanceNew source-type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SourceType {
    /// A tar archive (optionally compressed).
    Tar = 0,
    /// A root filesystem directory.
    Dir = 1,
    /// A registry image reference.
    Registry = 2,
    /// A snapshot (vmhost's addition): the source path is its record,
    /// `CACHE/snapshots/KEY`, as SnapshotAsSource answers; or its key alone, found in
    /// the request's cache dir.
    Snapshot = 3,
}

impl SourceType {
    fn from_u8(b: u8) -> Result<SourceType, DecodeError> {
        match b {
            0 => Ok(SourceType::Tar),
            1 => Ok(SourceType::Dir),
            2 => Ok(SourceType::Registry),
            3 => Ok(SourceType::Snapshot),
            _ => Err(DecodeError::OutOfRange {
                field: "source type",
                reason: format!("{b} is not 0 (tar), 1 (dir), 2 (registry) or 3 (snapshot)"),
            }),
        }
    }
}

/// The InstanceNew request: source type, source path, image ref, cache dir, options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNew {
    /// What `source_path` is.
    pub source_type: SourceType,
    /// Path of the tar or directory.
    pub source_path: String,
    /// Registry reference (source type 2).
    pub image_ref: String,
    /// Cache directory for images and kernels.
    pub cache_dir: String,
    /// Instance options.
    pub options: InstanceOptions,
}

impl Wire for InstanceNew {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.source_type as u8)
            .string(&self.source_path)
            .string(&self.image_ref)
            .string(&self.cache_dir);
        self.options.encode(enc);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(InstanceNew {
            source_type: SourceType::from_u8(dec.u8()?)?,
            source_path: dec.string()?,
            image_ref: dec.string()?,
            cache_dir: dec.string()?,
            options: InstanceOptions::decode(dec)?,
        })
    }
}

/// Options of FsSnapshot: excluded paths, cache dir.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotOptions {
    /// Guest paths left out of the snapshot.
    pub excludes: Vec<String>,
    /// Where snapshot layers are cached.
    pub cache_dir: String,
}

impl Wire for SnapshotOptions {
    fn encode(&self, enc: &mut Encoder) {
        enc.string_list(&self.excludes).string(&self.cache_dir);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(SnapshotOptions { excludes: dec.string_list()?, cache_dir: dec.string()? })
    }
}

/// Options of BuildDockerfile: Dockerfile bytes, context dir, cache dir, build args.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerfileOptions {
    /// The Dockerfile's content.
    pub dockerfile: Vec<u8>,
    /// Directory COPY and ADD read from (may be empty).
    pub context_dir: String,
    /// Cache directory (required by the builder).
    pub cache_dir: String,
    /// `ARG` values.
    pub build_args: BTreeMap<String, String>,
}

impl Wire for DockerfileOptions {
    fn encode(&self, enc: &mut Encoder) {
        enc.bytes(&self.dockerfile)
            .string(&self.context_dir)
            .string(&self.cache_dir)
            .string_map(&self.build_args);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(DockerfileOptions {
            dockerfile: dec.bytes()?,
            context_dir: dec.string()?,
            cache_dir: dec.string()?,
            build_args: dec.string_map()?,
        })
    }
}

/// One chunk of a streamed command's output (0xFF02): stream (1 stdout, 2 stderr), data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// 1 for stdout, 2 for stderr.
    pub stream: u8,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Stream number of standard output in [`StreamChunk`].
pub const STREAM_STDOUT: u8 = 1;
/// Stream number of standard error in [`StreamChunk`].
pub const STREAM_STDERR: u8 = 2;

impl StreamChunk {
    /// The payload of a chunk, from borrowed data (no copy into a `StreamChunk`).
    pub fn payload(stream: u8, data: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::with_capacity(5 + data.len());
        enc.u8(stream).bytes(data);
        enc.into_bytes()
    }
}

impl Wire for StreamChunk {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.stream).bytes(&self.data);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let stream = dec.u8()?;
        if stream != STREAM_STDOUT && stream != STREAM_STDERR {
            return Err(DecodeError::OutOfRange {
                field: "stream",
                reason: format!("{stream} is not 1 (stdout) or 2 (stderr)"),
            });
        }
        Ok(StreamChunk { stream, data: dec.bytes()? })
    }
}

/// The end of a stream (0xFF03): error-code byte 0, then the i32 exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// The command's exit code.
    pub exit_code: i32,
}

impl Wire for StreamEnd {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(ErrorCode::Ok.as_u8()).i32(self.exit_code);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let code = dec.u8()?;
        if code != 0 {
            return Err(DecodeError::OutOfRange {
                field: "stream end code",
                reason: format!("{code} is not 0"),
            });
        }
        Ok(StreamEnd { exit_code: dec.i32()? })
    }
}
