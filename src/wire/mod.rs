//! The helper protocol on the wire, byte for byte compatible with v0.0.2 of the
//! original `ipc` package (see `docs/protocol.md` for the full catalogue).
//!
//! # Framing
//!
//! Every message is one frame: a 6-byte header, `u16 type` then `u32 payload length`,
//! both big-endian, followed by the payload. A request carries one of the message types
//! of [`msg`]; the answer is either a [`msg::RESPONSE`] frame whose payload starts with an
//! error-code byte (0 = OK) followed by the result fields, or a [`msg::ERROR`] frame
//! carrying an [`ErrorFrame`]. Streaming commands answer with several
//! [`msg::STREAM_CHUNK`] frames and one [`msg::STREAM_END`].
//!
//! # Primitives
//!
//! Everything is big-endian. `bool` is one byte (0 or 1); strings and byte strings are a
//! `u32` length and the data; a string list is a `u32` count and that many strings; a map
//! is a `u32` count and that many (key, value) string pairs.
//!
//! Every decoder is bounded: a frame larger than the configured maximum is refused
//! before anything is allocated for it, a length or count larger than the bytes that
//! remain is an error, and nothing in this module panics on any input.
//!
//! Files: `codec` (the primitives: [`Encoder`], [`Decoder`], [`Wire`]), `types` (the typed
//! payloads), `catalogue` (message numbers and names: [`msg`]), `requests` (every
//! request's fields: [`Request`]), `error` ([`ErrorCode`], [`ErrorFrame`],
//! [`DecodeError`]), `frame` (headers and frames on a stream).

mod catalogue;
mod codec;
mod error;
mod frame;
mod requests;
mod types;

pub use catalogue::{msg, type_name};
pub use codec::{DecodeError, Decoder, Encoder, Wire};
pub use error::{response_fields, ErrorCode, ErrorFrame};
pub use frame::{read_frame, read_header, write_frame, Frame, FrameError, Header};
pub use requests::{Field, Request, RequestRef, Response};
pub use types::{
    Backend, DirEntry, DockerfileOptions, FileInfo, FileMode, InstanceNew, InstanceOptions, MountConfig,
    SnapshotOptions, SourceType, StreamChunk, StreamEnd, NET_HOST_LOOPBACK, STREAM_STDERR, STREAM_STDOUT,
};

/// Size of the frame header in bytes: `u16` type and `u32` length.
pub const HEADER_SIZE: usize = 6;

/// The default bound on a frame's payload: 64 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// The most elements a string list, map or mount list may have. Bounds what a decoded
/// payload costs in memory (an empty string on the wire is 4 bytes, in memory 24).
pub const MAX_LIST: u32 = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_request_reads_its_strings_and_data_where_they_lie_in_the_payload() {
        let within = |payload: &[u8], field: &[u8]| {
            let (p, f) = (payload.as_ptr_range(), field.as_ptr_range());
            p.start <= f.start && f.end <= p.end
        };
        let req = Request::FsWriteFile { path: "/tmp/a".into(), data: vec![7; 100], perm: FileMode(0o640) };
        let payload = req.to_payload();
        let Some(RequestRef::FsWriteFile { path, data, perm }) =
            RequestRef::from_payload(msg::FS_WRITE_FILE, &payload).unwrap()
        else {
            panic!("not an FsWriteFile");
        };
        assert!(within(&payload, path.as_bytes()) && within(&payload, data), "borrowed, not copied");
        assert_eq!((path, data, perm), ("/tmp/a", &[7; 100][..], FileMode(0o640)));

        let req = Request::FileWrite { handle: 9, data: b"xyz".to_vec() };
        let payload = req.to_payload();
        let borrowed = RequestRef::from_payload(msg::FILE_WRITE, &payload).unwrap().unwrap();
        assert!(matches!(borrowed, RequestRef::FileWrite { handle: 9, data } if within(&payload, data)));
        assert_eq!(borrowed.into_owned(), req);

        let mut long = payload.clone();
        long.push(0);
        assert_eq!(
            RequestRef::from_payload(msg::FILE_WRITE, &long),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        assert!(matches!(
            RequestRef::from_payload(msg::FILE_WRITE, &payload[..payload.len() - 1]),
            Err(DecodeError::Truncated { needed: 3, remaining: 2, .. })
        ));
        assert_eq!(RequestRef::from_payload(msg::RESPONSE, &payload), Ok(None));
    }

    #[test]
    fn the_backend_is_an_optional_trailing_byte_of_instance_options() {
        let auto = InstanceOptions::default();
        let kvm = InstanceOptions { backend: Backend::Kvm, ..Default::default() };
        let (a, k) = (auto.to_payload(), kvm.to_payload());
        assert_eq!(k.len(), a.len() + 1, "auto adds nothing: v0.0.2 layout");
        assert_eq!((&k[..a.len()], k[a.len()]), (&a[..], 2));
        assert_eq!(InstanceOptions::from_payload(&k).unwrap().backend, Backend::Kvm);
        assert_eq!(InstanceOptions::from_payload(&a).unwrap().backend, Backend::Auto);
        for b in [0u8, 3, 9] {
            let mut bad = a.clone();
            bad.push(b);
            assert!(InstanceOptions::from_payload(&bad).is_err(), "{b}");
        }
        assert_eq!("qemu".parse::<Backend>(), Ok(Backend::Qemu));
        assert!("xen".parse::<Backend>().is_err());
    }

    #[test]
    fn catalogue_numbers_are_unique_and_sorted() {
        for pair in msg::ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} before {:?}", pair[0], pair[1]);
        }
        assert_eq!(msg::ALL.len(), 77);
        assert_eq!(type_name(0x0999), "0x0999");
        assert_eq!(type_name(msg::FS_READ_DIR), "FsReadDir");
    }

    #[test]
    fn error_codes_round_trip() {
        for b in [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99] {
            assert_eq!(ErrorCode::from_u8(b).as_u8(), b);
        }
        assert_eq!(ErrorCode::from_u8(42), ErrorCode::Unknown);
    }

    #[test]
    fn file_mode_from_unix() {
        assert_eq!(FileMode::from_unix(0o040755).0, FileMode::DIR | 0o755);
        assert_eq!(FileMode::from_unix(0o120777).0, FileMode::SYMLINK | 0o777);
        assert_eq!(FileMode::from_unix(0o100644).0, 0o644);
        assert_eq!(FileMode::from_unix(0o020620).0, FileMode::DEVICE | FileMode::CHAR_DEVICE | 0o620);
        assert_eq!(FileMode::from_unix(0o041777).0, FileMode::DIR | FileMode::STICKY | 0o777);
        assert_eq!(FileMode::from_unix(0o104755).0, FileMode::SETUID | 0o755);
        assert_eq!(FileMode(FileMode::SETGID | 0o750).to_unix_perm(), 0o2750);
    }

    #[test]
    fn decoder_bounds() {
        let mut d = Decoder::new(&[0, 0, 0, 9, b'a']);
        assert!(matches!(d.string(), Err(DecodeError::Truncated { needed: 9, .. })));
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.string_list(), Err(DecodeError::OutOfRange { .. })));
        let mut d = Decoder::new(&[0, 0, 0, 100, 0, 0, 0, 0]);
        assert!(matches!(d.string_list(), Err(DecodeError::CountTooLarge { count: 100, .. })));
        let mut d = Decoder::new(&[0, 0, 0, 1, 0xff]);
        assert_eq!(d.string(), Err(DecodeError::InvalidUtf8 { offset: 4 }));
        let mut d = Decoder::new(&[2]);
        assert_eq!(d.bool(), Err(DecodeError::InvalidBool { offset: 0, value: 2 }));
        assert_eq!(FileInfo::from_payload(&[0; 40]), Err(DecodeError::TrailingBytes { count: 14 }));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_payload() {
        let mut bytes = Header { ty: msg::FS_WRITE_FILE, len: 1000 }.to_bytes().to_vec();
        bytes.extend_from_slice(&[0; 10]);
        let err = read_frame(&mut &bytes[..], 999).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 1000, max: 999, .. }), "{err}");
        let err = read_frame(&mut &bytes[..], 1000).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { expected: 1006, got: 16 }), "{err}");
        assert!(matches!(read_frame(&mut &bytes[..3], 1000), Err(FrameError::Truncated { .. })));
        assert!(matches!(read_frame(&mut &[][..], 1000), Err(FrameError::Eof)));
    }
}
