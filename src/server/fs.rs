//! Helper handlers of the filesystem (Fs*, 0x02xx) and file-handle (File*, 0x03xx)
//! messages.
//!
//! Path operations go to the guest agent as they are ([`AgentLink::fs`]); the guest
//! side is [`crate::agent::fs`]. File handles are the helper's: its table maps each to
//! the agent's handle for the open file, so a handle the client never had is
//! InvalidHandle and one it closed is AlreadyClosed, before the guest is asked.
//!
//! Agent frames are smaller than helper frames (1 MiB against 64 MiB), so the helper
//! splits what does not fit: FileWrite data goes in chunks, FsReadFile of a large file
//! reads it through a handle, FsWriteFile of large data writes through one. FileRead
//! answers at most one chunk ([`MAX_CHUNK`]): a short read, as `read(2)` may give.

use std::sync::Arc;

use nix::libc;
use parking_lot::Mutex;

use super::frame;
use super::pipes::PipeSlot;
use super::table::Table;
use super::HandlerResult;
use crate::contract::MAX_CHUNK;
use crate::vm::agent_link::AgentLink;
use crate::wire::{self, Decoder, ErrorCode, ErrorFrame, Request, Response};

/// What a helper file handle stands for.
pub(super) enum HostFile {
    /// A file open in the guest: the agent's handle for it.
    Guest { agent: u64 },
    /// A command pipe (see [`super::pipes`]): stream 0 stdin, 1 stdout, 2 stderr.
    Pipe { slot: Arc<PipeSlot>, stream: u8, cmd: u64 },
}

/// The file handles of one instance.
pub(super) type Files = Mutex<Table<Arc<HostFile>>>;

/// The largest FsReadFile answer: what fits in one helper frame.
const MAX_READ_FILE: usize = wire::DEFAULT_MAX_FRAME as usize - 1024;

/// Sends a request to the agent; errors name `path`.
fn ask(agent: &AgentLink, req: &Request, path: &str) -> Result<Vec<u8>, ErrorFrame> {
    agent.fs(req).map_err(|e| frame(&e, path))
}

/// Sends a request on a file the helper's table knew: if the guest no longer has it,
/// a concurrent FileClose closed it.
fn ask_open(agent: &AgentLink, req: &Request) -> Result<Vec<u8>, ErrorFrame> {
    ask(agent, req, "").map_err(|mut ef| {
        if ef.code == ErrorCode::InvalidHandle {
            ef.code = ErrorCode::AlreadyClosed;
            ef.message = "the file was closed".into();
        }
        ef
    })
}

fn decode_u64(answer: &[u8], what: &str) -> Result<u64, ErrorFrame> {
    Decoder::new(answer).u64().map_err(|e| {
        ErrorFrame::new(ErrorCode::Unknown, "", format!("bad {what} answer from the guest: {e}"))
    })
}

/// The agent handle behind helper handle `h`, which must be a guest file.
fn agent_handle(files: &Files, h: u64) -> Result<u64, ErrorFrame> {
    match &*files.lock().get(h, "file")? {
        HostFile::Guest { agent } => Ok(*agent),
        HostFile::Pipe { .. } => {
            Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", format!("file {h} is a command pipe")))
        }
    }
}

/// How a pipe handle is named (FileName).
fn pipe_name(stream: u8, cmd: u64) -> String {
    let s = ["stdin", "stdout", "stderr"][stream.min(2) as usize];
    format!("|{s} of command {cmd}")
}

/// Opens in the guest; the answer is a new helper handle.
fn open(
    agent: &AgentLink,
    files: &Files,
    next_handle: &dyn Fn() -> u64,
    req: &Request,
    path: &str,
) -> HandlerResult {
    let a = decode_u64(&ask(agent, req, path)?, req.name())?;
    let h = next_handle();
    files.lock().insert(h, Arc::new(HostFile::Guest { agent: a }));
    Ok(match req {
        Request::FsOpen { .. } => Response::FsOpen { handle: h },
        Request::FsCreate { .. } => Response::FsCreate { handle: h },
        _ => Response::FsOpenFile { handle: h },
    }
    .into())
}

/// The error for a file too large for one FsReadFile answer: EFBIG, which tells a
/// client to read it through FsOpen and FileRead.
fn too_large(size: usize) -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::InvalidArgument,
        "",
        format!(
            "the file ({size} bytes) is larger than one answer ({MAX_READ_FILE} bytes): read it through \
             FsOpen and FileRead"
        ),
    )
    .with_errno(nix::libc::EFBIG)
}

/// Reads a whole guest file through an agent handle, chunk by chunk.
fn read_through_handle(agent: &AgentLink, path: &str) -> Result<Vec<u8>, ErrorFrame> {
    let a = decode_u64(&ask(agent, &Request::FsOpen { path: path.to_string() }, path)?, "FsOpen")?;
    // Its size first: one too large for an answer is refused before it is read.
    let size = ask(agent, &Request::FileStat { handle: a }, path)
        .and_then(|s| wire::Wire::from_payload(&s).map_err(ErrorFrame::from))
        .map(|info: wire::FileInfo| info.size.max(0) as usize);
    // One byte more than an answer holds tells a file that grew since its stat.
    let result = match size {
        Ok(n) if n > MAX_READ_FILE => Err(too_large(n)),
        Err(e) => Err(e),
        Ok(_) => read_filled(agent, a, MAX_READ_FILE + 1)
            .map_err(|ef| if ef.path.is_empty() { ef.with_path(path) } else { ef })
            .and_then(|data| match data.len() {
                n if n > MAX_READ_FILE => Err(too_large(n)),
                _ => Ok(data),
            }),
    };
    let _ = ask(agent, &Request::FileClose { handle: a }, path);
    result
}

/// Reads up to `max` bytes of agent handle `a`, an agent frame at a time, stopping at a
/// short read (the end of the file, or a pipe's pace). An error after some data ends
/// the read with what was read: it comes again on the next one.
fn read_filled(agent: &AgentLink, a: u64, max: usize) -> Result<Vec<u8>, ErrorFrame> {
    let mut data = Vec::new();
    loop {
        let want = (max - data.len()).min(MAX_CHUNK);
        let chunk = match ask_open(agent, &Request::FileRead { handle: a, max: want as u32 }) {
            Ok(c) => c,
            Err(_) if !data.is_empty() => break,
            Err(e) => return Err(e),
        };
        let bytes = Decoder::new(&chunk).bytes().map_err(|e| {
            ErrorFrame::new(ErrorCode::Unknown, "", format!("bad FileRead answer from the guest: {e}"))
        })?;
        let short = bytes.len() < want;
        data.extend_from_slice(&bytes);
        if short || data.len() >= max {
            break;
        }
    }
    Ok(data)
}

/// Writes data to an agent handle in chunks that fit agent frames; returns the count.
fn write_chunks(agent: &AgentLink, a: u64, data: &[u8], path: &str) -> Result<u64, ErrorFrame> {
    let mut written = 0u64;
    for chunk in data.chunks(MAX_CHUNK - 64) {
        let answer = ask_open(agent, &Request::FileWrite { handle: a, data: chunk.to_vec() })
            .map_err(|ef| if ef.path.is_empty() { ef.with_path(path) } else { ef })?;
        written += Decoder::new(&answer).u32().unwrap_or(0) as u64;
    }
    Ok(written)
}

/// Serves one Fs*/File* request.
pub(super) fn serve(
    agent: &AgentLink,
    files: &Files,
    next_handle: &dyn Fn() -> u64,
    cancelled: &dyn Fn() -> bool,
    req: Request,
) -> HandlerResult {
    // Pipe handles first: they never reach the guest's filesystem.
    let pipe = match &req {
        Request::FileClose { handle }
        | Request::FileRead { handle, .. }
        | Request::FileWrite { handle, .. }
        | Request::FileSeek { handle, .. }
        | Request::FileSync { handle }
        | Request::FileTruncate { handle, .. }
        | Request::FileStat { handle }
        | Request::FileName { handle } => match &*files.lock().get(*handle, "file")? {
            HostFile::Pipe { slot, stream, cmd } => Some((*handle, slot.clone(), *stream, *cmd)),
            HostFile::Guest { .. } => None,
        },
        _ => None,
    };
    if let Some((h, slot, stream, cmd)) = pipe {
        return serve_pipe(files, h, &slot, stream, cmd, cancelled, req);
    }
    // The guest's answer, read as the answer to this request before it goes on: the
    // guest is not trusted, and a malformed answer is an error here, not the client's.
    let ty = req.ty();
    let fields = |answer: Vec<u8>| -> HandlerResult {
        match Response::from_fields(ty, &answer) {
            Ok(Some(r)) => Ok(r.into()),
            Ok(None) => Err(ErrorFrame::new(ErrorCode::Unknown, "", "no answer layout for this request")),
            Err(e) => Err(ErrorFrame::new(
                ErrorCode::Unknown,
                "",
                format!("bad {} answer from the guest: {e}", wire::type_name(ty)),
            )),
        }
    };
    match req {
        Request::FsOpen { ref path }
        | Request::FsCreate { ref path }
        | Request::FsOpenFile { ref path, .. } => {
            let path = path.clone();
            open(agent, files, next_handle, &req, &path)
        }
        Request::FsReadFile { ref path } => match ask(agent, &req, path) {
            // EFBIG: larger than an agent frame; the helper reads it in chunks.
            Err(e) if e.errno == Some(nix::libc::EFBIG) => {
                let data = read_through_handle(agent, path)?;
                Ok(Response::FsReadFile { data }.into())
            }
            r => fields(r?),
        },
        // What does not fit in one agent frame goes through a handle.
        Request::FsWriteFile { ref path, ref data, perm }
            if 2 + 4 + path.len() + 4 + data.len() + 4 > MAX_CHUNK =>
        {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
            let open = Request::FsOpenFile { path: path.clone(), flags, perm };
            let a = decode_u64(&ask(agent, &open, path)?, "FsOpenFile")?;
            let written = write_chunks(agent, a, data, path);
            let closed = ask(agent, &Request::FileClose { handle: a }, path);
            written?;
            closed?;
            Ok(Response::FsWriteFile {}.into())
        }
        Request::FsWriteFile { .. }
        | Request::FsStat { .. }
        | Request::FsLstat { .. }
        | Request::FsRemove { .. }
        | Request::FsRemoveAll { .. }
        | Request::FsMkdir { .. }
        | Request::FsMkdirAll { .. }
        | Request::FsRename { .. }
        | Request::FsSymlink { .. }
        | Request::FsReadlink { .. }
        | Request::FsReadDir { .. }
        | Request::FsChmod { .. }
        | Request::FsChown { .. }
        | Request::FsChtimes { .. } => {
            let path = request_path(&req);
            fields(ask(agent, &req, &path)?)
        }
        Request::FileClose { handle } => {
            let a = agent_handle(files, handle)?;
            files.lock().remove(handle, "file")?;
            ask(agent, &Request::FileClose { handle: a }, "")?;
            Ok(Response::FileClose {}.into())
        }
        Request::FileRead { handle, max } => {
            // The helper splits: as much as asked, within one answer (see read_filled).
            let a = agent_handle(files, handle)?;
            let data = read_filled(agent, a, (max as usize).min(MAX_READ_FILE))?;
            Ok(Response::FileRead { data }.into())
        }
        Request::FileWrite { handle, data } => {
            let a = agent_handle(files, handle)?;
            let n = write_chunks(agent, a, &data, "")?;
            Ok(Response::FileWrite { written: n.min(u32::MAX as u64) as u32 }.into())
        }
        Request::FileSeek { handle, offset, whence } => {
            let a = agent_handle(files, handle)?;
            fields(ask_open(agent, &Request::FileSeek { handle: a, offset, whence })?)
        }
        Request::FileSync { handle } => {
            let a = agent_handle(files, handle)?;
            fields(ask_open(agent, &Request::FileSync { handle: a })?)
        }
        Request::FileTruncate { handle, size } => {
            let a = agent_handle(files, handle)?;
            fields(ask_open(agent, &Request::FileTruncate { handle: a, size })?)
        }
        Request::FileStat { handle } => {
            let a = agent_handle(files, handle)?;
            fields(ask_open(agent, &Request::FileStat { handle: a })?)
        }
        Request::FileName { handle } => {
            let a = agent_handle(files, handle)?;
            fields(ask_open(agent, &Request::FileName { handle: a })?)
        }
        other => Err(ErrorFrame::new(
            ErrorCode::InvalidArgument,
            "",
            format!("{} is not a filesystem message", other.name()),
        )),
    }
}

/// File messages on a command pipe handle.
fn serve_pipe(
    files: &Files,
    h: u64,
    slot: &PipeSlot,
    stream: u8,
    cmd: u64,
    cancelled: &dyn Fn() -> bool,
    req: Request,
) -> HandlerResult {
    let wrong = |what: &str| {
        Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", format!("{what} on {}", pipe_name(stream, cmd))))
    };
    match req {
        Request::FileClose { .. } => {
            files.lock().remove(h, "file")?;
            slot.close(stream, cancelled)?;
            Ok(Response::FileClose {}.into())
        }
        Request::FileRead { max, .. } if stream != 0 => {
            let data = slot.io(cancelled)?.read(stream, (max as usize).min(MAX_CHUNK), cancelled)?;
            Ok(Response::FileRead { data }.into())
        }
        Request::FileRead { .. } => wrong("FileRead (stdin is write-only)"),
        Request::FileWrite { data, .. } if stream == 0 => {
            slot.write_stdin(&data, cancelled)?;
            Ok(Response::FileWrite { written: data.len() as u32 }.into())
        }
        Request::FileWrite { .. } => wrong("FileWrite (output pipes are read-only)"),
        Request::FileName { .. } => Ok(Response::FileName { name: pipe_name(stream, cmd) }.into()),
        other => wrong(other.name()),
    }
}

/// The path a path operation names, for its errors.
fn request_path(req: &Request) -> String {
    match req {
        Request::FsReadFile { path }
        | Request::FsWriteFile { path, .. }
        | Request::FsStat { path }
        | Request::FsLstat { path }
        | Request::FsRemove { path }
        | Request::FsRemoveAll { path }
        | Request::FsMkdir { path, .. }
        | Request::FsMkdirAll { path, .. }
        | Request::FsReadlink { path }
        | Request::FsReadDir { path }
        | Request::FsChmod { path, .. }
        | Request::FsChown { path, .. }
        | Request::FsChtimes { path, .. } => path.clone(),
        Request::FsRename { from, .. } => from.clone(),
        Request::FsSymlink { link, .. } => link.clone(),
        _ => String::new(),
    }
}

/// Whether `handle` is a command pipe's (which the Conn* messages serve too).
pub(super) fn is_pipe(files: &Files, handle: u64) -> bool {
    files.lock().get(handle, "file").is_ok_and(|f| matches!(*f, HostFile::Pipe { .. }))
}

/// Whether Conn* messages on `handle` are served as on a pipe: it names one, or a
/// handle of this table (a pipe's, perhaps) that was closed, which then answers
/// AlreadyClosed.
pub(super) fn is_pipe_or_closed(files: &Files, handle: u64) -> bool {
    files.lock().was_freed(handle) || is_pipe(files, handle)
}

/// Whether `req` is one this module serves.
pub(super) fn is_fs(req: &Request) -> bool {
    matches!(req.ty() >> 8, 0x02 | 0x03) && !matches!(req, Request::FsSnapshot { .. })
}

/// The helper's Fs and File handlers against the agent's real file serving, over a
/// socket pair, with a scratch directory as the guest's root: no guest, milliseconds.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::guestless::Guestless;

    fn bytes(answer: Response) -> Vec<u8> {
        match answer {
            Response::FsReadFile { data } | Response::FileRead { data } => data,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn files_round_trip_and_errors_carry_the_errno() {
        let g = Guestless::files("fs-rt");
        let perm = wire::FileMode::from_unix(0o644);
        g.call(Request::FsWriteFile { path: "/a.txt".into(), data: b"hello".to_vec(), perm }).unwrap();
        assert_eq!(std::fs::read(g.dir.join("a.txt")).unwrap(), b"hello", "below the root, not in /");
        assert_eq!(bytes(g.call(Request::FsReadFile { path: "a.txt".into() }).unwrap()), b"hello");
        let Response::FsStat { info } = g.call(Request::FsStat { path: "/a.txt".into() }).unwrap() else {
            panic!("FsStat answered otherwise")
        };
        assert_eq!((info.name.as_str(), info.size), ("a.txt", 5));
        // A missing file: code IO, the errno as a field, not only as text.
        let e = g.call(Request::FsStat { path: "/missing".into() }).unwrap_err();
        assert_eq!((e.code, e.errno, e.path.as_str()), (ErrorCode::Io, Some(nix::libc::ENOENT), "/missing"));
        let err = crate::error::Error::Remote(e);
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        // `..` cannot climb above the root.
        g.call(Request::FsWriteFile { path: "/../../x.txt".into(), data: b"x".to_vec(), perm }).unwrap();
        assert!(g.dir.join("x.txt").exists());
    }

    #[test]
    fn a_file_larger_than_a_frame_is_read_through_a_handle_by_the_helper() {
        let g = Guestless::files("fs-big");
        // 3 MiB: three agent frames; the agent refuses FsReadFile with EFBIG unread and
        // the helper reads it in chunks.
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(g.dir.join("big"), &data).unwrap();
        assert_eq!(bytes(g.call(Request::FsReadFile { path: "/big".into() }).unwrap()), data);
        // Through a handle: one FileRead of 2.5 MiB is filled a frame at a time; the
        // rest comes short; then empty at the end.
        let h = g.handle(Request::FsOpen { path: "/big".into() });
        let first = bytes(g.call(Request::FileRead { handle: h, max: 5 << 19 }).unwrap());
        assert_eq!(first, data[..5 << 19]);
        let rest = bytes(g.call(Request::FileRead { handle: h, max: 4 << 20 }).unwrap());
        assert_eq!(rest, data[5 << 19..]);
        assert!(bytes(g.call(Request::FileRead { handle: h, max: 4096 }).unwrap()).is_empty());
        g.call(Request::FileClose { handle: h }).unwrap();
    }

    #[test]
    fn helper_handles_map_to_the_agents_and_a_closed_one_is_already_closed() {
        let g = Guestless::files("fs-handles");
        std::fs::write(g.dir.join("f"), b"abc").unwrap();
        // The helper's handles are its own numbers, not the agent's.
        g.skip_handles(100);
        let h = g.handle(Request::FsOpen { path: "/f".into() });
        assert!(h > 100, "{h}");
        assert_eq!(bytes(g.call(Request::FileRead { handle: h, max: 2 }).unwrap()), b"ab");
        g.call(Request::FileClose { handle: h }).unwrap();
        let e = g.call(Request::FileRead { handle: h, max: 2 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyClosed);
        let e = g.call(Request::FileClose { handle: h }).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyClosed);
        let e = g.call(Request::FileRead { handle: 99_999, max: 2 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidHandle);
    }
}
