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
    for tool in ["docker-registry", "skopeo", "umoci"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            let msg = format!(
                "{tool} not found; install it with apt-get install -y --no-install-recommends \
                 docker-registry skopeo umoci (scripts/test.sh does)"
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
}

impl TestRegistry {
    /// Starts one (anonymous).
    pub fn start(tag: &str) -> TestRegistry {
        let dir = TempDir::new(tag);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut reg = TestRegistry { child: None, port, dir };
        reg.spawn();
        reg
    }

    fn spawn(&mut self) {
        let config = self.dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
                self.dir.join("data").display(),
                self.port
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let port = self.port;
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut b = [0u8; 12];
                s.read_exact(&mut b).is_ok() && b.starts_with(b"HTTP/1.0 200")
                    || b.starts_with(b"HTTP/1.1 200")
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
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci:{}", self.image()))
            .arg(format!("docker://{}/{name}", registry.host())));
    }
}
