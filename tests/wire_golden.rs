//! Golden byte vectors for the helper protocol, written by hand from the v0.0.2 layout
//! (DESIGN §3 and seeds/ipc-package.txt), never produced by the encoder under test.
//! Each vector is checked both ways: encode gives exactly these bytes, decode gives the
//! value back and consumes every byte.

use std::collections::BTreeMap;
use std::time::Duration;

use vmhost::wire::*;

fn check<T: Wire + PartialEq + std::fmt::Debug>(value: T, bytes: &[u8]) {
    assert_eq!(value.to_payload(), bytes, "encoding of {value:?}");
    assert_eq!(T::from_payload(bytes).unwrap(), value, "decoding of {bytes:02x?}");
    // Every strict prefix is refused as truncated, never accepted or panicking.
    for cut in 0..bytes.len() {
        assert!(T::from_payload(&bytes[..cut]).is_err(), "prefix of {cut} bytes accepted");
    }
    assert_trailing_refused(bytes, |b| T::from_payload(b).map(drop));
}

/// One extra byte is refused as trailing garbage. Payloads that end with InstanceOptions
/// read two optional bytes more (the backend: 1 qemu, 2 kvm, auto no byte or 0 before
/// flags; the network flags: 0x01, none no byte), so there a lone 0 is refused as an
/// out-of-range backend, a 0 flags byte as out of range, and the garbage after a valid
/// backend and flags byte as trailing.
fn assert_trailing_refused(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<(), DecodeError>) {
    let mut longer = bytes.to_vec();
    longer.push(0);
    match decode(&longer) {
        Err(DecodeError::OutOfRange { field: "backend", .. }) => {
            let with = |extra: &[u8]| {
                let mut v = bytes.to_vec();
                v.extend_from_slice(extra);
                decode(&v)
            };
            assert!(matches!(with(&[1, 0]), Err(DecodeError::OutOfRange { field: "network flags", .. })));
            assert!(matches!(with(&[0, 2]), Err(DecodeError::OutOfRange { field: "network flags", .. })));
            assert_eq!(with(&[0, 1]), Ok(()));
            assert_eq!(with(&[1, 1, 0]), Err(DecodeError::TrailingBytes { count: 1 }));
        }
        other => assert_eq!(other, Err(DecodeError::TrailingBytes { count: 1 })),
    }
}

#[test]
fn message_type_numbers() {
    // Typed in from the seed's constant block, in its order.
    let expected: &[(&str, u16)] = &[
        ("InstanceNew", 0x0100),
        ("InstanceClose", 0x0101),
        ("InstanceWait", 0x0102),
        ("InstanceID", 0x0103),
        ("InstanceIsRunning", 0x0104),
        ("InstanceSetConsole", 0x0105),
        ("InstanceSetNetwork", 0x0106),
        ("InstanceExec", 0x0107),
        ("InstanceEnd", 0x0108),
        ("InstancePublish", 0x0109),
        ("FsOpen", 0x0200),
        ("FsCreate", 0x0201),
        ("FsOpenFile", 0x0202),
        ("FsReadFile", 0x0203),
        ("FsWriteFile", 0x0204),
        ("FsStat", 0x0205),
        ("FsLstat", 0x0206),
        ("FsRemove", 0x0207),
        ("FsRemoveAll", 0x0208),
        ("FsMkdir", 0x0209),
        ("FsMkdirAll", 0x020A),
        ("FsRename", 0x020B),
        ("FsSymlink", 0x020C),
        ("FsReadlink", 0x020D),
        ("FsReadDir", 0x020E),
        ("FsChmod", 0x020F),
        ("FsChown", 0x0210),
        ("FsChtimes", 0x0211),
        ("FsSnapshot", 0x0212),
        ("FileClose", 0x0300),
        ("FileRead", 0x0301),
        ("FileWrite", 0x0302),
        ("FileSeek", 0x0303),
        ("FileSync", 0x0304),
        ("FileTruncate", 0x0305),
        ("FileStat", 0x0306),
        ("FileName", 0x0307),
        ("CmdNew", 0x0400),
        ("CmdEntrypoint", 0x0401),
        ("CmdFree", 0x0402),
        ("CmdSetDir", 0x0403),
        ("CmdSetEnv", 0x0404),
        ("CmdGetEnv", 0x0405),
        ("CmdEnviron", 0x0406),
        ("CmdStart", 0x0407),
        ("CmdWait", 0x0408),
        ("CmdRun", 0x0409),
        ("CmdOutput", 0x040A),
        ("CmdCombinedOutput", 0x040B),
        ("CmdExitCode", 0x040C),
        ("CmdKill", 0x040D),
        ("CmdStdoutPipe", 0x040E),
        ("CmdStderrPipe", 0x040F),
        ("CmdStdinPipe", 0x0410),
        ("CmdRunStreaming", 0x0411),
        ("CmdSetTty", 0x0412),
        ("NetListen", 0x0500),
        ("ListenerAccept", 0x0501),
        ("ListenerClose", 0x0502),
        ("ListenerAddr", 0x0503),
        ("ConnRead", 0x0504),
        ("ConnWrite", 0x0505),
        ("ConnClose", 0x0506),
        ("ConnLocalAddr", 0x0507),
        ("ConnRemoteAddr", 0x0508),
        ("NetConnect", 0x0509),
        ("ConnCloseWrite", 0x050A),
        ("ConnSetTimeouts", 0x050B),
        ("SnapshotCacheKey", 0x0600),
        ("SnapshotParent", 0x0601),
        ("SnapshotClose", 0x0602),
        ("SnapshotAsSource", 0x0603),
        ("BuildDockerfile", 0x0700),
        ("Response", 0xFF00),
        ("Error", 0xFF01),
        ("StreamChunk", 0xFF02),
        ("StreamEnd", 0xFF03),
    ];
    let got: Vec<(&str, u16)> = msg::ALL.iter().map(|&(n, s)| (s, n)).collect();
    assert_eq!(got, expected);
    // The constants themselves (a sample of each group).
    assert_eq!(msg::INSTANCE_NEW, 0x0100);
    assert_eq!(msg::INSTANCE_EXEC, 0x0107);
    assert_eq!(msg::FS_MKDIR_ALL, 0x020A);
    assert_eq!(msg::FS_SNAPSHOT, 0x0212);
    assert_eq!(msg::FILE_NAME, 0x0307);
    assert_eq!(msg::CMD_KILL, 0x040D);
    assert_eq!(msg::CMD_RUN_STREAMING, 0x0411);
    assert_eq!(msg::CONN_REMOTE_ADDR, 0x0508);
    assert_eq!(msg::SNAPSHOT_AS_SOURCE, 0x0603);
    assert_eq!(msg::BUILD_DOCKERFILE, 0x0700);
    assert_eq!(
        (msg::RESPONSE, msg::ERROR, msg::STREAM_CHUNK, msg::STREAM_END),
        (0xFF00, 0xFF01, 0xFF02, 0xFF03)
    );
}

#[test]
fn error_code_numbers() {
    let expected = [
        (ErrorCode::Ok, 0u8),
        (ErrorCode::InvalidHandle, 1),
        (ErrorCode::InvalidArgument, 2),
        (ErrorCode::NotRunning, 3),
        (ErrorCode::AlreadyClosed, 4),
        (ErrorCode::Timeout, 5),
        (ErrorCode::HypervisorUnavailable, 6),
        (ErrorCode::Io, 7),
        (ErrorCode::Network, 8),
        (ErrorCode::Cancelled, 9),
        (ErrorCode::Unknown, 99),
    ];
    for (code, byte) in expected {
        assert_eq!(code.as_u8(), byte);
        assert_eq!(ErrorCode::from_u8(byte), code);
    }
}

#[test]
fn header() {
    let h = Header { ty: 0x0103, len: 0x01020304 };
    assert_eq!(h.to_bytes(), [0x01, 0x03, 0x01, 0x02, 0x03, 0x04]);
    assert_eq!(Header::from_bytes([0xFF, 0x01, 0, 0, 0, 7]), Header { ty: 0xFF01, len: 7 });
    let mut out = Vec::new();
    write_frame(&mut out, msg::INSTANCE_ID, &[], DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(out, [0x01, 0x03, 0, 0, 0, 0]);
    let mut out = Vec::new();
    write_frame(&mut out, msg::RESPONSE, &[0, 0xAA], DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(out, [0xFF, 0x00, 0, 0, 0, 2, 0, 0xAA]);
    let f = read_frame(&mut &out[..], DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(f, Frame { ty: 0xFF00, payload: vec![0, 0xAA] });
}

#[test]
fn primitives() {
    let mut e = Encoder::new();
    e.u8(0xAB)
        .u16(0x0102)
        .u32(0x03040506)
        .u64(0x0708090A0B0C0D0E)
        .i32(-2)
        .i64(-3)
        .bool(true)
        .bool(false)
        .string("hé")
        .bytes(&[0, 1])
        .string_list(&["a", ""]);
    let mut map = BTreeMap::new();
    map.insert("k".to_string(), "v".to_string());
    map.insert("a".to_string(), "bc".to_string());
    e.string_map(&map);
    #[rustfmt::skip]
    let want: &[u8] = &[
        0xAB,
        0x01, 0x02,
        0x03, 0x04, 0x05, 0x06,
        0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E,
        0xFF, 0xFF, 0xFF, 0xFE,
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFD,
        1,
        0,
        0, 0, 0, 3, b'h', 0xC3, 0xA9,
        0, 0, 0, 2, 0, 1,
        0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0,
        0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 2, b'b', b'c', 0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v',
    ];
    assert_eq!(e.as_bytes(), want);
    let mut d = Decoder::new(want);
    assert_eq!(d.u8().unwrap(), 0xAB);
    assert_eq!(d.u16().unwrap(), 0x0102);
    assert_eq!(d.u32().unwrap(), 0x03040506);
    assert_eq!(d.u64().unwrap(), 0x0708090A0B0C0D0E);
    assert_eq!(d.i32().unwrap(), -2);
    assert_eq!(d.i64().unwrap(), -3);
    assert!(d.bool().unwrap());
    assert!(!d.bool().unwrap());
    assert_eq!(d.string().unwrap(), "hé");
    assert_eq!(d.bytes().unwrap(), vec![0, 1]);
    assert_eq!(d.string_list().unwrap(), vec!["a".to_string(), String::new()]);
    assert_eq!(d.string_map().unwrap(), map);
    d.finish().unwrap();
}

#[test]
fn file_info() {
    #[rustfmt::skip]
    let bytes = [
        0, 0, 0, 5, b'h', b'o', b's', b't', b's',       // name
        0, 0, 0, 0, 0, 0, 0x01, 0x00,                   // size 256
        0x80, 0, 0x01, 0xED,                            // mode: ModeDir | 0755
        0, 0, 0, 0, 0x65, 0x53, 0xF1, 0x00,             // mtime 1700000000
        1,                                              // isDir
        0,                                              // isSymlink
    ];
    check(
        FileInfo {
            name: "hosts".into(),
            size: 256,
            mode: FileMode(FileMode::DIR | 0o755),
            mod_time: 1_700_000_000,
            is_dir: true,
            is_symlink: false,
        },
        &bytes,
    );
    // A symlink: ModeSymlink = 1<<27 = 0x08000000.
    #[rustfmt::skip]
    let bytes = [
        0, 0, 0, 1, b'l',
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // size -1
        0x08, 0, 0x01, 0xFF,
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, // mtime -2
        0,
        1,
    ];
    check(
        FileInfo {
            name: "l".into(),
            size: -1,
            mode: FileMode(FileMode::SYMLINK | 0o777),
            mod_time: -2,
            is_dir: false,
            is_symlink: true,
        },
        &bytes,
    );
}

#[test]
fn file_mode_bits_are_go_fs_filemode() {
    assert_eq!(FileMode::DIR, 0x8000_0000);
    assert_eq!(FileMode::APPEND, 0x4000_0000);
    assert_eq!(FileMode::EXCLUSIVE, 0x2000_0000);
    assert_eq!(FileMode::TEMPORARY, 0x1000_0000);
    assert_eq!(FileMode::SYMLINK, 0x0800_0000);
    assert_eq!(FileMode::DEVICE, 0x0400_0000);
    assert_eq!(FileMode::NAMED_PIPE, 0x0200_0000);
    assert_eq!(FileMode::SOCKET, 0x0100_0000);
    assert_eq!(FileMode::SETUID, 0x0080_0000);
    assert_eq!(FileMode::SETGID, 0x0040_0000);
    assert_eq!(FileMode::CHAR_DEVICE, 0x0020_0000);
    assert_eq!(FileMode::STICKY, 0x0010_0000);
    assert_eq!(FileMode::IRREGULAR, 0x0008_0000);
}

#[test]
fn dir_entry() {
    check(
        DirEntry { name: "etc".into(), is_dir: true, mode: FileMode(FileMode::DIR) },
        &[0, 0, 0, 3, b'e', b't', b'c', 1, 0x80, 0, 0, 0],
    );
    check(
        DirEntry { name: "s".into(), is_dir: false, mode: FileMode(FileMode::SOCKET | 0o600) },
        &[0, 0, 0, 1, b's', 0, 0x01, 0, 0x01, 0x80],
    );
}

#[test]
fn mount_config() {
    check(
        MountConfig { tag: "src".into(), host_path: "/h".into(), writable: true },
        &[0, 0, 0, 3, b's', b'r', b'c', 0, 0, 0, 2, b'/', b'h', 1],
    );
}

#[test]
fn instance_options() {
    #[rustfmt::skip]
    let bytes = [
        0, 0, 0, 0, 0, 0, 0x02, 0x00,                   // memory 512 MB
        0, 0, 0, 2,                                     // cpus 2
        0, 0, 0, 0x06, 0xFC, 0x23, 0xAC, 0x00,          // timeout 30 s = 30e9 ns
        0, 0, 0, 4, b'r', b'o', b'o', b't',             // user
        1,                                              // dmesg
        0, 0, 0, 2,                                     // two mounts
        0, 0, 0, 1, b'a', 0, 0, 0, 2, b'/', b'a', 0,
        0, 0, 0, 1, b'b', 0, 0, 0, 0, 1,
    ];
    check(
        InstanceOptions {
            memory_mb: 512,
            cpus: 2,
            timeout: Some(Duration::from_secs(30)),
            user: "root".into(),
            dmesg: true,
            mounts: vec![
                MountConfig { tag: "a".into(), host_path: "/a".into(), writable: false },
                MountConfig { tag: "b".into(), host_path: String::new(), writable: true },
            ],
            backend: Default::default(),
            host_loopback: false,
        },
        &bytes,
    );
    // Zero timeout means none; negative cpus pass through as i32.
    #[rustfmt::skip]
    let bytes = [
        0, 0, 0, 0, 0, 0, 0, 0,
        0xFF, 0xFF, 0xFF, 0xFF,
        0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0,
        0,
        0, 0, 0, 0,
    ];
    check(InstanceOptions { cpus: -1, ..InstanceOptions::default() }, &bytes);
    // vmhost's trailing bytes: the backend, then the network flags. (Their prefixes are
    // other values' encodings, so `check`'s prefix rule does not apply.)
    let o = InstanceOptions { cpus: -1, ..InstanceOptions::default() };
    use vmhost::wire::Backend::{Auto, Kvm, Qemu};
    for (value, extra) in [
        (InstanceOptions { backend: Qemu, ..o.clone() }, &[1][..]),
        (InstanceOptions { backend: Auto, host_loopback: true, ..o.clone() }, &[0, 1]),
        (InstanceOptions { backend: Kvm, host_loopback: true, ..o.clone() }, &[2, 1]),
    ] {
        let b = [&bytes[..], extra].concat();
        assert_eq!(value.to_payload(), b, "encoding of {value:?}");
        assert_eq!(InstanceOptions::from_payload(&b).unwrap(), value, "decoding of {b:02x?}");
    }
}

#[test]
fn instance_new() {
    #[rustfmt::skip]
    let mut bytes = vec![
        1,                                  // source type: dir
        0, 0, 0, 2, b'/', b'r',             // source path
        0, 0, 0, 0,                         // image ref
        0, 0, 0, 2, b'/', b'c',             // cache dir
    ];
    #[rustfmt::skip]
    bytes.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 128,
        0, 0, 0, 1,
        0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0,
        0,
        0, 0, 0, 0,
    ]);
    check(
        InstanceNew {
            source_type: SourceType::Dir,
            source_path: "/r".into(),
            image_ref: String::new(),
            cache_dir: "/c".into(),
            options: InstanceOptions { memory_mb: 128, cpus: 1, ..InstanceOptions::default() },
        },
        &bytes,
    );
    // 3 is a snapshot (vmhost's addition); 4 is nothing.
    bytes[0] = 3;
    assert_eq!(InstanceNew::from_payload(&bytes).unwrap().source_type, SourceType::Snapshot);
    bytes[0] = 4;
    assert!(matches!(InstanceNew::from_payload(&bytes), Err(DecodeError::OutOfRange { .. })));
}

#[test]
fn snapshot_options() {
    check(
        SnapshotOptions { excludes: vec!["/tmp".into(), "/proc".into()], cache_dir: "/c".into() },
        &[
            0, 0, 0, 2, 0, 0, 0, 4, b'/', b't', b'm', b'p', 0, 0, 0, 5, b'/', b'p', b'r', b'o', b'c', 0, 0,
            0, 2, b'/', b'c',
        ],
    );
}

#[test]
fn dockerfile_options() {
    let mut args = BTreeMap::new();
    args.insert("V".to_string(), "1".to_string());
    #[rustfmt::skip]
    let bytes = [
        0, 0, 0, 8, b'F', b'R', b'O', b'M', b' ', b'a', b'\n', 0xFF, // dockerfile bytes (not UTF-8)
        0, 0, 0, 1, b'.',                                            // context dir
        0, 0, 0, 2, b'/', b'c',                                      // cache dir
        0, 0, 0, 1, 0, 0, 0, 1, b'V', 0, 0, 0, 1, b'1',              // build args
    ];
    check(
        DockerfileOptions {
            dockerfile: b"FROM a\n\xFF".to_vec(),
            context_dir: ".".into(),
            cache_dir: "/c".into(),
            build_args: args,
        },
        &bytes,
    );
}

#[test]
fn error_frame() {
    check(
        ErrorFrame {
            code: ErrorCode::NotRunning,
            message: "m".into(),
            op: "FsOpen".into(),
            path: "/p".into(),
            errno: None,
        },
        &[3, 0, 0, 0, 1, b'm', 0, 0, 0, 6, b'F', b's', b'O', b'p', b'e', b'n', 0, 0, 0, 2, b'/', b'p'],
    );
    check(ErrorFrame::new(ErrorCode::Unknown, "", ""), &[99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // vmhost's trailing errno (ENOENT), when a system call failed; a v0.0.2 frame, without
    // it, decodes with none (above). Every prefix but the v0.0.2 frame itself is refused.
    let with_errno =
        ErrorFrame::new(ErrorCode::Io, "FsStat", "No such file or directory").with_path("/x").with_errno(2);
    let bytes = [
        &[7, 0, 0, 0, 25][..],
        b"No such file or directory",
        &[0, 0, 0, 6],
        b"FsStat",
        &[0, 0, 0, 2, b'/', b'x', 0, 0, 0, 2],
    ]
    .concat();
    assert_eq!(with_errno.to_payload(), bytes);
    assert_eq!(ErrorFrame::from_payload(&bytes).unwrap(), with_errno);
    let v002 = bytes.len() - 4;
    for cut in 0..bytes.len() {
        let decoded = ErrorFrame::from_payload(&bytes[..cut]);
        if cut == v002 {
            assert_eq!(decoded.unwrap(), ErrorFrame { errno: None, ..with_errno.clone() });
        } else {
            assert!(decoded.is_err(), "prefix of {cut} bytes accepted");
        }
    }
    assert_trailing_refused(&bytes, |b| ErrorFrame::from_payload(b).map(drop));
}

#[test]
fn response_leading_code_byte() {
    // InstanceID's answer: 0, then the id string.
    let payload = [0, 0, 0, 0, 2, b'v', b'1'];
    let fields = response_fields(&payload).unwrap().unwrap();
    assert_eq!(Decoder::new(fields).string().unwrap(), "v1");
    assert_eq!(Encoder::response().as_bytes(), &[0]);
    // A non-zero leading byte is an error of that code.
    let err = response_fields(&[5]).unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout);
    assert!(response_fields(&[]).is_err());
}

#[test]
fn stream_frames() {
    check(StreamChunk { stream: STREAM_STDERR, data: b"err".to_vec() }, &[2, 0, 0, 0, 3, b'e', b'r', b'r']);
    check(StreamChunk { stream: STREAM_STDOUT, data: vec![] }, &[1, 0, 0, 0, 0]);
    assert_eq!(StreamChunk::payload(STREAM_STDERR, b"err"), [2, 0, 0, 0, 3, b'e', b'r', b'r']);
    assert!(StreamChunk::from_payload(&[3, 0, 0, 0, 0]).is_err());
    check(StreamEnd { exit_code: -1 }, &[0, 0xFF, 0xFF, 0xFF, 0xFF]);
    check(StreamEnd { exit_code: 7 }, &[0, 0, 0, 0, 7]);
    assert!(StreamEnd::from_payload(&[1, 0, 0, 0, 0]).is_err());
}

// Hand-written encodings of the primitives, for the per-message vectors below.
fn s(v: &str) -> Vec<u8> {
    let mut out = vec![0, 0, 0, v.len() as u8];
    out.extend_from_slice(v.as_bytes());
    out
}
fn h(handle: u8) -> Vec<u8> {
    vec![0, 0, 0, 0, 0, 0, 0, handle]
}
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// One hand-written request payload per request message of the catalogue.
fn request_vectors() -> Vec<(Request, Vec<u8>)> {
    let path = || "/a".to_string();
    #[rustfmt::skip]
    let v = vec![
        (Request::InstanceNew { new: InstanceNew {
            source_type: SourceType::Tar, source_path: "/t".into(), image_ref: "r".into(), cache_dir: String::new(),
            options: InstanceOptions::default() } },
         cat(&[&[0], &s("/t"), &s("r"), &s(""), &[0; 8], &[0; 4], &[0; 8], &s(""), &[0], &[0; 4]])),
        (Request::InstanceClose {}, vec![]),
        (Request::InstanceWait {}, vec![]),
        (Request::InstanceId {}, vec![]),
        (Request::InstanceIsRunning {}, vec![]),
        (Request::InstanceSetConsole { cols: 80, rows: 24 }, vec![0, 0, 0, 80, 0, 0, 0, 24]),
        (Request::InstanceSetNetwork { enabled: true }, vec![1]),
        (Request::InstanceExec { name: "sh".into(), args: vec!["-c".into()] }, cat(&[&s("sh"), &[0, 0, 0, 1], &s("-c")])),
        (Request::InstanceEnd {}, vec![]),
        (Request::InstancePublish { address: "127.0.0.1:0".into(), guest_port: 22 }, cat(&[&s("127.0.0.1:0"), &[0, 0, 0, 22]])),
        (Request::FsOpen { path: path() }, s("/a")),
        (Request::FsCreate { path: path() }, s("/a")),
        (Request::FsOpenFile { path: path(), flags: 0o1101, perm: FileMode(0o644) },
         cat(&[&s("/a"), &[0, 0, 0x02, 0x41], &[0, 0, 0x01, 0xA4]])),
        (Request::FsReadFile { path: path() }, s("/a")),
        (Request::FsWriteFile { path: path(), data: b"hi".to_vec(), perm: FileMode(0o600) },
         cat(&[&s("/a"), &[0, 0, 0, 2, b'h', b'i'], &[0, 0, 0x01, 0x80]])),
        (Request::FsStat { path: path() }, s("/a")),
        (Request::FsLstat { path: path() }, s("/a")),
        (Request::FsRemove { path: path() }, s("/a")),
        (Request::FsRemoveAll { path: path() }, s("/a")),
        (Request::FsMkdir { path: path(), perm: FileMode(0o755) }, cat(&[&s("/a"), &[0, 0, 0x01, 0xED]])),
        (Request::FsMkdirAll { path: path(), perm: FileMode(0o700) }, cat(&[&s("/a"), &[0, 0, 0x01, 0xC0]])),
        (Request::FsRename { from: path(), to: "/b".into() }, cat(&[&s("/a"), &s("/b")])),
        (Request::FsSymlink { target: path(), link: "/l".into() }, cat(&[&s("/a"), &s("/l")])),
        (Request::FsReadlink { path: path() }, s("/a")),
        (Request::FsReadDir { path: path() }, s("/a")),
        (Request::FsChmod { path: path(), mode: FileMode(FileMode::SETUID | 0o755) },
         cat(&[&s("/a"), &[0, 0x80, 0x01, 0xED]])),
        (Request::FsChown { path: path(), uid: 1000, gid: -1 }, cat(&[&s("/a"), &[0, 0, 0x03, 0xE8], &[0xFF; 4]])),
        (Request::FsChtimes { path: path(), atime: 1, mtime: 2 }, cat(&[&s("/a"), &[0, 0, 0, 0, 0, 0, 0, 1], &[0, 0, 0, 0, 0, 0, 0, 2]])),
        (Request::FsSnapshot { opts: SnapshotOptions { excludes: vec!["/x".into()], cache_dir: "/c".into() } },
         cat(&[&[0, 0, 0, 1], &s("/x"), &s("/c")])),
        (Request::FileClose { handle: 1 }, h(1)),
        (Request::FileRead { handle: 2, max: 65536 }, cat(&[&h(2), &[0, 1, 0, 0]])),
        (Request::FileWrite { handle: 3, data: vec![9] }, cat(&[&h(3), &[0, 0, 0, 1, 9]])),
        (Request::FileSeek { handle: 4, offset: -1, whence: 2 }, cat(&[&h(4), &[0xFF; 8], &[0, 0, 0, 2]])),
        (Request::FileSync { handle: 5 }, h(5)),
        (Request::FileTruncate { handle: 6, size: 256 }, cat(&[&h(6), &[0, 0, 0, 0, 0, 0, 1, 0]])),
        (Request::FileStat { handle: 7 }, h(7)),
        (Request::FileName { handle: 8 }, h(8)),
        (Request::CmdNew { name: "ls".into(), args: vec![] }, cat(&[&s("ls"), &[0, 0, 0, 0]])),
        (Request::CmdEntrypoint { args: vec!["a".into(), "b".into()] }, cat(&[&[0, 0, 0, 2], &s("a"), &s("b")])),
        (Request::CmdFree { handle: 1 }, h(1)),
        (Request::CmdSetDir { handle: 1, dir: "/w".into() }, cat(&[&h(1), &s("/w")])),
        (Request::CmdSetEnv { handle: 1, key: "K".into(), value: "V".into() }, cat(&[&h(1), &s("K"), &s("V")])),
        (Request::CmdGetEnv { handle: 1, key: "K".into() }, cat(&[&h(1), &s("K")])),
        (Request::CmdEnviron { handle: 1 }, h(1)),
        (Request::CmdStart { handle: 1 }, h(1)),
        (Request::CmdWait { handle: 1 }, h(1)),
        (Request::CmdRun { handle: 1 }, h(1)),
        (Request::CmdOutput { handle: 1 }, h(1)),
        (Request::CmdCombinedOutput { handle: 1 }, h(1)),
        (Request::CmdExitCode { handle: 1 }, h(1)),
        (Request::CmdKill { handle: 1 }, h(1)),
        (Request::CmdStdoutPipe { handle: 1 }, h(1)),
        (Request::CmdStderrPipe { handle: 1 }, h(1)),
        (Request::CmdStdinPipe { handle: 1 }, h(1)),
        (Request::CmdRunStreaming { handle: 1 }, h(1)),
        (Request::CmdSetTty { handle: 1, enabled: true }, cat(&[&h(1), &[1]])),
        (Request::NetListen { network: "tcp".into(), address: ":80".into() }, cat(&[&s("tcp"), &s(":80")])),
        (Request::ListenerAccept { handle: 1 }, h(1)),
        (Request::ListenerClose { handle: 1 }, h(1)),
        (Request::ListenerAddr { handle: 1 }, h(1)),
        (Request::ConnRead { handle: 1, max: 4096 }, cat(&[&h(1), &[0, 0, 0x10, 0]])),
        (Request::ConnWrite { handle: 1, data: vec![] }, cat(&[&h(1), &[0, 0, 0, 0]])),
        (Request::ConnClose { handle: 1 }, h(1)),
        (Request::ConnLocalAddr { handle: 1 }, h(1)),
        (Request::ConnRemoteAddr { handle: 1 }, h(1)),
        (Request::NetConnect { network: "tcp".into(), address: ":80".into() }, cat(&[&s("tcp"), &s(":80")])),
        (Request::ConnCloseWrite { handle: 1 }, h(1)),
        (Request::ConnSetTimeouts { handle: 1, read_ms: 500, write_ms: 0 }, cat(&[&h(1), &[0, 0, 1, 0xF4], &[0, 0, 0, 0]])),
        (Request::SnapshotCacheKey { handle: 1 }, h(1)),
        (Request::SnapshotParent { handle: 1 }, h(1)),
        (Request::SnapshotClose { handle: 1 }, h(1)),
        (Request::SnapshotAsSource { handle: 1 }, h(1)),
        (Request::BuildDockerfile { opts: DockerfileOptions {
            dockerfile: b"FROM a".to_vec(), context_dir: String::new(), cache_dir: "/c".into(), build_args: BTreeMap::new() } },
         cat(&[&s("FROM a"), &s(""), &s("/c"), &[0, 0, 0, 0]])),
    ];
    v
}

#[test]
fn every_request_message_encodes_as_documented() {
    let vectors = request_vectors();
    let request_types: Vec<u16> = msg::ALL.iter().map(|&(t, _)| t).filter(|&t| !msg::is_answer(t)).collect();
    let covered: Vec<u16> = vectors.iter().map(|(r, _)| r.ty()).collect();
    assert_eq!(covered, request_types, "one vector per request type, in catalogue order");
    for (req, bytes) in vectors {
        assert_eq!(req.to_payload(), bytes, "{} encoding", req.name());
        assert_eq!(
            Request::from_payload(req.ty(), &bytes).unwrap(),
            Some(req.clone()),
            "{} decoding",
            req.name()
        );
        assert_trailing_refused(&bytes, |b| Request::from_payload(req.ty(), b).map(drop));
        for cut in 0..bytes.len() {
            assert!(Request::from_payload(req.ty(), &bytes[..cut]).is_err(), "{} prefix {cut}", req.name());
        }
        // The whole frame: header then payload.
        let mut frame = Vec::new();
        write_frame(&mut frame, req.ty(), &bytes, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&frame[..2], &req.ty().to_be_bytes());
        assert_eq!(&frame[2..6], &(bytes.len() as u32).to_be_bytes());
        assert_eq!(&frame[6..], &bytes[..]);
    }
    assert_eq!(Request::from_payload(msg::RESPONSE, &[]), Ok(None));
    assert_eq!(Request::from_payload(0x0999, &[]), Ok(None));
}

/// Every answer's fields, by hand from `docs/protocol.md`: one vector per layout, both
/// ways, each prefix refused, a trailing byte refused; and the whole Response payload
/// is the OK byte then the fields.
#[test]
fn responses() {
    let hosts = FileInfo {
        name: "h".into(),
        size: 2,
        mode: FileMode(0o644),
        mod_time: 1,
        is_dir: false,
        is_symlink: false,
    };
    #[rustfmt::skip]
    let cases: Vec<(Response, Vec<u8>)> = vec![
        (Response::InstanceClose {}, vec![]),
        (Response::InstanceId { id: "v1".into() }, vec![0, 0, 0, 2, b'v', b'1']),
        (Response::InstanceIsRunning { running: true }, vec![1]),
        (Response::InstanceEnd { kind: 8, number: 3, detail: "x".into() },
            vec![8, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, b'x']),
        (Response::FsOpen { handle: 0x0102 }, vec![0, 0, 0, 0, 0, 0, 1, 2]),
        (Response::FsReadFile { data: b"ab".to_vec() }, vec![0, 0, 0, 2, b'a', b'b']),
        (Response::FsStat { info: hosts.clone() },
            vec![0, 0, 0, 1, b'h', 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0x01, 0xA4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
        (Response::FsReadDir { entries: vec![DirEntry { name: "a".into(), is_dir: true, mode: FileMode(FileMode::DIR) }] },
            vec![0, 0, 0, 1, 0, 0, 0, 1, b'a', 1, 0x80, 0, 0, 0]),
        (Response::FileWrite { written: 5 }, vec![0, 0, 0, 5]),
        (Response::FileSeek { offset: -1 }, vec![0xFF; 8]),
        (Response::CmdEnviron { env: vec!["A=1".into()] }, vec![0, 0, 0, 1, 0, 0, 0, 3, b'A', b'=', b'1']),
        (Response::CmdWait { exit_code: -1 }, vec![0xFF; 4]),
        (Response::CmdOutput { output: b"hi".to_vec(), exit_code: 3 }, vec![0, 0, 0, 2, b'h', b'i', 0, 0, 0, 3]),
        (Response::SnapshotAsSource { source_type: 1, source_path: "/s".into() }, vec![1, 0, 0, 0, 2, b'/', b's']),
    ];
    for (r, bytes) in cases {
        let mut enc = Encoder::new();
        r.encode(&mut enc);
        assert_eq!(enc.as_bytes(), &bytes[..], "encoding of {r:?}");
        assert_eq!(r.to_payload(), [&[0u8][..], &bytes].concat(), "{r:?}: the OK byte first");
        assert_eq!(
            Response::from_fields(r.ty(), &bytes).unwrap(),
            Some(r.clone()),
            "decoding of {bytes:02x?}"
        );
        for cut in 0..bytes.len() {
            assert!(Response::from_fields(r.ty(), &bytes[..cut]).is_err(), "{r:?}: prefix of {cut} accepted");
        }
        let longer = [&bytes[..], &[0]].concat();
        assert!(Response::from_fields(r.ty(), &longer).is_err(), "{r:?}: a trailing byte accepted");
    }
    // Not a request: no answer layout.
    assert_eq!(Response::from_fields(msg::RESPONSE, &[]).unwrap(), None);
}

/// The catalogue gives every request an answer layout: each reads from zero bytes
/// (empty strings and lists, zero numbers) as the answer to its own type.
#[test]
fn every_request_has_its_answers_layout() {
    let zeros = [0u8; 64];
    for &(ty, name) in msg::ALL.iter().filter(|&&(t, _)| !msg::is_answer(t)) {
        let r = Response::read(ty, &mut Decoder::new(&zeros)).unwrap().unwrap_or_else(|| panic!("{name}"));
        assert_eq!((r.ty(), r.name()), (ty, name));
    }
}
