//! Randomized robustness test of every helper-protocol decoder: mutated valid encodings
//! and pure random bytes, `VMHOST_FUZZ_ITERATIONS` inputs per decoder (default
//! 1,000,000). A decoder passes when it never panics, never reads past its input and
//! either refuses an input or decodes a value that encodes back to the same bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use vmhost::wire::*;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> usize {
    std::env::var("VMHOST_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

/// One input derived from a seed encoding.
fn mutate(rng: &mut Rng, seed: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match rng.below(8) {
        0 => {
            // Pure random bytes, short.
            let n = rng.below(64);
            out.extend((0..n).map(|_| rng.next() as u8));
        }
        1 => {
            // Truncated.
            out.extend_from_slice(&seed[..rng.below(seed.len() + 1)]);
        }
        2 => {
            // A huge length or count planted at a random offset.
            out.extend_from_slice(seed);
            if out.len() >= 4 {
                let at = rng.below(out.len() - 3);
                let v: u32 = [u32::MAX, 0x8000_0000, 0x0100_0000, 0xFFFF][rng.below(4)];
                out[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        3 => {
            // Trailing garbage.
            out.extend_from_slice(seed);
            let n = 1 + rng.below(8);
            out.extend((0..n).map(|_| rng.next() as u8));
        }
        _ => {
            // Bit flips and byte changes.
            out.extend_from_slice(seed);
            if !out.is_empty() {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(out.len());
                    match rng.below(3) {
                        0 => out[at] ^= 1 << rng.below(8),
                        1 => out[at] = rng.next() as u8,
                        _ => out[at] = [0, 1, 0x7F, 0x80, 0xFF][rng.below(5)],
                    }
                }
            }
        }
    }
}

fn fuzz<T: Wire>(name: &str, seeds: &[Vec<u8>], seed: u64) {
    let n = iterations();
    let mut rng = Rng(seed);
    let mut input = Vec::new();
    let (mut accepted, mut refused) = (0usize, 0usize);
    for i in 0..n {
        mutate(&mut rng, &seeds[i % seeds.len()], &mut input);
        match T::from_payload(&input) {
            Ok(v) => {
                accepted += 1;
                assert_eq!(v.to_payload(), input, "{name}: decoded value does not re-encode to its input");
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!("{name}: {n} inputs, {accepted} accepted, {refused} refused");
    assert!(refused > 0 && accepted > 0, "{name}: the mutator should produce both kinds");
}

fn seeds_of<T: Wire>(values: &[T]) -> Vec<Vec<u8>> {
    values.iter().map(Wire::to_payload).collect()
}

#[test]
fn fuzz_file_info() {
    let v = [
        FileInfo {
            name: "a".into(),
            size: 5,
            mode: FileMode(0o644),
            mod_time: 1,
            is_dir: false,
            is_symlink: false,
        },
        FileInfo {
            name: "dir".into(),
            size: 0,
            mode: FileMode(FileMode::DIR | 0o755),
            mod_time: 0,
            is_dir: true,
            is_symlink: false,
        },
    ];
    fuzz::<FileInfo>("FileInfo", &seeds_of(&v), 1);
}

#[test]
fn fuzz_dir_entry() {
    let v = [DirEntry { name: "x".into(), is_dir: true, mode: FileMode(FileMode::DIR) }];
    fuzz::<DirEntry>("DirEntry", &seeds_of(&v), 2);
}

#[test]
fn fuzz_mount_config() {
    let v = [MountConfig { tag: "t".into(), host_path: "/h".into(), writable: true }];
    fuzz::<MountConfig>("MountConfig", &seeds_of(&v), 3);
}

fn options() -> InstanceOptions {
    InstanceOptions {
        memory_mb: 256,
        cpus: 2,
        timeout: Some(Duration::from_secs(3)),
        user: "u".into(),
        dmesg: true,
        mounts: vec![
            MountConfig { tag: "a".into(), host_path: "/a".into(), writable: false },
            MountConfig { tag: "b".into(), host_path: "/b".into(), writable: true },
        ],
        backend: vmhost::wire::Backend::Kvm,
        host_loopback: true,
    }
}

#[test]
fn fuzz_instance_options() {
    fuzz::<InstanceOptions>("InstanceOptions", &seeds_of(&[options(), InstanceOptions::default()]), 4);
}

#[test]
fn fuzz_instance_new() {
    let v = [InstanceNew {
        source_type: SourceType::Tar,
        source_path: "/img.tar".into(),
        image_ref: "alpine".into(),
        cache_dir: "/c".into(),
        options: options(),
    }];
    fuzz::<InstanceNew>("InstanceNew", &seeds_of(&v), 5);
}

#[test]
fn fuzz_snapshot_options() {
    let v = [SnapshotOptions { excludes: vec!["/a".into(), "/b".into()], cache_dir: "/c".into() }];
    fuzz::<SnapshotOptions>("SnapshotOptions", &seeds_of(&v), 6);
}

#[test]
fn fuzz_dockerfile_options() {
    let mut args = BTreeMap::new();
    args.insert("A".to_string(), "1".to_string());
    args.insert("B".to_string(), "2".to_string());
    let v = [DockerfileOptions {
        dockerfile: b"FROM x\nRUN y\n".to_vec(),
        context_dir: "/ctx".into(),
        cache_dir: "/c".into(),
        build_args: args,
    }];
    // Maps re-encode in key order, so only inputs with sorted, distinct keys round-trip:
    // check decode robustness here and the round trip where the keys allow it.
    let n = iterations();
    let mut rng = Rng(7);
    let seeds = seeds_of(&v);
    let mut input = Vec::new();
    for _ in 0..n {
        mutate(&mut rng, &seeds[0], &mut input);
        if let Ok(d) = DockerfileOptions::from_payload(&input) {
            let again = DockerfileOptions::from_payload(&d.to_payload()).unwrap();
            assert_eq!(again, d);
        }
    }
}

#[test]
fn fuzz_error_frame() {
    let v = [ErrorFrame::new(ErrorCode::Io, "FsOpen", "no such file").with_path("/x")];
    // Unknown codes decode as Unknown (99), so compare re-decoded values, not bytes.
    let n = iterations();
    let mut rng = Rng(8);
    let seeds = seeds_of(&v);
    let mut input = Vec::new();
    for _ in 0..n {
        mutate(&mut rng, &seeds[0], &mut input);
        if let Ok(e) = ErrorFrame::from_payload(&input) {
            assert_eq!(ErrorFrame::from_payload(&e.to_payload()).unwrap(), e);
        }
    }
}

#[test]
fn fuzz_stream_frames() {
    fuzz::<StreamChunk>("StreamChunk", &seeds_of(&[StreamChunk { stream: 1, data: b"out".to_vec() }]), 9);
    fuzz::<StreamEnd>("StreamEnd", &seeds_of(&[StreamEnd { exit_code: 3 }]), 10);
}

#[test]
fn fuzz_primitive_lists_and_response() {
    let n = iterations();
    let mut rng = Rng(11);
    let mut enc = Encoder::new();
    enc.string_list(&["a", "bb", "ccc"]);
    let list = enc.as_bytes().to_vec();
    let mut input = Vec::new();
    for i in 0..n {
        mutate(&mut rng, &list, &mut input);
        let mut d = Decoder::new(&input);
        if i % 2 == 0 {
            let _ = d.string_list();
        } else {
            let _ = d.string_map();
        }
        assert!(d.position() <= input.len());
        let _ = response_fields(&input);
    }
}

#[test]
fn fuzz_frame_reader() {
    // Streams of frames, mutated: the reader must return frames or errors, bounded.
    let mut stream = Vec::new();
    for (ty, payload) in
        [(msg::INSTANCE_ID, vec![]), (msg::FS_READ_FILE, vec![0, 0, 0, 1, b'/']), (msg::ERROR, vec![7; 20])]
    {
        write_frame(&mut stream, ty, &payload, DEFAULT_MAX_FRAME).unwrap();
    }
    let n = iterations();
    let mut rng = Rng(12);
    let mut input = Vec::new();
    for _ in 0..n {
        mutate(&mut rng, &stream, &mut input);
        let mut r = &input[..];
        let mut frames = 0;
        while let Ok(f) = read_frame(&mut r, 1 << 16) {
            assert!(f.payload.len() <= 1 << 16);
            frames += 1;
            assert!(frames <= input.len() / HEADER_SIZE);
        }
    }
}

#[test]
fn fuzz_every_request_type() {
    // Seeds: for each request type, a valid payload with non-trivial fields.
    let types: Vec<u16> = msg::ALL.iter().map(|&(t, _)| t).filter(|&t| !msg::is_answer(t)).collect();
    let mut seeds = Vec::new();
    for &ty in &types {
        let zero = (0..64)
            .map(|n| vec![0u8; n])
            .find(|p| matches!(Request::from_payload(ty, p), Ok(Some(_))))
            .expect("a zero payload decodes");
        // Swap each zero u32 length for a real string where it still decodes.
        let mut seed = zero.clone();
        if seed.len() >= 4 && seed[..4] == [0, 0, 0, 0] {
            let mut with = vec![0, 0, 0, 3, b'a', b'b', b'c'];
            with.extend_from_slice(&seed[4..]);
            if matches!(Request::from_payload(ty, &with), Ok(Some(_))) {
                seed = with;
            }
        }
        seeds.push((ty, seed));
    }
    let n = iterations();
    let mut rng = Rng(13);
    let mut input = Vec::new();
    let mut accepted = 0;
    for i in 0..n {
        let (ty, seed) = &seeds[i % seeds.len()];
        mutate(&mut rng, seed, &mut input);
        // Sometimes the payload of one type under another type's number.
        let ty = if rng.below(10) == 0 { types[rng.below(types.len())] } else { *ty };
        if let Ok(Some(req)) = Request::from_payload(ty, &input) {
            accepted += 1;
            assert_eq!(req.ty(), ty);
            if ty != msg::BUILD_DOCKERFILE {
                assert_eq!(req.to_payload(), input, "{} does not re-encode to its input", req.name());
            }
        }
    }
    eprintln!("requests: {n} inputs, {accepted} accepted");
}
