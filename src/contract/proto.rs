//! The agent protocol: between the helper (host) and `vmhost-agent` (guest), over one
//! virtio-serial port. `docs/agent-protocol.md` is its specification; this module is
//! its encoding.
//!
//! Framing is the helper protocol's (big-endian primitives of [`crate::wire`]) with a
//! request/stream id added, so that many operations share the one channel and a blocked
//! one never stalls the others:
//!
//! ```text
//! +---------------+-------------+----------------+-----------------+
//! | u16 type (BE) | u32 id (BE) | u32 length (BE)| payload         |
//! +---------------+-------------+----------------+-----------------+
//! ```
//!
//! Frames are at most [`MAX_FRAME`] bytes of payload. The guest speaks first: [`HELLO`]
//! with its protocol version; the host answers [`HELLO_ACK`] with the version it will
//! use, or closes the channel if it cannot speak it.
//!
//! Requests (host to guest) carry an id chosen by the host, unique among those in
//! flight; the guest answers each with [`OK`] or [`ERROR`] carrying the same id. An
//! [`EXEC`]'s id also names the process for the rest of its life: its output comes as
//! [`OUTPUT`] frames and its end as one [`EXIT`] frame, all with that id.
//!
//! Filesystem requests ([`FS`]) carry a helper-protocol Fs*/File* message whole, with
//! the agent's own file handles, and are answered with that message's response fields
//! (see [`crate::agent::fs`]); they are served off the read loop, so a slow one does
//! not hold the others. A process started with a terminal ([`ExecRequest::tty`]) is
//! resized with [`RESIZE`].
//!
//! The first process may be started at boot, before the host asks. The host then puts
//! its [`ExecRequest`] on the kernel command line, in hex, as the parameter
//! [`FIRST_EXEC_VAR`] ([`encode_first_exec`]), which the kernel hands init in its
//! environment.
//! The agent starts it as soon as the guest is set up, says in its Hello that it did,
//! and right after the Hello answers it unasked, as if the host had sent an [`EXEC`]
//! with id [`FIRST_EXEC_ID`]: an [`OK`] with the pid or an [`ERROR`], then its output
//! and end under that id. The host never uses that id for anything else. A Hello that
//! says no first process (the parameter did not reach the agent) leaves the host to
//! start the command with an Exec of its own. Since version 4.
//!
//! Version 5 added [`ExecRequest::main`], a trailing byte of the Exec payload; version 6
//! the errno of [`AgentError`]; version 7 the tunnel (below); version 8
//! the snapshot ([`SNAPSHOT`]).
//!
//! The tunnel carries TCP connections between host programs and guest programs over
//! this channel, so that they need no network device. [`LISTEN`] has the agent listen
//! on [`crate::contract::HOST_ADDR`] in the guest (the address guest programs reach the
//! host's listeners at) and report each guest connection with [`ACCEPTED`]; [`CONNECT`]
//! has it connect to a port of the guest. A connection's bytes go as [`CONN_DATA`]
//! frames either way (an empty one: the sender will send no more), each side sending at
//! most what the other has granted: [`CONN_WINDOW`] at the start, more with
//! [`CONN_CREDIT`] as the receiver passes the bytes on. [`CONN_CLOSE`] either way ends
//! it. Connection ids the host picks (a Connect's request id) are below
//! [`GUEST_CONN_BIT`]; those the agent picks (an accepted connection) have it set.
//!
//! Flow control: a process may send at most as many output bytes as the host has
//! granted. Each process starts with [`INITIAL_CREDIT`]; the host grants more with
//! [`CREDIT`] as its consumer takes the data. Standard input is paced by the replies:
//! the host sends the next [`STDIN`] chunk of a process after the previous one's OK.

use std::io::{self, Read, Write};

use byteorder::{BigEndian, ByteOrder};

use crate::wire::{DecodeError, Decoder, Encoder, ErrorCode};

/// The protocol version this build speaks.
pub const VERSION: u32 = 8;
/// Largest payload of an agent frame.
pub const MAX_FRAME: u32 = 1 << 20;
/// Header size: type, id, length.
pub const HEADER_SIZE: usize = 10;
/// Output bytes a process may send before the host grants more.
pub const INITIAL_CREDIT: u32 = 1 << 20;
/// Largest output chunk the guest sends in one frame.
pub const OUTPUT_CHUNK: usize = 64 << 10;

/// Guest to host, first frame: `u32 version, string agent description, u8 first`
/// (1: the process the host put on the kernel command line was started, or failed to,
/// and is answered under [`FIRST_EXEC_ID`] next; 0: none was asked for).
pub const HELLO: u16 = 0x0001;
/// Host to guest, answer to HELLO: `u32 version`.
pub const HELLO_ACK: u16 = 0x0002;
/// Start a process: [`ExecRequest`]. OK carries `u32 pid`.
pub const EXEC: u16 = 0x0101;
/// Bytes for a process's stdin: `u32 process id, bytes` (empty closes stdin). OK when
/// written.
pub const STDIN: u16 = 0x0102;
/// Signal a process (its whole process group): `u32 process id, i32 signal`.
pub const SIGNAL: u16 = 0x0103;
/// Resize a process's terminal (one started with a tty): `u32 process id, u16 cols,
/// u16 rows`. OK when done.
pub const RESIZE: u16 = 0x0105;
/// Grant a process more output: `u32 process id, u32 bytes`. Not answered.
pub const CREDIT: u16 = 0x0104;
/// A filesystem request: `u16 helper-protocol type` (an Fs* or File* message) then
/// that message's request payload, file handles being the agent's own. OK carries the
/// helper protocol's response fields. See [`crate::agent::fs`].
pub const FS: u16 = 0x0301;
/// Snapshot the root's changes: `string list excludes, bool pause` -> OK `u64 file
/// handle` of the archive (an OCI layer, see [`crate::agent::snapshot`]), read with
/// FileRead through [`FS`] to its end and closed with FileClose. Since version 8.
pub const SNAPSHOT: u16 = 0x0302;
/// The end of a snapshot: `u64 file handle` -> OK `u64 entries, u64 bytes` once its
/// walk is done, or the walk's error. Since version 8.
pub const SNAPSHOT_END: u16 = 0x0303;
/// Sync the guest's filesystems and power it off. OK first, then the VM ends.
pub const SHUTDOWN: u16 = 0x0201;
/// Liveness check. OK with no payload.
pub const PING: u16 = 0x0202;
/// Configure the guest's network interface (address, default route, DNS server); no
/// payload, OK when done (repeating it is harmless). The host sends it before it first
/// connects the link: a guest without network does not spend
/// boot time on an interface nobody uses. Since version 3.
pub const NETWORK_UP: u16 = 0x0203;
/// Take the guest's network interface down (its routes go with it): the host has
/// disconnected the network, and guest programs' connections must fail at once rather
/// than wait on a dead link. No payload; OK when done. Since version 7.
pub const NETWORK_DOWN: u16 = 0x0204;
/// Listen in the guest on [`crate::contract::HOST_ADDR`]: `u16 port` (0: any). OK
/// carries `u16 port`, the port bound. The request's id names the listener from then on:
/// each connection a guest program makes to it comes as an [`ACCEPTED`] with that id.
/// Since version 7.
pub const LISTEN: u16 = 0x0501;
/// Stop listening: `u32 listener id`. OK when closed; no [`ACCEPTED`] follows.
pub const LISTEN_CLOSE: u16 = 0x0502;
/// Connect to a port of the guest: `string address` (`IP:PORT` as the guest sees it,
/// e.g. `127.0.0.1:8080`). OK carries `string local address, string peer address`; the
/// request's id names the connection from then on.
pub const CONNECT: u16 = 0x0503;
/// A connection's bytes, either way, the frame's id being the connection: the payload
/// is the bytes themselves (at most [`OUTPUT_CHUNK`]; none: the sender shut its writing
/// side). Never more than the receiver granted. Not answered.
pub const CONN_DATA: u16 = 0x0504;
/// Grants the other side `u32 bytes` more of a connection (the frame's id). Not answered.
pub const CONN_CREDIT: u16 = 0x0505;
/// Ends a connection (the frame's id), either way: the sender closed it and sends nothing
/// more; the receiver closes its end and forgets the id. No payload; not answered.
pub const CONN_CLOSE: u16 = 0x0506;
/// Success: request-specific payload.
pub const OK: u16 = 0xFF00;
/// Failure: [`AgentError`]: `u8 code (helper protocol error codes), string message,
/// i32 errno` (0: none; since version 6).
pub const ERROR: u16 = 0xFF01;
/// Process output: `u8 stream (1 stdout, 2 stderr), bytes`.
pub const OUTPUT: u16 = 0xFF02;
/// Process end, after all its output: `i32 exit code, i32 signal (0 if none)`.
pub const EXIT: u16 = 0xFF03;
/// A guest program connected to a listener (the frame's id): `u32 connection id, string
/// peer address, string local address`. The connection's data follows as [`CONN_DATA`].
pub const ACCEPTED: u16 = 0xFF04;

/// The bytes of a connection either side may send before the other grants more.
pub const CONN_WINDOW: u32 = 1 << 20;
/// What an accepted connection may send the host before the host's program accepts it
/// (the host grants up to [`CONN_WINDOW`] then): unaccepted connections hold little.
pub const ACCEPT_WINDOW: u32 = 64 << 10;
/// Set in the ids of connections the agent picks (accepted ones), clear in the host's.
pub const GUEST_CONN_BIT: u32 = 1 << 31;

/// The id of the process the agent starts at boot (see the module's doc).
pub const FIRST_EXEC_ID: u32 = 1;
/// The kernel parameter that carries the first process: `VMHOST_EXEC=` and the hex of
/// its [`ExecRequest`] payload. The kernel passes a parameter it does not know, whose
/// name has no dot, to init as an environment variable: the agent reads it there.
pub const FIRST_EXEC_VAR: &str = "VMHOST_EXEC";
/// The longest [`FIRST_EXEC_VAR`] parameter the agent reads, whole. The host puts one on
/// the command line only where it fits (see `kernel_cmdline` in `vm::qemu`),
/// which is always less than this.
pub const MAX_FIRST_EXEC_PARAM: usize = 1024;

/// The kernel parameter that starts `req` at boot.
pub fn encode_first_exec(req: &ExecRequest) -> String {
    format!("{FIRST_EXEC_VAR}={}", req.to_hex())
}

/// The first process of [`FIRST_EXEC_VAR`]'s value, or why it holds none.
pub fn decode_first_exec(hex: &str) -> Result<ExecRequest, String> {
    if FIRST_EXEC_VAR.len() + 1 + hex.len() > MAX_FIRST_EXEC_PARAM {
        return Err(format!("{FIRST_EXEC_VAR}: {} hex digits, beyond the limit", hex.len()));
    }
    ExecRequest::from_hex(hex).map_err(|e| format!("{FIRST_EXEC_VAR}: {e}"))
}

/// The name of an agent message type, for errors and logs.
pub fn name(ty: u16) -> &'static str {
    match ty {
        HELLO => "Hello",
        HELLO_ACK => "HelloAck",
        EXEC => "Exec",
        STDIN => "Stdin",
        SIGNAL => "Signal",
        CREDIT => "Credit",
        RESIZE => "Resize",
        FS => "Fs",
        SNAPSHOT => "Snapshot",
        SNAPSHOT_END => "SnapshotEnd",
        SHUTDOWN => "Shutdown",
        PING => "Ping",
        NETWORK_UP => "NetworkUp",
        NETWORK_DOWN => "NetworkDown",
        LISTEN => "Listen",
        LISTEN_CLOSE => "ListenClose",
        CONNECT => "Connect",
        CONN_DATA => "ConnData",
        CONN_CREDIT => "ConnCredit",
        CONN_CLOSE => "ConnClose",
        ACCEPTED => "Accepted",
        OK => "Ok",
        ERROR => "Error",
        OUTPUT => "Output",
        EXIT => "Exit",
        _ => "unknown",
    }
}

/// One agent frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type.
    pub ty: u16,
    /// Request or process id.
    pub id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Reads one frame. `Ok(None)` on a clean EOF before a header.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    read_frame_into(r, Vec::with_capacity)
}

/// Reads one frame, its payload into the buffer `buffer(len)` gives (cleared first; the
/// payload is read into its spare room, not zeroed before). `Ok(None)` on a clean EOF
/// before a header.
pub fn read_frame_into(
    r: &mut impl Read,
    buffer: impl FnOnce(usize) -> Vec<u8>,
) -> io::Result<Option<Frame>> {
    let mut h = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "channel closed inside a header"))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let ty = BigEndian::read_u16(&h[0..2]);
    let id = BigEndian::read_u32(&h[2..6]);
    let len = BigEndian::read_u32(&h[6..10]);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("agent frame {} of {len} bytes exceeds the {MAX_FRAME}-byte limit", name(ty)),
        ));
    }
    let mut payload = buffer(len as usize);
    payload.clear();
    let got = r.take(len as u64).read_to_end(&mut payload)?;
    if got != len as usize {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "channel closed inside a frame"));
    }
    Ok(Some(Frame { ty, id, payload }))
}

/// Encodes one frame (header and payload) into a buffer for a single write.
pub fn encode_frame(ty: u16, id: u32, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
    encode_frame_into(&mut buf, ty, id, payload)?;
    Ok(buf)
}

/// The header of a frame whose payload is `payload` (which it refuses when larger than
/// a frame may carry); the payload follows it on the wire.
pub fn encode_header(ty: u16, id: u32, payload: &[u8]) -> io::Result<[u8; HEADER_SIZE]> {
    if payload.len() > MAX_FRAME as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("agent frame {} of {} bytes exceeds the limit", name(ty), payload.len()),
        ));
    }
    let mut h = [0u8; HEADER_SIZE];
    BigEndian::write_u16(&mut h[0..2], ty);
    BigEndian::write_u32(&mut h[2..6], id);
    BigEndian::write_u32(&mut h[6..10], payload.len() as u32);
    Ok(h)
}

/// Encodes one frame into `buf`, after what it holds.
pub fn encode_frame_into(buf: &mut Vec<u8>, ty: u16, id: u32, payload: &[u8]) -> io::Result<()> {
    let header = encode_header(ty, id, payload)?;
    buf.reserve(HEADER_SIZE + payload.len());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(payload);
    Ok(())
}

/// Writes one frame with a single write.
pub fn write_frame(w: &mut impl Write, ty: u16, id: u32, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode_frame(ty, id, payload)?)
}

/// What an [`ERROR`] frame says: the helper protocol's error code, a message and, when
/// a guest system call failed, its errno, which the host hands on as a typed field (no
/// one reads the errno back from the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentError {
    /// The helper protocol's error code.
    pub code: ErrorCode,
    /// What failed (the host adds the operation and the path).
    pub message: String,
    /// The errno of the failed system call; 0 when none failed.
    pub errno: i32,
}

impl AgentError {
    /// A failure that is not a system call's.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AgentError {
        AgentError { code, message: message.into(), errno: 0 }
    }

    /// A failed system call: code IO, the errno's text and the errno.
    pub fn from_io(e: &io::Error) -> AgentError {
        match e.raw_os_error() {
            Some(n) => AgentError {
                code: ErrorCode::Io,
                message: nix::errno::Errno::from_raw(n).desc().to_string(),
                errno: n,
            },
            None => AgentError::new(ErrorCode::Io, e.to_string()),
        }
    }

    /// This error with `code` instead.
    pub fn with_code(self, code: ErrorCode) -> AgentError {
        AgentError { code, ..self }
    }

    /// The payload of its [`ERROR`] frame.
    pub fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.code.as_u8()).string(&self.message).i32(self.errno);
    }

    /// Reads an [`ERROR`] payload; a malformed one is an error that says so.
    pub fn decode(payload: &[u8]) -> AgentError {
        let mut d = Decoder::new(payload);
        let code = ErrorCode::from_u8(d.u8().unwrap_or(99));
        let message = d.string().unwrap_or_else(|_| "malformed agent error".into());
        let errno = d.i32().unwrap_or(0);
        AgentError { code, message, errno }
    }
}

/// How to start a process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program: a path, or a name looked up in the `PATH` of `env`.
    pub program: String,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// The whole environment, `KEY=VALUE` (the agent adds nothing).
    pub env: Vec<String>,
    /// Working directory (empty: the user's home, else `/`).
    pub dir: String,
    /// User name or `uid[:gid]` (empty: root).
    pub user: String,
    /// Whether stdin is a pipe fed with [`STDIN`] (else `/dev/null`).
    pub stdin: bool,
    /// A terminal of (cols, rows) instead of pipes: the process gets a new session
    /// with the pty as its controlling terminal on stdin, stdout and stderr; its
    /// output comes as stdout, STDIN bytes are typed into it.
    pub tty: Option<(u16, u16)>,
    /// The instance's main process (InstanceExec): PID 1 of a PID namespace of its own,
    /// whose end ends the VM ([`crate::agent::main_process`]).
    pub main: bool,
}

impl ExecRequest {
    /// Appends the payload.
    pub fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.program)
            .string_list(&self.args)
            .string_list(&self.env)
            .string(&self.dir)
            .string(&self.user)
            .bool(self.stdin);
        match self.tty {
            Some((cols, rows)) => enc.bool(true).u16(cols).u16(rows),
            None => enc.bool(false).u16(0).u16(0),
        };
        enc.bool(self.main);
    }

    /// The payload in lowercase hex: one word for a command line or an environment
    /// variable, which nothing splits or unquotes.
    pub fn to_hex(&self) -> String {
        let mut e = Encoder::new();
        self.encode(&mut e);
        let mut hex = String::with_capacity(2 * e.as_bytes().len());
        for b in e.as_bytes() {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        hex
    }

    /// Reads what [`ExecRequest::to_hex`] wrote.
    pub fn from_hex(hex: &str) -> Result<ExecRequest, String> {
        if hex.len() % 2 != 0 {
            return Err(format!("{} hex digits, an odd number", hex.len()));
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let bytes: Option<Vec<u8>> =
            hex.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect();
        let bytes = bytes.ok_or("not lowercase hex")?;
        ExecRequest::decode(&bytes).map_err(|e| format!("bad Exec payload: {e}"))
    }

    /// Reads a whole payload.
    pub fn decode(payload: &[u8]) -> Result<ExecRequest, DecodeError> {
        let mut d = Decoder::new(payload);
        let r = ExecRequest {
            program: d.string()?,
            args: d.string_list()?,
            env: d.string_list()?,
            dir: d.string()?,
            user: d.string()?,
            stdin: d.bool()?,
            tty: {
                let on = d.bool()?;
                let size = (d.u16()?, d.u16()?);
                on.then_some(size)
            },
            main: d.bool()?,
        };
        d.finish()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_read_into_a_used_buffer_holds_its_payload_alone_and_a_cut_one_is_an_error() {
        let mut wire = encode_frame(FS, 7, b"payload").unwrap();
        let used = b"left over from the last frame".to_vec();
        let f = read_frame_into(&mut &wire[..], |_| used).unwrap().unwrap();
        assert_eq!((f.ty, f.id, &f.payload[..]), (FS, 7, &b"payload"[..]));
        wire.truncate(wire.len() - 2);
        let e = read_frame_into(&mut &wire[..], Vec::with_capacity).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn frame_layout() {
        let b = encode_frame(EXEC, 0x01020304, &[9, 8]).unwrap();
        assert_eq!(b, [0x01, 0x01, 1, 2, 3, 4, 0, 0, 0, 2, 9, 8]);
        let f = read_frame(&mut &b[..]).unwrap().unwrap();
        assert_eq!(f, Frame { ty: EXEC, id: 0x01020304, payload: vec![9, 8] });
        assert!(read_frame(&mut &b[..5]).is_err());
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        let mut big = b[..6].to_vec();
        big.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        assert_eq!(read_frame(&mut &big[..]).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn exec_request_round_trip() {
        let r = ExecRequest {
            program: "sh".into(),
            args: vec!["-c".into(), "true".into()],
            env: vec!["A=1".into()],
            dir: "/tmp".into(),
            user: "nobody".into(),
            stdin: true,
            tty: Some((100, 30)),
            main: true,
        };
        let mut e = Encoder::new();
        r.encode(&mut e);
        assert_eq!(ExecRequest::decode(e.as_bytes()).unwrap(), r);
        assert!(ExecRequest::decode(&e.as_bytes()[..10]).is_err());
    }

    #[test]
    fn a_first_exec_parameter_round_trips_and_a_bad_one_is_an_error_not_a_panic() {
        let r = ExecRequest {
            program: "sh".into(),
            args: vec!["-c".into(), "echo \"a b\" -- x=y.z\n\u{e9}".into()],
            env: vec![format!("PATH={}", crate::contract::DEFAULT_PATH)],
            stdin: true,
            ..Default::default()
        };
        let param = encode_first_exec(&r);
        // One word of the kernel's command line, nothing it splits or unquotes, and a
        // name without a dot: the kernel passes it to init's environment.
        assert!(param.bytes().all(|b| b.is_ascii_graphic() && b != b'"'), "{param}");
        let (name, hex) = param.split_once('=').unwrap();
        assert_eq!(name, FIRST_EXEC_VAR);
        assert!(!name.contains('.'));
        assert_eq!(decode_first_exec(hex).unwrap(), r);
        for bad in [&hex[..hex.len() - 1], &hex[..hex.len() - 2], "zz", "0A", ""] {
            assert!(decode_first_exec(bad).is_err(), "{bad:?}");
        }
        assert!(decode_first_exec(&"00".repeat(MAX_FIRST_EXEC_PARAM)).unwrap_err().contains("limit"));
        assert!(decode_first_exec("0").unwrap_err().contains("odd"));
    }
}
