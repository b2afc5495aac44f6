//! Pulling container images from a real registry (the CNCF distribution server,
//! started here on 127.0.0.1) into the content store: images made with umoci and pushed
//! with skopeo, gzip and zstd layers, a multi-platform index, the store without the
//! network, and what a corrupt blob does.

mod common;

use common::registry::{tools_ready, Layout, TestRegistry};
use common::TempDir;
use vmhost::image::digest::Digest;
use vmhost::image::oci::{media, Platform};
use vmhost::image::pull::{self, PullOptions, PullPolicy};
use vmhost::image::reference::Reference;
use vmhost::image::store::Store;

fn reference(reg: &TestRegistry, name: &str) -> Reference {
    format!("{}/{name}", reg.host()).parse().unwrap()
}

/// A small image: two layers (the second adds and changes files), a command.
fn small_image(dir: &TempDir, tag: &str) -> Layout {
    let l = Layout::new(&dir.join(&format!("layout-{tag}")), tag);
    l.layer(|root| {
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), format!("hello from {tag}\n")).unwrap();
    });
    l.layer(|root| {
        std::fs::write(root.join("etc/second"), b"second layer\n").unwrap();
    });
    l.config(&["--config.cmd", "cat", "--config.cmd", "/etc/hello", "--config.env", "A=1"]);
    l
}

#[test]
fn pull_stores_verified_blobs_and_runs_again_without_the_network() {
    if !tools_ready("pull_stores_verified_blobs_and_runs_again_without_the_network") {
        return;
    }
    let dir = TempDir::new("pull");
    let mut reg = TestRegistry::start("pull-reg");
    // As Docker's schema 2 (skopeo keeps OCI types from an OCI layout unless asked).
    small_image(&dir, "v1").push(&reg, "test/small:v1", &["--format", "v2s2"]);
    let store = Store::open(dir.join("store")).unwrap();
    let r = reference(&reg, "test/small:v1");
    let opts = PullOptions::default();

    let img = pull::get(&store, &r, PullPolicy::Missing, &opts).unwrap();
    assert_eq!(img.manifest.layers.len(), 2);
    for l in &img.manifest.layers {
        assert!(store.has(&l.digest), "layer {} stored", l.digest);
        // Stored as verified: the file's digest is its name.
        assert_eq!(Digest::sha256_of(&std::fs::read(store.blob_path(&l.digest)).unwrap()), l.digest);
        assert_eq!(l.media_type, media::DOCKER_LAYER_GZIP);
    }
    let run = img.config.config.clone().unwrap();
    assert_eq!(run.cmd.unwrap(), ["cat", "/etc/hello"]);
    assert!(run.env.unwrap().contains(&"A=1".to_string()));
    assert_eq!(store.get_ref(&r.to_string()).unwrap(), Some(img.resolved.clone()));

    // With the registry gone: `missing` and `never` find it in the store.
    reg.stop();
    let again = pull::get(&store, &r, PullPolicy::Missing, &opts).unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
    pull::get(&store, &r, PullPolicy::Never, &opts).unwrap();
    // `always` asks the registry, and says it cannot reach it.
    let e = pull::get(&store, &r, PullPolicy::Always, &opts).unwrap_err();
    assert!(e.to_string().contains(&reg.host()), "{e}");
    // Something never pulled, with `never`: a clear error.
    let other = reference(&reg, "test/other:v1");
    let e = pull::get(&store, &other, PullPolicy::Never, &opts).unwrap_err();
    assert!(e.to_string().contains("--pull=never"), "{e}");

    // A moved tag is seen by the next pull: push v2 under the same tag.
    reg.restart();
    small_image(&dir, "v2").push(&reg, "test/small:v1", &[]);
    let moved = pull::get(&store, &r, PullPolicy::Always, &opts).unwrap();
    assert_ne!(moved.manifest_digest, img.manifest_digest);
    assert_eq!(store.get_ref(&r.to_string()).unwrap(), Some(moved.resolved.clone()));
    // By digest: the old one, from the store, without asking.
    reg.stop();
    let pinned = r.with_digest(img.resolved.clone());
    assert_eq!(
        pull::get(&store, &pinned, PullPolicy::Missing, &opts).unwrap().manifest_digest,
        img.manifest_digest
    );
}

#[test]
fn zstd_layers_and_a_multi_platform_index() {
    if !tools_ready("zstd_layers_and_a_multi_platform_index") {
        return;
    }
    let dir = TempDir::new("pull-zstd");
    let reg = TestRegistry::start("pull-zstd-reg");
    let store = Store::open(dir.join("store")).unwrap();
    let opts = PullOptions::default();

    small_image(&dir, "z").push(&reg, "test/zstd:1", &["--dest-compress-format", "zstd"]);
    let img = pull::get(&store, &reference(&reg, "test/zstd:1"), PullPolicy::Missing, &opts).unwrap();
    assert!(
        img.manifest.layers.iter().all(|l| l.media_type == media::OCI_LAYER_ZSTD),
        "{:?}",
        img.manifest.layers
    );
    // umoci writes OCI manifests without a mediaType (the spec allows it): the registry's
    // Content-Type, or the document's shape, says what it is.
    assert_eq!(img.manifest.media_type, None);

    // An index whose first entry is linux/arm64/v8 and second linux/amd64: the pull
    // takes the second for this host, the first when asked.
    let arm = small_image(&dir, "arm");
    arm.config(&["--architecture", "arm64", "--os", "linux"]);
    let amd = small_image(&dir, "amd");
    let index_dir = dir.join("multi");
    make_index(&index_dir, &[(&arm, "arm64", Some("v8")), (&amd, "amd64", None)]);
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", index_dir.display()))
        .arg(format!("docker://{}/test/multi:1", reg.host()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = reference(&reg, "test/multi:1");
    let host = pull::get(&store, &r, PullPolicy::Always, &opts).unwrap();
    assert_eq!(host.config.architecture, "amd64");
    let arm_opts =
        PullOptions { platform: Platform::parse("linux/arm64/v8").unwrap(), ..PullOptions::default() };
    let armed = pull::get(&store, &r, PullPolicy::Always, &arm_opts).unwrap();
    assert_eq!(armed.config.architecture, "arm64");
    assert_eq!(armed.resolved, host.resolved, "one index, two manifests");
    let e = pull::get(
        &store,
        &r,
        PullPolicy::Always,
        &PullOptions { platform: Platform::parse("linux/s390x").unwrap(), ..PullOptions::default() },
    )
    .unwrap_err();
    assert!(e.to_string().contains("linux/amd64") && e.to_string().contains("--platform"), "{e}");
}

/// An OCI layout holding one image index (tagged `1`) that lists the given images'
/// manifests with platforms, in order.
fn make_index(dir: &std::path::Path, images: &[(&Layout, &str, Option<&str>)]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut manifests = Vec::new();
    for (layout, arch, variant) in images {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.path.join("index.json")).unwrap()).unwrap();
        let desc = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == layout.tag.as_str())
            .unwrap()
            .clone();
        // Copy every blob over (the layouts are small).
        for e in std::fs::read_dir(layout.path.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join("blobs/sha256").join(e.file_name())).unwrap();
        }
        let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = serde_json::json!(v);
        }
        manifests.push(serde_json::json!({
            "mediaType": desc["mediaType"], "digest": desc["digest"], "size": desc["size"], "platform": platform
        }));
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests});
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = Digest::sha256_of(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": media::OCI_INDEX, "digest": digest.to_string(), "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "1"}
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

#[test]
fn a_blob_whose_digest_does_not_match_is_refused_and_not_stored() {
    if !tools_ready("a_blob_whose_digest_does_not_match_is_refused_and_not_stored") {
        return;
    }
    let dir = TempDir::new("pull-bad");
    let reg = TestRegistry::start("pull-bad-reg");
    small_image(&dir, "bad").push(&reg, "test/bad:1", &[]);
    let store = Store::open(dir.join("store")).unwrap();
    let r = reference(&reg, "test/bad:1");
    // Find the top layer through the registry's own files, and change a byte of it.
    let good = pull::get(&store, &r, PullPolicy::Always, &PullOptions::default()).unwrap();
    let layer = good.manifest.layers.last().unwrap().digest.clone();
    let fresh = Store::open(dir.join("store2")).unwrap();
    let file = reg.blob_file(layer.hex());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let e = pull::get(&fresh, &r, PullPolicy::Always, &PullOptions::default()).unwrap_err();
    assert!(e.to_string().contains(&layer.to_string()), "{e}");
    assert!(!fresh.has(&layer), "a blob that does not match never enters the store");
    assert!(fresh.get_ref(&r.to_string()).unwrap().is_none(), "nor is the reference recorded");
}

#[test]
fn the_image_commands_pull_list_inspect_remove_and_prune() {
    if !tools_ready("the_image_commands_pull_list_inspect_remove_and_prune") {
        return;
    }
    let dir = TempDir::new("imgcmd");
    let reg = TestRegistry::start("imgcmd-reg");
    small_image(&dir, "c").push(&reg, "test/cmd:1", &[]);
    let r = format!("{}/test/cmd:1", reg.host());
    let vmhost = |args: &[&str]| {
        let out = std::process::Command::new(common::vmhost_bin())
            .arg("image")
            .args(args)
            .env("XDG_CACHE_HOME", dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = vmhost(&["pull", &r]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with(&format!("{r}@sha256:")), "{out}");
    let (_, out, _) = vmhost(&["ls"]);
    assert!(out.lines().any(|l| l.starts_with(&r)), "{out}");
    let (code, out, err) = vmhost(&["inspect", &r]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["config"]["Cmd"][1], "/etc/hello");
    let blobs = dir.join("vmhost/images/blobs/sha256");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 4, "manifest, config, two layers");
    // Nothing to prune while the reference stands.
    let (_, out, _) = vmhost(&["prune"]);
    assert!(out.starts_with("removed 0 blobs"), "{out}");
    let (code, out, _) = vmhost(&["rm", &r]);
    assert_eq!((code, out.trim()), (Some(0), format!("untagged {r}").as_str()));
    let (code, _, err) = vmhost(&["rm", &r]);
    assert_eq!(code, Some(1), "{err}");
    let (_, out, _) = vmhost(&["prune"]);
    assert!(out.starts_with("removed 4 blobs"), "{out}");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0);
    let (code, _, err) = vmhost(&["inspect", &r]);
    assert!(code == Some(1) && err.contains("vmhost image pull"), "{err}");
    let (code, _, err) = vmhost(&["pull", "Not/A:Ref:"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn a_registry_on_https_is_pulled_over_tls_with_the_trusted_roots() {
    let test = "a_registry_on_https_is_pulled_over_tls_with_the_trusted_roots";
    if !tools_ready(test) {
        return;
    }
    let dir = TempDir::new("imgtls");
    let reg = TestRegistry::start_tls("imgtls-reg");
    small_image(&dir, "t").push(&reg, "test/tls:1", &[]);
    let r = format!("{}/test/tls:1", reg.host());
    let pull = |ca: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(common::vmhost_bin());
        c.args(["image", "pull", &r]).env("XDG_CACHE_HOME", dir.path());
        // The system's roots, as OpenSSL's variable replaces them (rustls-native-certs).
        c.env_remove("SSL_CERT_DIR").env("SSL_CERT_FILE", ca.unwrap_or(std::path::Path::new("/dev/null")));
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A CA nobody trusts: refused, and the error says what HTTPS said and what to do.
    let (code, _, err) = pull(None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("after HTTPS failed") && err.contains("SSL_CERT_FILE"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Its CA among the roots: pulled, over TLS (the registry speaks nothing else).
    let (code, out, err) = pull(Some(&reg.ca_file()));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with(&format!("{r}@sha256:")), "{out}");
    // In the library too: a loopback registry that speaks HTTPS is spoken to in HTTPS.
    let plain = TestRegistry::start("imgtls-plain");
    let reference: Reference = format!("{}/x:1", plain.host()).parse().unwrap();
    let client = vmhost::image::registry::Registry::for_reference(&reference, &[]).unwrap();
    assert!(!client.is_https(), "a plain loopback registry is spoken to in plain HTTP");
}

#[test]
fn a_registry_that_wants_a_login_gets_the_users_credentials() {
    if !tools_ready("a_registry_that_wants_a_login_gets_the_users_credentials") {
        return;
    }
    let dir = TempDir::new("pull-auth");
    let reg = TestRegistry::start_with_login("pull-auth-reg", "tester", "s3cret:pw");
    small_image(&dir, "a").push(&reg, "test/private:1", &[]);
    let r = format!("{}/test/private:1", reg.host());
    let config = |name: &str, password: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let auth = vmhost::image::auth::base64_encode(format!("tester:{password}").as_bytes());
        let body = serde_json::json!({"auths": {reg.host(): {"auth": auth}}});
        std::fs::write(d.join("config.json"), body.to_string()).unwrap();
        d
    };
    let pull = |envs: &[(&str, &std::path::Path)]| {
        let mut c = std::process::Command::new(common::vmhost_bin());
        c.args(["image", "pull", &r]).env("XDG_CACHE_HOME", dir.path()).env("HOME", dir.path());
        c.env_remove("REGISTRY_AUTH_FILE").env_remove("DOCKER_CONFIG");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = pull(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("wants a user and password") && err.contains("docker login"), "{err}");
    let wrong = config("wrong", "nope");
    let (code, err) = pull(&[("REGISTRY_AUTH_FILE", &wrong.join("config.json"))]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    let right = config("right", "s3cret:pw");
    let (code, err) = pull(&[("DOCKER_CONFIG", &right)]);
    assert_eq!(code, Some(0), "{err}");
    // REGISTRY_AUTH_FILE is read first, as podman does.
    let (code, err) = pull(&[("REGISTRY_AUTH_FILE", &right.join("config.json")), ("DOCKER_CONFIG", &wrong)]);
    assert_eq!(code, Some(0), "{err}");
}

/// A layer large enough to be cut mid-way: 300 kB of incompressible bytes.
fn big_image(dir: &TempDir, tag: &str) -> Layout {
    let l = Layout::new(&dir.join(&format!("layout-{tag}")), tag);
    l.layer(|root| {
        std::fs::write(root.join("noise"), common::noise(300_000, 7)).unwrap();
    });
    l
}

#[test]
fn bearer_tokens_redirects_resumes_and_bounds_through_a_fault_front() {
    use common::registry::{Faults, Front};
    use vmhost::image::auth::Credentials;
    if !tools_ready("bearer_tokens_redirects_resumes_and_bounds_through_a_fault_front") {
        return;
    }
    let dir = TempDir::new("pull-front");
    let reg = TestRegistry::start("pull-front-reg");
    big_image(&dir, "f").push(&reg, "test/front:1", &[]);
    let via = |front: &Front| -> Reference { format!("{}/test/front:1", front.host()).parse().unwrap() };
    let fresh = |name: &str| Store::open(dir.join(name)).unwrap();
    let opts = PullOptions::default();

    // An anonymous Bearer token, asked for the repository's pull scope, used after.
    let front = Front::start(reg.port, Faults { bearer: Some(None), ..Default::default() });
    pull::get(&fresh("s1"), &via(&front), PullPolicy::Always, &opts).unwrap();
    let seen = front.seen.lock().unwrap().clone();
    assert!(
        seen.requests.iter().any(|r| r.starts_with("GET /token?scope=repository%3Atest%2Ffront%3Apull")),
        "{seen:?}"
    );
    assert!(
        seen.requests.iter().any(|r| r.contains("/blobs/") && r.ends_with("Bearer good-token")),
        "{seen:?}"
    );

    // A token for credentials: refused without them, given with them.
    let front =
        Front::start(reg.port, Faults { bearer: Some(Some(("u".into(), "p".into()))), ..Default::default() });
    let e = pull::get(&fresh("s2"), &via(&front), PullPolicy::Always, &opts).unwrap_err();
    assert!(e.to_string().contains("token server refused"), "{e}");
    let with = PullOptions {
        credentials: Some(Credentials { username: "u".into(), password: "p".into() }),
        ..PullOptions::default()
    };
    pull::get(&fresh("s3"), &via(&front), PullPolicy::Always, &with).unwrap();

    // Blobs redirected to another origin: followed, without the Authorization header.
    let front =
        Front::start(reg.port, Faults { bearer: Some(None), redirect_blobs: true, ..Default::default() });
    let img = pull::get(&fresh("s4"), &via(&front), PullPolicy::Always, &opts).unwrap();
    let seen = front.seen.lock().unwrap().clone();
    assert!(seen.requests.iter().any(|r| r.starts_with("GET /redirected/")), "{seen:?}");
    assert_eq!(seen.leaked_auth, 0, "{seen:?}");

    // A connection cut mid-blob: the download resumes where it stopped (Range) and the
    // blob verifies.
    let front = Front::start(reg.port, Faults { cut_blobs_after: Some(100_000), ..Default::default() });
    let store = fresh("s5");
    let again = pull::get(&store, &via(&front), PullPolicy::Always, &opts).unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
    let seen = front.seen.lock().unwrap().clone();
    assert!(seen.ranges.iter().any(|r| r == "bytes=100000-"), "{seen:?}");
    for l in &again.manifest.layers {
        assert_eq!(Digest::sha256_of(&std::fs::read(store.blob_path(&l.digest)).unwrap()), l.digest);
    }

    // A registry that goes away mid-blob: the pull fails saying so, nothing half-written
    // is trusted, and the next pull resumes from where the first stopped.
    let front = Front::start(
        reg.port,
        Faults { cut_blobs_after: Some(100_000), down_after_cut: true, ..Default::default() },
    );
    let store = fresh("s7");
    let e = pull::get(&store, &via(&front), PullPolicy::Always, &opts).unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    assert!(store.refs().unwrap().is_empty());
    let front = Front::start(reg.port, Faults::default());
    pull::get(&store, &via(&front), PullPolicy::Always, &opts).unwrap();
    let seen = front.seen.lock().unwrap().clone();
    assert!(seen.ranges.iter().any(|r| r == "bytes=100000-"), "the second pull resumed: {seen:?}");

    // A manifest over 4 MiB: refused before it is parsed, nothing recorded.
    let front = Front::start(reg.port, Faults { huge_manifest: Some(5 << 20), ..Default::default() });
    let store = fresh("s6");
    let e = pull::get(&store, &via(&front), PullPolicy::Always, &opts).unwrap_err();
    assert!(e.to_string().contains("more than 4194304"), "{e}");
    assert!(store.blobs().unwrap().is_empty() && store.refs().unwrap().is_empty());
}

#[test]
fn two_processes_pulling_one_image_at_once_share_the_store() {
    if !tools_ready("two_processes_pulling_one_image_at_once_share_the_store") {
        return;
    }
    let dir = TempDir::new("pull-two");
    let reg = TestRegistry::start("pull-two-reg");
    big_image(&dir, "two").push(&reg, "test/two:1", &[]);
    let r = format!("{}/test/two:1", reg.host());
    let start = || {
        std::process::Command::new(common::vmhost_bin())
            .args(["image", "pull", &r])
            .env("XDG_CACHE_HOME", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let store = Store::open(dir.join("vmhost/images")).unwrap();
    let img = pull::local(&store, &reference(&reg, "test/two:1"), &Platform::host()).unwrap().unwrap();
    for l in &img.manifest.layers {
        assert_eq!(Digest::sha256_of(&std::fs::read(store.blob_path(&l.digest)).unwrap()), l.digest);
    }
    let left: Vec<_> = std::fs::read_dir(dir.join("vmhost/images/ingest")).unwrap().collect();
    assert!(left.is_empty(), "nothing half-written left: {left:?}");
}

/// An OCI layout made by hand around one uncompressed layer: its config names the
/// layer's diff id, as a well-formed image's does.
fn hand_layout(dir: &std::path::Path, layer: &[u8]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |data: &[u8]| {
        let d = Digest::sha256_of(data);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), data).unwrap();
        (d.to_string(), data.len())
    };
    let (layer_digest, layer_size) = put(layer);
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}, "config": {}});
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": media::OCI_LAYER, "digest": layer_digest, "size": layer_size}]});
    let (m_digest, m_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": media::OCI_MANIFEST,
        "digest": m_digest, "size": m_size, "annotations": {"org.opencontainers.image.ref.name": "1"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn hostile_layers_from_a_registry_never_reach_the_host() {
    use vmhost::image::unpack;
    if !tools_ready("hostile_layers_from_a_registry_never_reach_the_host") {
        return;
    }
    let dir = TempDir::new("pull-evil");
    let outside = TempDir::new("pull-evil-outside");
    let reg = TestRegistry::start("pull-evil-reg");
    // Layers written by GNU tar: a symlink out of the root and a file through it; a
    // member named ../../escape.
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"x\n").unwrap();
    std::os::unix::fs::symlink(outside.path(), src.join("abs")).unwrap();
    let tar = |args: &[&str]| {
        let st = std::process::Command::new("tar").current_dir(&src).args(args).status().unwrap();
        assert!(st.success());
    };
    tar(&["-cf", "through.tar", "abs"]);
    tar(&["-rf", "through.tar", "--transform", "s,^x$,abs/pwned,", "x"]);
    tar(&["-cPf", "escape.tar", "--transform", "s,^x$,../../escape,", "x"]);
    let store = Store::open(dir.join("store")).unwrap();
    let cache = dir.join("cache");
    let progress = vmhost::progress::Progress::quiet();
    for (name, file) in [("through", "through.tar"), ("escape", "escape.tar")] {
        let layout = dir.join(&format!("layout-{name}"));
        hand_layout(&layout, &std::fs::read(src.join(file)).unwrap());
        let st = std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:1", layout.display()))
            .arg(format!("docker://{}/test/{name}:1", reg.host()))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let through =
        pull::get(&store, &reference(&reg, "test/through:1"), PullPolicy::Always, &PullOptions::default())
            .unwrap();
    let root = unpack::unpacked(&store, &through, &cache, &progress).unwrap();
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none(), "nothing written outside");
    let inside = root.join(outside.path().strip_prefix("/").unwrap()).join("pwned");
    assert_eq!(std::fs::read(&inside).unwrap(), b"x\n", "the link resolved inside the root");

    let escape =
        pull::get(&store, &reference(&reg, "test/escape:1"), PullPolicy::Always, &PullOptions::default())
            .unwrap();
    let e = unpack::unpacked(&store, &escape, &cache, &progress).unwrap_err();
    assert!(e.to_string().contains("escapes"), "{e}");
    let roots: Vec<String> = std::fs::read_dir(cache.join("roots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(roots.len(), 1, "only the good root, no half-built one: {roots:?}");
    assert!(store.has(&escape.manifest.layers[0].digest), "the store is intact");
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}
