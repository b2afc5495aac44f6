//! A real registry for the image tests: the CNCF distribution server (Debian's
//! `docker-registry`) on 127.0.0.1 and a free port, storing into a scratch directory;
//! and test images made with the real tools, `umoci` (an OCI layout, its layers from
//! directories) and `skopeo` (pushed to the registry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{under_ci, wait_until, TempDir};

/// Whether the image tools are here; under CI a missing one fails the test.
pub fn tools_ready(test: &str) -> bool {
    for tool in ["docker-registry", "skopeo", "umoci", "htpasswd", "openssl"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            let msg = format!(
                "{tool} not found; install it with apt-get install -y --no-install-recommends \
                 docker-registry skopeo umoci apache2-utils openssl (scripts/test.sh does)"
            );
            if under_ci() {
                panic!("{test}: {msg}");
            }
            eprintln!("SKIP {test}: {msg}");
            return false;
        }
    }
    true
}

/// A running registry; killed on drop.
pub struct TestRegistry {
    child: Option<Child>,
    pub port: u16,
    pub dir: TempDir,
    /// The user and password it wants (htpasswd Basic auth), if any.
    pub login: Option<(String, String)>,
    /// Serves HTTPS only, with a certificate for 127.0.0.1 that [`TestRegistry::ca_file`]
    /// signed.
    pub tls: bool,
}

impl TestRegistry {
    /// Starts one (anonymous).
    pub fn start(tag: &str) -> TestRegistry {
        TestRegistry::start_as(tag, None, false)
    }

    /// Starts one that serves HTTPS only, its certificate signed by a CA made here with
    /// openssl ([`TestRegistry::ca_file`]), which no system trusts.
    pub fn start_tls(tag: &str) -> TestRegistry {
        TestRegistry::start_as(tag, None, true)
    }

    /// The PEM file of the CA that signed an HTTPS registry's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Starts one that wants `user` and `password` (Basic auth from an htpasswd file).
    pub fn start_with_login(tag: &str, user: &str, password: &str) -> TestRegistry {
        TestRegistry::start_as(tag, Some((user.to_string(), password.to_string())), false)
    }

    fn start_as(tag: &str, login: Option<(String, String)>, tls: bool) -> TestRegistry {
        let dir = TempDir::new(tag);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if let Some((u, p)) = &login {
            let out = Command::new("htpasswd").args(["-Bbn", u, p]).output().expect("htpasswd");
            assert!(out.status.success());
            std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
        }
        if tls {
            make_certificates(dir.path());
        }
        let mut reg = TestRegistry { child: None, port, dir, login, tls };
        reg.spawn();
        reg
    }

    fn spawn(&mut self) {
        let config = self.dir.join("config.yml");
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            self.dir.join("data").display(),
            self.port
        );
        if self.login.is_some() {
            yml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmhost-test\n    path: {}\n",
                self.dir.join("htpasswd").display()
            ));
        }
        if self.tls {
            yml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                self.dir.join("server.pem").display(),
                self.dir.join("server.key").display()
            ));
        }
        std::fs::write(&config, yml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let (port, tls) = (self.port, self.tls);
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                if tls {
                    // Listening is all there is to see without speaking TLS.
                    return true;
                }
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut b = [0u8; 12];
                // 200, or 401 from a registry that wants a login: either way it serves.
                s.read_exact(&mut b).is_ok() && (b[9..12] == *b"200" || b[9..12] == *b"401")
            })
        });
        assert!(up, "the registry did not come up; see {}", self.dir.join("registry.log").display());
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it (the data stays: [`TestRegistry::restart`] serves it again).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The file a blob is kept in (the filesystem driver's layout).
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir.join(&format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`server.pem`,
/// `server.key`) in `dir`, made with openssl: P-256 keys, valid two days.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(Command::new("openssl")
        .args(["req", "-x509", "-days", "2", "-subj", "/CN=vmhost test CA"])
        .args(ec)
        .args(["-keyout", "ca.key", "-out", "ca.pem"])
        .current_dir(dir));
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(ec)
        .args(["-keyout", "server.key", "-out", "server.csr"])
        .current_dir(dir));
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"])
        .args(["-CAcreateserial", "-extfile", "server.ext", "-out", "server.pem"])
        .current_dir(dir));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An OCI image layout made with umoci, one image (`TAG`) built layer by layer.
pub struct Layout {
    pub path: PathBuf,
    pub tag: String,
    bundle: PathBuf,
}

impl Layout {
    /// An empty image `tag` in a new layout at `path`.
    pub fn new(path: &Path, tag: &str) -> Layout {
        run(Command::new("umoci").args(["init", "--layout"]).arg(path));
        run(Command::new("umoci").args(["new", "--image"]).arg(format!("{}:{tag}", path.display())));
        Layout { path: path.to_path_buf(), tag: tag.into(), bundle: path.with_extension("bundle") }
    }

    fn image(&self) -> String {
        format!("{}:{}", self.path.display(), self.tag)
    }

    /// Adds a layer: `f` changes the root filesystem (a directory) as the layer should.
    pub fn layer(&self, f: impl FnOnce(&Path)) {
        let _ = std::fs::remove_dir_all(&self.bundle);
        let rootless: &[&str] = if nix::unistd::geteuid().is_root() { &[] } else { &["--rootless"] };
        run(Command::new("umoci")
            .arg("unpack")
            .args(rootless)
            .args(["--image", &self.image()])
            .arg(&self.bundle));
        f(&self.bundle.join("rootfs"));
        run(Command::new("umoci").arg("repack").args(["--image", &self.image()]).arg(&self.bundle));
        let _ = std::fs::remove_dir_all(&self.bundle);
    }

    /// Sets configuration with umoci's `config` flags (`--config.cmd`, `--architecture`).
    pub fn config(&self, args: &[&str]) {
        run(Command::new("umoci").arg("config").args(["--image", &self.image()]).args(args));
    }

    /// Pushes it to `registry` as `name` (`repo:tag`), with extra skopeo flags.
    pub fn push(&self, registry: &TestRegistry, name: &str, extra: &[&str]) {
        let creds = registry.login.as_ref().map(|(u, p)| format!("--dest-creds={u}:{p}"));
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(creds)
            .args(extra)
            .arg(format!("oci:{}", self.image()))
            .arg(format!("docker://{}/{name}", registry.host())));
    }
}

/// What a [`Front`] does to the requests it passes to its registry.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Wants a Bearer token, issued at `/token` (for these Basic credentials, if any).
    pub bearer: Option<Option<(String, String)>>,
    /// Sends blob requests to `localhost:PORT/redirected/...` (another origin).
    pub redirect_blobs: bool,
    /// Cuts the first answer of each blob after this many bytes.
    pub cut_blobs_after: Option<usize>,
    /// Answers manifest requests with this many bytes of JSON.
    pub huge_manifest: Option<usize>,
    /// After cutting a blob, answers every further request for it with 503 (a registry
    /// that went away mid-pull).
    pub down_after_cut: bool,
}

/// What a [`Front`] saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Requests, as `METHOD PATH [auth]` lines.
    pub requests: Vec<String>,
    /// Redirected blob requests that carried an Authorization header (must be none).
    pub leaked_auth: usize,
    /// Range headers received.
    pub ranges: Vec<String>,
}

/// A fake registry front for the corners a real registry does not produce (a Bearer
/// token server, redirects to another origin, a connection cut mid-blob, a manifest
/// over the bound), passing everything else to a real registry. HTTP/1.1, one request
/// per connection.
pub struct Front {
    pub port: u16,
    pub seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

impl Front {
    pub fn start(backend: u16, faults: Faults) -> Front {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let (seen2, faults) = (seen.clone(), std::sync::Arc::new(faults));
        let cut_done = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (seen, faults, cut_done) = (seen2.clone(), faults.clone(), cut_done.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, port, backend, &faults, &seen, &cut_done);
                });
            }
        });
        Front { port, seen }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve(
    mut conn: std::net::TcpStream,
    port: u16,
    backend: u16,
    faults: &Faults,
    seen: &std::sync::Mutex<Seen>,
    cut_done: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end().to_string();
        if h.is_empty() {
            break;
        }
        headers.push(h);
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase())))
            .map(|h| h[name.len() + 1..].trim().to_string())
    };
    let auth = header("Authorization");
    {
        let mut s = seen.lock().unwrap();
        s.requests.push(format!("{method} {path} {}", auth.as_deref().unwrap_or("-")));
        if let Some(r) = header("Range") {
            s.ranges.push(r);
        }
    }
    let reply =
        |conn: &mut std::net::TcpStream, status: &str, extra: &str, body: &[u8]| -> std::io::Result<()> {
            write!(
                conn,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            conn.write_all(body)
        };
    if let Some(creds) = &faults.bearer {
        if path.starts_with("/token") {
            if let Some((u, p)) = creds {
                let want =
                    format!("Basic {}", vmhost::image::auth::base64_encode(format!("{u}:{p}").as_bytes()));
                if auth.as_deref() != Some(want.as_str()) {
                    return reply(&mut conn, "401 Unauthorized", "", b"{}");
                }
            }
            let scope_ok = path.contains("scope=repository%3A");
            let token = if scope_ok { "good-token" } else { "wrong-scope" };
            return reply(
                &mut conn,
                "200 OK",
                "Content-Type: application/json\r\n",
                format!("{{\"token\":\"{token}\"}}").as_bytes(),
            );
        }
        if path.starts_with("/v2/") && auth.as_deref() != Some("Bearer good-token") {
            // The scope of the repository asked for, as a registry names it.
            let repo =
                path[4..].split("/manifests/").next().unwrap_or("").split("/blobs/").next().unwrap_or("");
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"front\",scope=\"repository:{repo}:pull\"\r\n"
            );
            return reply(
                &mut conn,
                "401 Unauthorized",
                &challenge,
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#,
            );
        }
    }
    let is_blob = path.contains("/blobs/sha256:");
    let is_manifest = path.contains("/manifests/");
    if let (Some(n), true) = (faults.huge_manifest, is_manifest) {
        let mut body = b"{\"schemaVersion\":2,\"pad\":\"".to_vec();
        body.resize(n, b'x');
        return reply(
            &mut conn,
            "200 OK",
            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
            &body,
        );
    }
    if faults.down_after_cut && is_blob && cut_done.lock().unwrap().contains(&path) {
        return reply(&mut conn, "503 Service Unavailable", "", b"");
    }
    let mut backend_path = path.clone();
    if faults.redirect_blobs && is_blob && !path.starts_with("/redirected") {
        return reply(
            &mut conn,
            "307 Temporary Redirect",
            &format!("Location: http://localhost:{port}/redirected{path}\r\n"),
            b"",
        );
    }
    if let Some(p) = path.strip_prefix("/redirected") {
        if auth.is_some() {
            seen.lock().unwrap().leaked_auth += 1;
        }
        backend_path = p.to_string();
    }
    // Pass it on, then relay the answer (cut short once per blob when asked).
    let mut b = std::net::TcpStream::connect(("127.0.0.1", backend))?;
    write!(b, "{method} {backend_path} HTTP/1.1\r\nHost: 127.0.0.1:{backend}\r\nConnection: close\r\n")?;
    for name in ["Accept", "Range"] {
        if let Some(v) = header(name) {
            write!(b, "{name}: {v}\r\n")?;
        }
    }
    write!(b, "\r\n")?;
    let mut answer = Vec::new();
    b.read_to_end(&mut answer)?;
    if let (Some(n), true) = (faults.cut_blobs_after, is_blob) {
        if cut_done.lock().unwrap().insert(path.clone()) {
            let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
            conn.write_all(&answer[..(head_end + n).min(answer.len())])?;
            return Ok(());
        }
    }
    conn.write_all(&answer)
}

/// An image layout under `home` whose first layer is the default image's busybox root
/// (provisioned here, not left to the VM tests that happen to run first).
pub fn busybox_layout(home: &TempDir) -> Layout {
    let busybox = vmhost::image::rootfs::busybox_root(
        &vmhost::image::cache_dir(),
        &vmhost::progress::Progress::quiet(),
    )
    .unwrap();
    let l = Layout::new(&home.join("layout"), "1");
    l.layer(|root| {
        let st =
            Command::new("cp").arg("-a").arg(format!("{}/.", busybox.display())).arg(root).status().unwrap();
        assert!(st.success());
    });
    l
}
