//! [`Registry`]: a synchronous client of the OCI distribution API (v2), enough to pull:
//! manifests by tag or digest, blobs streamed into the [`Store`](super::store::Store).
//!
//! - **Transport**: HTTPS with the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR`
//!   replace them, as in OpenSSL); plain HTTP only for a loopback registry or one named
//!   in `VMHOST_INSECURE_REGISTRIES` (comma-separated, as `--insecure-registry`), and
//!   for those only when HTTPS fails, as docker does: such a registry is asked over
//!   HTTPS first, with a verified certificate.
//! - **Auth**: a request goes out without credentials first; a 401's
//!   `WWW-Authenticate` says how: `Bearer realm=..,service=..,scope=..` gets a token from
//!   the realm (with the user's credentials as Basic auth when there are some, anonymous
//!   otherwise), kept per scope; `Basic` sends the credentials. Credentials come from
//!   [`super::auth`].
//! - **Redirects** (blob storage) are followed by hand, at most 5; the Authorization
//!   header goes only to the registry's own host.
//! - **Retries**: connection failures, 429 and 5xx are retried 4 times with backoff
//!   (0.25, 0.5, 1, 2 s); a blob resumes where it stopped (`Range`).
//! - **Bounds**: manifests up to 4 MiB, token answers up to 64 KiB; a blob's size and
//!   digest are checked before it enters the store.

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use parking_lot::Mutex;

use super::auth::{self, Credentials};
use super::digest::Digest;
use super::oci::{media, Descriptor, MAX_MANIFEST};
use super::reference::Reference;
use super::store::BlobWriter;
use crate::error::{Error, Result};

/// Attempts of a request that fails in a way worth retrying.
const ATTEMPTS: u32 = 5;
/// Redirects followed.
const MAX_REDIRECTS: usize = 5;
/// The largest token answer read.
const MAX_TOKEN_ANSWER: u64 = 64 << 10;

/// A manifest as the registry sent it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The bytes.
    pub data: Vec<u8>,
    /// The Content-Type.
    pub media_type: Option<String>,
    /// Their digest (checked against what was asked for and what the registry said).
    pub digest: Digest,
}

/// A client of one registry.
pub struct Registry {
    /// The registry as references name it.
    name: String,
    /// `https://HOST` or `http://HOST`.
    base: String,
    agent: ureq::Agent,
    credentials: Option<Credentials>,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, String>>,
    /// The registry asked for Basic auth.
    basic: std::sync::atomic::AtomicBool,
    /// Why HTTPS failed, for a registry spoken to in plain HTTP after it did.
    https_failed: Option<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("base", &self.base).finish_non_exhaustive()
    }
}

/// What went wrong with one attempt.
enum Failure {
    /// Worth another attempt (the connection, 429, 5xx).
    Retry(Error),
    /// Final.
    Fatal(Error),
}

impl Registry {
    /// A client for the registry of `r`, credentials from the usual files. Over HTTPS;
    /// a registry on loopback or in `insecure` is asked over HTTPS first and spoken to
    /// in plain HTTP when that fails (no TLS there, or a certificate not trusted).
    pub fn for_reference(r: &Reference, insecure: &[String]) -> Result<Registry> {
        let may_be_plain = r.is_loopback() || insecure.iter().any(|i| i == r.registry());
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("vmhost/", env!("CARGO_PKG_VERSION")))
            .build();
        let host = r.api_host();
        let https_failed = if may_be_plain { https_fails(&agent, host) } else { None };
        if let Some(why) = &https_failed {
            log::debug!("{host}: plain HTTP, since HTTPS failed: {why}");
        }
        let scheme = if https_failed.is_some() { "http" } else { "https" };
        Ok(Registry {
            name: r.registry().to_string(),
            base: format!("{scheme}://{host}"),
            agent,
            credentials: auth::lookup(r.registry()),
            tokens: Mutex::new(HashMap::new()),
            basic: std::sync::atomic::AtomicBool::new(false),
            https_failed,
        })
    }

    /// Whether this client speaks HTTPS.
    pub fn is_https(&self) -> bool {
        self.base.starts_with("https://")
    }

    /// Uses `credentials` instead of those the files give.
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Registry {
        self.credentials = credentials;
        self
    }

    fn err(&self, op: &str, status: Option<u16>, message: impl Into<String>) -> Error {
        let mut message = message.into();
        // A transport failure or a 400 in plain HTTP may be a TLS registry whose
        // certificate was not trusted: say what HTTPS said.
        if let (Some(why), None | Some(400)) = (&self.https_failed, status) {
            message.push_str(&format!(
                " (in plain HTTP, after HTTPS failed: {why}; for a registry whose certificate a \
                 private CA signed, add the CA to the system's roots or name its file in SSL_CERT_FILE)"
            ));
        }
        Error::Registry { registry: self.name.clone(), op: op.to_string(), status, message }
    }

    /// Fetches the manifest (or index) `reference` (a tag or a digest) of `repo`.
    pub fn manifest(&self, repo: &str, reference: &str) -> Result<Fetched> {
        let op = format!("fetch manifest {repo}:{reference}");
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self.send(&op, repo, &url, &[("Accept", media::ACCEPT_MANIFESTS)])?;
        if let Some(len) = resp.header("Content-Length").and_then(|l| l.parse::<u64>().ok()) {
            if len > MAX_MANIFEST {
                return Err(self.err(
                    &op,
                    None,
                    format!("the manifest is {len} bytes, more than {MAX_MANIFEST}"),
                ));
            }
        }
        let media_type = resp.header("Content-Type").map(str::to_string);
        let said = resp.header("Docker-Content-Digest").map(str::to_string);
        let mut data = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut data)
            .map_err(|e| self.err(&op, None, format!("reading the answer: {e}")))?;
        if data.len() as u64 > MAX_MANIFEST {
            return Err(self.err(&op, None, format!("the manifest is more than {MAX_MANIFEST} bytes")));
        }
        let digest = Digest::sha256_of(&data);
        if let Ok(asked) = reference.parse::<Digest>() {
            let got = if asked.algorithm() == digest.algorithm() {
                digest.clone()
            } else {
                let mut h = asked.hasher();
                h.update(&data);
                h.finish()
            };
            if got != asked {
                return Err(self.err(
                    &op,
                    None,
                    format!("the manifest's content has digest {got}, not {asked}"),
                ));
            }
            return Ok(Fetched { data, media_type, digest: asked });
        }
        if let Some(said) = said.and_then(|s| s.parse::<Digest>().ok()) {
            if said.algorithm() == digest.algorithm() && said != digest {
                return Err(self.err(
                    &op,
                    None,
                    format!("the registry says {said}, the content has {digest}"),
                ));
            }
        }
        Ok(Fetched { data, media_type, digest })
    }

    /// Downloads the blob `desc` of `repo` into `w` (resuming at its offset), then
    /// commits it (size and digest checked). `progress` gets the bytes written so far.
    pub fn blob_into(
        &self,
        repo: &str,
        desc: &Descriptor,
        mut w: BlobWriter,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        let op = format!("fetch blob {}", desc.digest);
        let url = format!("{}/v2/{repo}/blobs/{}", self.base, desc.digest);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.blob_attempt(&op, repo, &url, &mut w, progress) {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) if attempt >= ATTEMPTS => return Err(e),
                Err(Failure::Retry(e)) => {
                    log::info!("{op}: {e}; retrying from byte {}", w.offset());
                    std::thread::sleep(backoff(attempt));
                }
            }
        }
        w.commit()
    }

    fn blob_attempt(
        &self,
        op: &str,
        repo: &str,
        url: &str,
        w: &mut BlobWriter,
        progress: &dyn Fn(u64),
    ) -> std::result::Result<(), Failure> {
        let offset = w.offset();
        let range = format!("bytes={offset}-");
        let headers: Vec<(&str, &str)> = if offset > 0 { vec![("Range", &range)] } else { vec![] };
        let resp = match self.send_once(op, repo, url, &headers) {
            Ok(r) => r,
            // The partial blob is longer than the blob: start again.
            Err(Failure::Fatal(Error::Registry { status: Some(416), .. })) => {
                w.reset().map_err(Failure::Fatal)?;
                return Err(Failure::Retry(self.err(
                    op,
                    Some(416),
                    "the resume point is past the blob's end",
                )));
            }
            Err(f) => return Err(f),
        };
        if resp.status() != 206 && offset > 0 {
            // The registry ignored the Range: the whole blob comes.
            w.reset().map_err(Failure::Fatal)?;
        }
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Failure::Retry(self.err(op, None, format!("the download broke off: {e}"))))
                }
            };
            std::io::Write::write_all(w, &buf[..n])
                .map_err(|e| Failure::Fatal(self.err(op, None, e.to_string())))?;
            progress(w.offset());
        }
    }

    /// A GET with auth, redirects and retries; the answer has a 2xx status.
    fn send(&self, op: &str, repo: &str, url: &str, headers: &[(&str, &str)]) -> Result<ureq::Response> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send_once(op, repo, url, headers) {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) if attempt >= ATTEMPTS => return Err(e),
                Err(Failure::Retry(e)) => {
                    log::info!("{op}: {e}; retrying");
                    std::thread::sleep(backoff(attempt));
                }
            }
        }
    }

    /// One GET: authenticates on a 401 (once), follows redirects.
    fn send_once(
        &self,
        op: &str,
        repo: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> std::result::Result<ureq::Response, Failure> {
        let scope = format!("repository:{repo}:pull");
        let mut authenticated = false;
        loop {
            let auth = self.authorization(&scope);
            match self.get_following(op, url, headers, auth.as_deref())? {
                Answer::Ok(r) => return Ok(*r),
                Answer::Unauthorized(challenge) if !authenticated => {
                    authenticated = true;
                    self.authenticate(op, &scope, &challenge)?;
                }
                Answer::Unauthorized(_) => {
                    let what = if self.credentials.is_some() {
                        "the registry refused the credentials; check them (docker login)"
                    } else {
                        "the registry wants a login: log in with `docker login` or `podman login`, or set \
                         REGISTRY_AUTH_FILE"
                    };
                    return Err(Failure::Fatal(self.err(op, Some(401), what)));
                }
            }
        }
    }

    /// The Authorization header for `scope`, if we have one.
    fn authorization(&self, scope: &str) -> Option<String> {
        if let Some(t) = self.tokens.lock().get(scope) {
            return Some(format!("Bearer {t}"));
        }
        if self.basic.load(std::sync::atomic::Ordering::Relaxed) {
            return self.credentials.as_ref().map(Credentials::basic_header);
        }
        None
    }

    /// Follows a 401's challenge: a Bearer token for `scope`, or Basic auth.
    fn authenticate(&self, op: &str, scope: &str, challenge: &str) -> std::result::Result<(), Failure> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                if self.credentials.is_none() {
                    return Err(Failure::Fatal(self.err(
                        op,
                        Some(401),
                        "the registry wants a user and password: log in with `docker login` or `podman \
                         login`, or set REGISTRY_AUTH_FILE",
                    )));
                }
                self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    Failure::Fatal(self.err(op, Some(401), "a Bearer challenge without a realm"))
                })?;
                // The token is kept for the scope our requests need; the realm is asked
                // for the scope the challenge names (the same, from a registry that
                // follows the spec).
                let asked = params.get("scope").map_or(scope, String::as_str);
                let mut url = format!("{realm}?scope={}", url_encode(asked));
                if let Some(service) = params.get("service") {
                    url.push_str(&format!("&service={}", url_encode(service)));
                }
                let token = self.fetch_token(op, &url)?;
                self.tokens.lock().insert(scope.to_string(), token);
                Ok(())
            }
            other => {
                Err(Failure::Fatal(self.err(op, Some(401), format!("unsupported auth scheme {other:?}"))))
            }
        }
    }

    fn fetch_token(&self, op: &str, url: &str) -> std::result::Result<String, Failure> {
        let mut req = self.agent.get(url);
        if let Some(c) = &self.credentials {
            // Credentials go over TLS, or in the clear only to the registry's own origin
            // (a loopback or insecure-listed registry), never to another plain host.
            if url.starts_with("https://") || same_origin(url, &self.base) {
                req = req.set("Authorization", &c.basic_header());
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) if code == 401 || code == 403 => {
                return Err(Failure::Fatal(self.err(
                    op,
                    Some(code),
                    "the token server refused the credentials",
                )))
            }
            Err(ureq::Error::Status(code, _)) if code == 429 || code >= 500 => {
                return Err(Failure::Retry(self.err(op, Some(code), "the token server failed")))
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(Failure::Fatal(self.err(op, Some(code), "the token server refused the request")))
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure::Retry(self.err(op, None, format!("the token server: {t}"))))
            }
        };
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_TOKEN_ANSWER)
            .read_to_end(&mut body)
            .map_err(|e| Failure::Retry(self.err(op, None, format!("reading the token: {e}"))))?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::Fatal(self.err(op, None, format!("the token answer is not JSON: {e}"))))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Failure::Fatal(self.err(op, None, "the token answer has no token")))
    }

    /// A GET that follows redirects, sending `auth` only to the registry's own host.
    fn get_following(
        &self,
        op: &str,
        url: &str,
        headers: &[(&str, &str)],
        auth: Option<&str>,
    ) -> std::result::Result<Answer, Failure> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(a) = auth.filter(|_| same_origin(&url, &self.base)) {
                req = req.set("Authorization", a);
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(401, r)) => {
                    let challenge = r.header("WWW-Authenticate").unwrap_or("").to_string();
                    return Ok(Answer::Unauthorized(challenge));
                }
                Err(ureq::Error::Status(code, r)) => {
                    let detail = error_detail(r);
                    let e = self.err(op, Some(code), detail);
                    return Err(if code == 429 || code >= 500 {
                        Failure::Retry(e)
                    } else {
                        Failure::Fatal(e)
                    });
                }
                Err(ureq::Error::Transport(t)) => {
                    let e = self.err(op, None, t.to_string());
                    return Err(Failure::Retry(e));
                }
            };
            if (300..400).contains(&resp.status()) {
                let Some(loc) = resp.header("Location") else {
                    return Err(Failure::Fatal(self.err(
                        op,
                        Some(resp.status()),
                        "a redirect without Location",
                    )));
                };
                url = resolve_location(&url, loc);
                continue;
            }
            return Ok(Answer::Ok(Box::new(resp)));
        }
        Err(Failure::Fatal(self.err(op, None, format!("more than {MAX_REDIRECTS} redirects"))))
    }
}

enum Answer {
    Ok(Box<ureq::Response>),
    Unauthorized(String),
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << (attempt - 1).min(4))
}

/// The registry's answer to a failed request, for the error: its `errors[0].message`
/// (the distribution spec's error body), else nothing.
fn error_detail(r: ureq::Response) -> String {
    let mut body = Vec::new();
    let _ = r.into_reader().take(16 << 10).read_to_end(&mut body);
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code}: {msg}"))
        })
        .unwrap_or_else(|| "the registry refused the request".into())
}

/// `Scheme k="v", k2="v2"` (RFC 7235, as registries send it).
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        s = s[eq + 1..].trim_start();
        let value;
        if let Some(q) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = q[end.min(q.len())..].trim_start().trim_start_matches(',').trim_start();
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = s[end..].trim_start_matches(',').trim_start();
        }
        params.insert(key, value);
    }
    (scheme.to_string(), params)
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why `https://host/v2/` cannot be asked (TLS or the connection failed), or `None` when
/// it answers (with any status: it speaks HTTPS).
fn https_fails(agent: &ureq::Agent, host: &str) -> Option<String> {
    match agent.get(&format!("https://{host}/v2/")).timeout(Duration::from_secs(10)).call() {
        Ok(_) | Err(ureq::Error::Status(..)) => None,
        Err(ureq::Error::Transport(t)) => Some(t.to_string()),
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    &url[..end]
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a).eq_ignore_ascii_case(origin(b))
}

/// A Location header against the URL it answered.
fn resolve_location(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        loc.to_string()
    } else if loc.starts_with("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        format!("{scheme}:{loc}")
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin(base))
    } else {
        let dir = base.rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{loc}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p["realm"].as_str()), ("Basic", "Registry Realm"));
        let (_, p) = parse_challenge(r#"Bearer realm=http://x/t, scope="a\"b""#);
        assert_eq!((p["realm"].as_str(), p["scope"].as_str()), ("http://x/t", "a\"b"));
        assert!(parse_challenge("").1.is_empty());
    }

    #[test]
    fn redirects_resolve_and_auth_stays_home() {
        assert_eq!(resolve_location("http://r:5000/v2/x/blobs/d", "/b/1"), "http://r:5000/b/1");
        assert_eq!(
            resolve_location("https://r/v2/x", "https://s3.example/b?sig=1"),
            "https://s3.example/b?sig=1"
        );
        assert_eq!(resolve_location("https://r/v2/x", "//cdn/b"), "https://cdn/b");
        assert_eq!(resolve_location("https://r/v2/x/y", "z"), "https://r/v2/x/z");
        assert!(same_origin("http://127.0.0.1:5000/v2/a", "http://127.0.0.1:5000"));
        assert!(!same_origin("http://127.0.0.1:5001/b", "http://127.0.0.1:5000"));
        assert!(!same_origin("https://s3.example/b", "https://r"));
        assert_eq!(url_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
