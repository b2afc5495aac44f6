//! Every request of the helper protocol and its fields, defined once ([`Request`],
//! [`RequestRef`]), and the [`Field`] trait their fields implement.

use super::catalogue::msg;
use super::codec::DecodeError;
use super::codec::{Decoder, Encoder, Wire};
use super::types::*;

/// A value with a fixed place in a request: the primitives and the typed payloads.
///
/// Each is read in two forms: [`Field::Ref`], which borrows a top-level string or byte
/// string from the payload (string lists and the typed payloads are read owned), held by
/// [`RequestRef`]; and the owned value made from it, held by [`Request`]. A layout is
/// decoded by one piece of code either way.
pub trait Field: Sized {
    /// The value as read without copying: `&str` for a string, `&[u8]` for bytes, the
    /// value itself for the rest.
    type Ref<'a>;
    /// Appends the value.
    fn put(&self, enc: &mut Encoder);
    /// Reads the value, borrowing from the payload where it can.
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<Self::Ref<'a>, DecodeError>;
    /// The owned value of a borrowed one.
    fn from_ref(r: Self::Ref<'_>) -> Self;
}

macro_rules! prim_field {
    ($($t:ty => $put:ident, $get:ident;)*) => {
        $(impl Field for $t {
            type Ref<'a> = $t;
            fn put(&self, enc: &mut Encoder) {
                enc.$put(*self);
            }
            fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<$t, DecodeError> {
                dec.$get()
            }
            fn from_ref(r: $t) -> $t {
                r
            }
        })*
    };
}

prim_field! {
    u8 => u8, u8;
    u32 => u32, u32;
    u64 => u64, u64;
    i32 => i32, i32;
    i64 => i64, i64;
    bool => bool, bool;
}

impl Field for FileMode {
    type Ref<'a> = FileMode;
    fn put(&self, enc: &mut Encoder) {
        enc.u32(self.0);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<FileMode, DecodeError> {
        dec.u32().map(FileMode)
    }
    fn from_ref(r: FileMode) -> FileMode {
        r
    }
}

impl Field for String {
    type Ref<'a> = &'a str;
    fn put(&self, enc: &mut Encoder) {
        enc.string(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<&'a str, DecodeError> {
        dec.str_ref()
    }
    fn from_ref(r: &str) -> String {
        r.to_string()
    }
}

impl Field for Vec<u8> {
    type Ref<'a> = &'a [u8];
    fn put(&self, enc: &mut Encoder) {
        enc.bytes(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<&'a [u8], DecodeError> {
        dec.bytes_ref()
    }
    fn from_ref(r: &[u8]) -> Vec<u8> {
        r.to_vec()
    }
}

impl Field for Vec<String> {
    type Ref<'a> = Vec<String>;
    fn put(&self, enc: &mut Encoder) {
        enc.string_list(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<Vec<String>, DecodeError> {
        dec.string_list()
    }
    fn from_ref(r: Vec<String>) -> Vec<String> {
        r
    }
}

macro_rules! wire_field {
    ($($t:ty),*) => {
        $(impl Field for $t {
            type Ref<'a> = $t;
            fn put(&self, enc: &mut Encoder) {
                self.encode(enc);
            }
            fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<$t, DecodeError> {
                <$t as Wire>::decode(dec)
            }
            fn from_ref(r: $t) -> $t {
                r
            }
        })*
    };
}

wire_field!(InstanceNew, SnapshotOptions, DockerfileOptions, FileInfo);

/// FsReadDir's answer: a `u32` count and that many [`DirEntry`].
impl Field for Vec<DirEntry> {
    type Ref<'a> = Vec<DirEntry>;
    fn put(&self, enc: &mut Encoder) {
        enc.u32(self.len() as u32);
        for e in self {
            e.encode(enc);
        }
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<Vec<DirEntry>, DecodeError> {
        let n = dec.count("directory entries", 9)?;
        (0..n).map(|_| DirEntry::decode(dec)).collect()
    }
    fn from_ref(r: Vec<DirEntry>) -> Vec<DirEntry> {
        r
    }
}

macro_rules! requests {
    ($( $(#[$doc:meta])* $name:ident = $ty:ident { $($field:ident : $fty:ty),* $(,)? }
        => { $($rfield:ident : $rty:ty),* $(,)? }, )*) => {
        /// Every request of the helper protocol with its fields, in wire order.
        ///
        /// The layouts are those of `docs/protocol.md`; [`Request::encode`] and
        /// [`RequestRef::read`] (which [`Request::read`] copies out of) are the only code
        /// that turns them into bytes and back.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum Request {
            $( $(#[$doc])* $name { $($field: $fty),* }, )*
        }

        impl Request {
            /// The message type number.
            pub fn ty(&self) -> u16 {
                match self {
                    $( Request::$name { .. } => msg::$ty, )*
                }
            }

            /// Appends the request's payload.
            pub fn encode(&self, enc: &mut Encoder) {
                match self {
                    $( Request::$name { $($field),* } => { $( Field::put($field, enc); )* } )*
                }
            }

            /// Reads the fields of a request of type `ty`; `None` for a type that is not
            /// a request. The caller checks [`Decoder::finish`].
            pub fn read(ty: u16, dec: &mut Decoder<'_>) -> Result<Option<Request>, DecodeError> {
                Ok(RequestRef::read(ty, dec)?.map(RequestRef::into_owned))
            }
        }

        /// A [`Request`] read without copying its top-level strings and byte strings out
        /// of the payload (string lists and typed payloads are read owned): the same
        /// variants and fields, each a [`Field::Ref`]. For the receiver that uses the
        /// data where it lies (the agent writes FileWrite's and FsWriteFile's data from
        /// its frame); [`Request::read`] is this and [`RequestRef::into_owned`].
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum RequestRef<'a> {
            $( $(#[$doc])* $name { $($field: <$fty as Field>::Ref<'a>),* }, )*
        }

        impl<'a> RequestRef<'a> {
            /// Reads the fields of a request of type `ty`; `None` for a type that is not
            /// a request. The caller checks [`Decoder::finish`].
            pub fn read(ty: u16, dec: &mut Decoder<'a>) -> Result<Option<RequestRef<'a>>, DecodeError> {
                Ok(Some(match ty {
                    $( msg::$ty => RequestRef::$name { $($field: <$fty as Field>::get_ref(dec)?),* }, )*
                    _ => return Ok(None),
                }))
            }

            /// The message type number.
            pub fn ty(&self) -> u16 {
                match self {
                    $( RequestRef::$name { .. } => msg::$ty, )*
                }
            }

            /// The message's catalogue name (`FsOpen`).
            pub fn name(&self) -> &'static str {
                msg::name(self.ty()).unwrap_or("?")
            }

            /// The request with its fields copied out of the payload.
            pub fn into_owned(self) -> Request {
                match self {
                    $( RequestRef::$name { $($field),* } =>
                        Request::$name { $($field: <$fty as Field>::from_ref($field)),* }, )*
                }
            }
        }

        /// Every answer of the helper protocol: the fields of a Response frame after its
        /// OK byte, by the request it answers, in wire order (`docs/protocol.md`). One
        /// definition beside each request's: [`Response::encode`] and [`Response::read`]
        /// are the only code that turns them into bytes and back. CmdRunStreaming's
        /// answer is its stream frames ([`StreamChunk`], [`StreamEnd`]), not a Response.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum Response {
            $( $(#[$doc])* $name { $($rfield: $rty),* }, )*
        }

        impl Response {
            /// The type of the request it answers.
            pub fn ty(&self) -> u16 {
                match self {
                    $( Response::$name { .. } => msg::$ty, )*
                }
            }

            /// Appends the answer's fields (after the OK byte).
            pub fn encode(&self, enc: &mut Encoder) {
                match self {
                    $( Response::$name { $($rfield),* } => { $( Field::put($rfield, enc); )* } )*
                }
            }

            /// Reads the fields of the answer to a request of type `ty`; `None` for a type
            /// that is not a request. The caller checks [`Decoder::finish`].
            pub fn read(ty: u16, dec: &mut Decoder<'_>) -> Result<Option<Response>, DecodeError> {
                Ok(Some(match ty {
                    $( msg::$ty => Response::$name {
                        $($rfield: <$rty as Field>::from_ref(<$rty as Field>::get_ref(dec)?)),*
                    }, )*
                    _ => return Ok(None),
                }))
            }
        }
    };
}

requests! {
    /// Create the instance.
    InstanceNew = INSTANCE_NEW { new: InstanceNew } => {},
    /// Shut the instance down.
    InstanceClose = INSTANCE_CLOSE {} => {},
    /// Wait for the instance to exit.
    InstanceWait = INSTANCE_WAIT {} => {},
    /// The instance's id.
    InstanceId = INSTANCE_ID {} => { id: String },
    /// Whether it runs.
    InstanceIsRunning = INSTANCE_IS_RUNNING {} => { running: bool },
    /// Console size.
    InstanceSetConsole = INSTANCE_SET_CONSOLE { cols: i32, rows: i32 } => {},
    /// Networking on or off.
    InstanceSetNetwork = INSTANCE_SET_NETWORK { enabled: bool } => {},
    /// Run the main process on the console.
    InstanceExec = INSTANCE_EXEC { name: String, args: Vec<String> } => {},
    /// How it ended.
    InstanceEnd = INSTANCE_END {} => { kind: u8, number: u64, detail: String },
    /// Publish guest port `guest_port` on the host address `address` (`IP:PORT`; port 0:
    /// any): answers the address bound (vmhost's addition).
    InstancePublish = INSTANCE_PUBLISH { address: String, guest_port: u32 } => { address: String },
    /// Open for reading.
    FsOpen = FS_OPEN { path: String } => { handle: u64 },
    /// Create or truncate.
    FsCreate = FS_CREATE { path: String } => { handle: u64 },
    /// Open with Linux O_* flags and a permission.
    FsOpenFile = FS_OPEN_FILE { path: String, flags: i32, perm: FileMode } => { handle: u64 },
    /// Read a whole file.
    FsReadFile = FS_READ_FILE { path: String } => { data: Vec<u8> },
    /// Write a whole file.
    FsWriteFile = FS_WRITE_FILE { path: String, data: Vec<u8>, perm: FileMode } => {},
    /// Stat, following symlinks.
    FsStat = FS_STAT { path: String } => { info: FileInfo },
    /// Stat, not following symlinks.
    FsLstat = FS_LSTAT { path: String } => { info: FileInfo },
    /// Remove a file or empty directory.
    FsRemove = FS_REMOVE { path: String } => {},
    /// Remove recursively.
    FsRemoveAll = FS_REMOVE_ALL { path: String } => {},
    /// Make a directory.
    FsMkdir = FS_MKDIR { path: String, perm: FileMode } => {},
    /// Make a directory and its parents.
    FsMkdirAll = FS_MKDIR_ALL { path: String, perm: FileMode } => {},
    /// Rename.
    FsRename = FS_RENAME { from: String, to: String } => {},
    /// Make `link` a symlink to `target` (Go `os.Symlink(oldname, newname)`).
    FsSymlink = FS_SYMLINK { target: String, link: String } => {},
    /// Read a symlink.
    FsReadlink = FS_READLINK { path: String } => { target: String },
    /// List a directory.
    FsReadDir = FS_READ_DIR { path: String } => { entries: Vec<DirEntry> },
    /// Change mode bits.
    FsChmod = FS_CHMOD { path: String, mode: FileMode } => {},
    /// Change owner.
    FsChown = FS_CHOWN { path: String, uid: i32, gid: i32 } => {},
    /// Change times (Unix seconds).
    FsChtimes = FS_CHTIMES { path: String, atime: i64, mtime: i64 } => {},
    /// Snapshot the filesystem.
    FsSnapshot = FS_SNAPSHOT { opts: SnapshotOptions } => { handle: u64 },
    /// Close a file.
    FileClose = FILE_CLOSE { handle: u64 } => {},
    /// Read up to `max` bytes.
    FileRead = FILE_READ { handle: u64, max: u32 } => { data: Vec<u8> },
    /// Write bytes.
    FileWrite = FILE_WRITE { handle: u64, data: Vec<u8> } => { written: u32 },
    /// Seek (whence 0 start, 1 current, 2 end).
    FileSeek = FILE_SEEK { handle: u64, offset: i64, whence: i32 } => { offset: i64 },
    /// Flush to storage.
    FileSync = FILE_SYNC { handle: u64 } => {},
    /// Set the length.
    FileTruncate = FILE_TRUNCATE { handle: u64, size: i64 } => {},
    /// Stat an open file.
    FileStat = FILE_STAT { handle: u64 } => { info: FileInfo },
    /// The name it was opened with.
    FileName = FILE_NAME { handle: u64 } => { name: String },
    /// Prepare a command.
    CmdNew = CMD_NEW { name: String, args: Vec<String> } => { handle: u64 },
    /// Prepare the image's entrypoint.
    CmdEntrypoint = CMD_ENTRYPOINT { args: Vec<String> } => { handle: u64 },
    /// Forget a command.
    CmdFree = CMD_FREE { handle: u64 } => {},
    /// Working directory.
    CmdSetDir = CMD_SET_DIR { handle: u64, dir: String } => {},
    /// Set a variable.
    CmdSetEnv = CMD_SET_ENV { handle: u64, key: String, value: String } => {},
    /// Read a variable.
    CmdGetEnv = CMD_GET_ENV { handle: u64, key: String } => { value: String },
    /// The whole environment.
    CmdEnviron = CMD_ENVIRON { handle: u64 } => { env: Vec<String> },
    /// Start.
    CmdStart = CMD_START { handle: u64 } => {},
    /// Wait.
    CmdWait = CMD_WAIT { handle: u64 } => { exit_code: i32 },
    /// Start and wait.
    CmdRun = CMD_RUN { handle: u64 } => { exit_code: i32 },
    /// Run, collect stdout.
    CmdOutput = CMD_OUTPUT { handle: u64 } => { output: Vec<u8>, exit_code: i32 },
    /// Run, collect stdout and stderr together.
    CmdCombinedOutput = CMD_COMBINED_OUTPUT { handle: u64 } => { output: Vec<u8>, exit_code: i32 },
    /// Exit code of a finished command.
    CmdExitCode = CMD_EXIT_CODE { handle: u64 } => { exit_code: i32 },
    /// Kill the guest process.
    CmdKill = CMD_KILL { handle: u64 } => {},
    /// Stdout as a readable handle (ConnRead or FileRead).
    CmdStdoutPipe = CMD_STDOUT_PIPE { handle: u64 } => { handle: u64 },
    /// Stderr as a readable handle (ConnRead or FileRead).
    CmdStderrPipe = CMD_STDERR_PIPE { handle: u64 } => { handle: u64 },
    /// Stdin as a writable handle (ConnWrite or FileWrite).
    CmdStdinPipe = CMD_STDIN_PIPE { handle: u64 } => { handle: u64 },
    /// Run, streaming output.
    CmdRunStreaming = CMD_RUN_STREAMING { handle: u64 } => {},
    /// Run it on a terminal sized by InstanceSetConsole (vmhost's addition).
    CmdSetTty = CMD_SET_TTY { handle: u64, enabled: bool } => {},
    /// Listen in the guest.
    NetListen = NET_LISTEN { network: String, address: String } => { handle: u64 },
    /// Accept a connection.
    ListenerAccept = LISTENER_ACCEPT { handle: u64 } => { handle: u64 },
    /// Close a listener.
    ListenerClose = LISTENER_CLOSE { handle: u64 } => {},
    /// A listener's address.
    ListenerAddr = LISTENER_ADDR { handle: u64 } => { address: String },
    /// Read up to `max` bytes.
    ConnRead = CONN_READ { handle: u64, max: u32 } => { data: Vec<u8> },
    /// Write bytes.
    ConnWrite = CONN_WRITE { handle: u64, data: Vec<u8> } => { written: u32 },
    /// Close a connection.
    ConnClose = CONN_CLOSE { handle: u64 } => {},
    /// Local address.
    ConnLocalAddr = CONN_LOCAL_ADDR { handle: u64 } => { address: String },
    /// Remote address.
    ConnRemoteAddr = CONN_REMOTE_ADDR { handle: u64 } => { address: String },
    /// Connect to a guest port: `address` is `[IP]:PORT` as the guest sees it (vmhost's
    /// addition).
    NetConnect = NET_CONNECT { network: String, address: String } => { handle: u64 },
    /// Shut the writing side: the peer reads the end of the stream (vmhost's addition).
    ConnCloseWrite = CONN_CLOSE_WRITE { handle: u64 } => {},
    /// How long a ConnRead waits for bytes and a ConnWrite for room before answering
    /// Timeout, in milliseconds (0: without end); for this handle, from any connection
    /// (vmhost's addition).
    ConnSetTimeouts = CONN_SET_TIMEOUTS { handle: u64, read_ms: u32, write_ms: u32 } => {},
    /// A snapshot's cache key.
    SnapshotCacheKey = SNAPSHOT_CACHE_KEY { handle: u64 } => { key: String },
    /// A snapshot's parent.
    SnapshotParent = SNAPSHOT_PARENT { handle: u64 } => { handle: u64 },
    /// Release a snapshot.
    SnapshotClose = SNAPSHOT_CLOSE { handle: u64 } => {},
    /// A snapshot as an InstanceNew source.
    SnapshotAsSource = SNAPSHOT_AS_SOURCE { handle: u64 } => { source_type: u8, source_path: String },
    /// Build from a Dockerfile.
    BuildDockerfile = BUILD_DOCKERFILE { opts: DockerfileOptions } => { handle: u64 },
}

impl Request {
    /// The message's catalogue name (`FsOpen`).
    pub fn name(&self) -> &'static str {
        msg::name(self.ty()).unwrap_or("?")
    }

    /// The request's payload alone.
    pub fn to_payload(&self) -> Vec<u8> {
        let mut enc = Encoder::new();
        self.encode(&mut enc);
        enc.into_bytes()
    }

    /// Decodes a whole payload of type `ty`; `None` for a type that is not a request.
    pub fn from_payload(ty: u16, payload: &[u8]) -> Result<Option<Request>, DecodeError> {
        Ok(RequestRef::from_payload(ty, payload)?.map(RequestRef::into_owned))
    }
}

impl Response {
    /// The message's catalogue name (`FsOpen`) of the request it answers.
    pub fn name(&self) -> &'static str {
        msg::name(self.ty()).unwrap_or("?")
    }

    /// The whole Response payload: the OK byte, then the fields.
    pub fn to_payload(&self) -> Vec<u8> {
        let mut enc = Encoder::response();
        self.encode(&mut enc);
        enc.into_bytes()
    }

    /// Decodes the fields of a Response payload (after its OK byte) answering a request
    /// of type `ty`, all of them; `None` for a type that is not a request.
    pub fn from_fields(ty: u16, fields: &[u8]) -> Result<Option<Response>, DecodeError> {
        let mut dec = Decoder::new(fields);
        let r = Response::read(ty, &mut dec)?;
        if r.is_some() {
            dec.finish()?;
        }
        Ok(r)
    }
}

impl<'a> RequestRef<'a> {
    /// Decodes a whole payload of type `ty`, borrowing from it; `None` for a type that is
    /// not a request.
    pub fn from_payload(ty: u16, payload: &'a [u8]) -> Result<Option<RequestRef<'a>>, DecodeError> {
        let mut dec = Decoder::new(payload);
        let r = RequestRef::read(ty, &mut dec)?;
        if r.is_some() {
            dec.finish()?;
        }
        Ok(r)
    }
}
