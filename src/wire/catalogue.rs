//! The catalogue of message types: numbers and names ([`msg`]).

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $konst:ident = $num:literal => $name:literal, )*) => {
        $( $(#[$doc])* pub const $konst: u16 = $num; )*

        /// Every message type of the catalogue with its name, in numeric order.
        pub const ALL: &[(u16, &str)] = &[ $( ($num, $name), )* ];

        /// The message's name as the protocol document spells it (`InstanceNew`), or
        /// `None` for a number that is not in the catalogue.
        pub fn name(ty: u16) -> Option<&'static str> {
            match ty {
                $( $num => Some($name), )*
                _ => None,
            }
        }
    };
}

/// The message catalogue: every type number of the helper protocol.
///
/// Numbers 0x0100..=0x0700 and 0xFF00/0xFF01 are those of v0.0.2; 0x040E..=0x0411,
/// 0xFF02 and 0xFF03 are the streaming additions of the later revision; 0x0108
/// (InstanceEnd) and 0x0412 (CmdSetTty) are vmhost's own.
pub mod msg {
    catalogue! {
        /// Create the instance (boot the VM).
        INSTANCE_NEW = 0x0100 => "InstanceNew",
        /// Shut the instance down and release it.
        INSTANCE_CLOSE = 0x0101 => "InstanceClose",
        /// Wait until the instance exits.
        INSTANCE_WAIT = 0x0102 => "InstanceWait",
        /// The instance's identifier.
        INSTANCE_ID = 0x0103 => "InstanceID",
        /// Whether the instance is running.
        INSTANCE_IS_RUNNING = 0x0104 => "InstanceIsRunning",
        /// Set the console size (columns, rows).
        INSTANCE_SET_CONSOLE = 0x0105 => "InstanceSetConsole",
        /// Enable or disable guest networking.
        INSTANCE_SET_NETWORK = 0x0106 => "InstanceSetNetwork",
        /// Run the instance's main process attached to the console.
        INSTANCE_EXEC = 0x0107 => "InstanceExec",
        /// How the instance ended (vmhost's addition).
        INSTANCE_END = 0x0108 => "InstanceEnd",
        /// Publish a guest port on the host (vmhost's addition).
        INSTANCE_PUBLISH = 0x0109 => "InstancePublish",
        /// Open a guest file for reading.
        FS_OPEN = 0x0200 => "FsOpen",
        /// Create or truncate a guest file.
        FS_CREATE = 0x0201 => "FsCreate",
        /// Open a guest file with flags and permissions.
        FS_OPEN_FILE = 0x0202 => "FsOpenFile",
        /// Read a whole guest file.
        FS_READ_FILE = 0x0203 => "FsReadFile",
        /// Write a whole guest file.
        FS_WRITE_FILE = 0x0204 => "FsWriteFile",
        /// Stat a guest path, following symlinks.
        FS_STAT = 0x0205 => "FsStat",
        /// Stat a guest path without following symlinks.
        FS_LSTAT = 0x0206 => "FsLstat",
        /// Remove a file or empty directory.
        FS_REMOVE = 0x0207 => "FsRemove",
        /// Remove a path and everything below it.
        FS_REMOVE_ALL = 0x0208 => "FsRemoveAll",
        /// Create a directory.
        FS_MKDIR = 0x0209 => "FsMkdir",
        /// Create a directory and its parents.
        FS_MKDIR_ALL = 0x020A => "FsMkdirAll",
        /// Rename a path.
        FS_RENAME = 0x020B => "FsRename",
        /// Create a symbolic link.
        FS_SYMLINK = 0x020C => "FsSymlink",
        /// Read a symbolic link.
        FS_READLINK = 0x020D => "FsReadlink",
        /// List a directory.
        FS_READ_DIR = 0x020E => "FsReadDir",
        /// Change permission bits.
        FS_CHMOD = 0x020F => "FsChmod",
        /// Change owner and group.
        FS_CHOWN = 0x0210 => "FsChown",
        /// Change access and modification times.
        FS_CHTIMES = 0x0211 => "FsChtimes",
        /// Snapshot the guest filesystem.
        FS_SNAPSHOT = 0x0212 => "FsSnapshot",
        /// Close a file handle.
        FILE_CLOSE = 0x0300 => "FileClose",
        /// Read from a file handle.
        FILE_READ = 0x0301 => "FileRead",
        /// Write to a file handle.
        FILE_WRITE = 0x0302 => "FileWrite",
        /// Seek a file handle.
        FILE_SEEK = 0x0303 => "FileSeek",
        /// Flush a file to stable storage.
        FILE_SYNC = 0x0304 => "FileSync",
        /// Truncate or extend a file.
        FILE_TRUNCATE = 0x0305 => "FileTruncate",
        /// Stat an open file.
        FILE_STAT = 0x0306 => "FileStat",
        /// The name a file was opened with.
        FILE_NAME = 0x0307 => "FileName",
        /// Prepare a guest command.
        CMD_NEW = 0x0400 => "CmdNew",
        /// Prepare the image's entrypoint with extra arguments.
        CMD_ENTRYPOINT = 0x0401 => "CmdEntrypoint",
        /// Forget a command handle.
        CMD_FREE = 0x0402 => "CmdFree",
        /// Set a command's working directory.
        CMD_SET_DIR = 0x0403 => "CmdSetDir",
        /// Set one environment variable of a command.
        CMD_SET_ENV = 0x0404 => "CmdSetEnv",
        /// Read one environment variable of a command.
        CMD_GET_ENV = 0x0405 => "CmdGetEnv",
        /// A command's whole environment.
        CMD_ENVIRON = 0x0406 => "CmdEnviron",
        /// Start a command without waiting.
        CMD_START = 0x0407 => "CmdStart",
        /// Wait for a started command.
        CMD_WAIT = 0x0408 => "CmdWait",
        /// Start a command and wait for it.
        CMD_RUN = 0x0409 => "CmdRun",
        /// Run a command and collect its stdout.
        CMD_OUTPUT = 0x040A => "CmdOutput",
        /// Run a command and collect stdout and stderr together.
        CMD_COMBINED_OUTPUT = 0x040B => "CmdCombinedOutput",
        /// The exit code of a finished command.
        CMD_EXIT_CODE = 0x040C => "CmdExitCode",
        /// Signal a running command.
        CMD_KILL = 0x040D => "CmdKill",
        /// A readable handle on a command's standard output.
        CMD_STDOUT_PIPE = 0x040E => "CmdStdoutPipe",
        /// A readable handle on a command's standard error.
        CMD_STDERR_PIPE = 0x040F => "CmdStderrPipe",
        /// A writable handle on a command's standard input.
        CMD_STDIN_PIPE = 0x0410 => "CmdStdinPipe",
        /// Run a command, streaming its output as it comes.
        CMD_RUN_STREAMING = 0x0411 => "CmdRunStreaming",
        /// Run a command on a terminal (vmhost's addition).
        CMD_SET_TTY = 0x0412 => "CmdSetTty",
        /// Listen on a guest network address.
        NET_LISTEN = 0x0500 => "NetListen",
        /// Accept one connection on a listener.
        LISTENER_ACCEPT = 0x0501 => "ListenerAccept",
        /// Close a listener.
        LISTENER_CLOSE = 0x0502 => "ListenerClose",
        /// A listener's address.
        LISTENER_ADDR = 0x0503 => "ListenerAddr",
        /// Read from a connection.
        CONN_READ = 0x0504 => "ConnRead",
        /// Write to a connection.
        CONN_WRITE = 0x0505 => "ConnWrite",
        /// Close a connection.
        CONN_CLOSE = 0x0506 => "ConnClose",
        /// A connection's local address.
        CONN_LOCAL_ADDR = 0x0507 => "ConnLocalAddr",
        /// A connection's remote address.
        CONN_REMOTE_ADDR = 0x0508 => "ConnRemoteAddr",
        /// Connect to a port a guest program listens on (vmhost's addition).
        NET_CONNECT = 0x0509 => "NetConnect",
        /// Shut a connection's writing side (vmhost's addition).
        CONN_CLOSE_WRITE = 0x050A => "ConnCloseWrite",
        /// Set a connection's read and write timeouts (vmhost's addition).
        CONN_SET_TIMEOUTS = 0x050B => "ConnSetTimeouts",
        /// A snapshot's cache key.
        SNAPSHOT_CACHE_KEY = 0x0600 => "SnapshotCacheKey",
        /// A snapshot's parent (0 = none).
        SNAPSHOT_PARENT = 0x0601 => "SnapshotParent",
        /// Release a snapshot handle.
        SNAPSHOT_CLOSE = 0x0602 => "SnapshotClose",
        /// Make a snapshot usable as an instance source.
        SNAPSHOT_AS_SOURCE = 0x0603 => "SnapshotAsSource",
        /// Build an image from a Dockerfile.
        BUILD_DOCKERFILE = 0x0700 => "BuildDockerfile",
        /// A successful answer (payload starts with the error-code byte 0).
        RESPONSE = 0xFF00 => "Response",
        /// A failed answer: code, message, op, path.
        ERROR = 0xFF01 => "Error",
        /// One chunk of a streamed command's output: stream byte, bytes.
        STREAM_CHUNK = 0xFF02 => "StreamChunk",
        /// The end of a stream: error-code byte, i32 exit code.
        STREAM_END = 0xFF03 => "StreamEnd",
    }

    /// Whether `ty` is an answer type (0xFFxx) rather than a request.
    pub fn is_answer(ty: u16) -> bool {
        ty & 0xFF00 == 0xFF00
    }
}

/// The name of a message type for messages and logs: its catalogue name or `0x....`.
pub fn type_name(ty: u16) -> String {
    match msg::name(ty) {
        Some(n) => n.to_string(),
        None => format!("{ty:#06x}"),
    }
}
