//! Registry credentials, where docker, podman and skopeo keep them: the `auths` of
//! `$REGISTRY_AUTH_FILE` (podman's), then of `$DOCKER_CONFIG/config.json`, else of
//! `~/.docker/config.json`. An entry is `{"auth": base64("user:password")}` or
//! `{"username": ..., "password": ...}`, keyed by the registry's host (`localhost:5000`,
//! or for Docker Hub `https://index.docker.io/v1/` as `docker login` writes it).

use std::path::PathBuf;

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        format!("Basic {}", base64_encode(format!("{}:{}", self.username, self.password).as_bytes()))
    }
}

/// The files credentials are looked up in, in order.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        files.push(PathBuf::from(f));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => files.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                files.push(PathBuf::from(h).join(".docker/config.json"));
            }
        }
    }
    files
}

/// The credentials for `registry` (as a reference names it: `docker.io`,
/// `localhost:5000`) in the first file of [`auth_files`] that has them.
pub fn lookup(registry: &str) -> Option<Credentials> {
    auth_files().iter().find_map(|f| {
        let text = std::fs::read(f).ok()?;
        if text.len() > 1 << 20 {
            log::warn!("{}: larger than 1 MiB; not read", f.display());
            return None;
        }
        match serde_json::from_slice::<serde_json::Value>(&text) {
            Ok(v) => find(&v, registry),
            Err(e) => {
                log::warn!("{}: not JSON ({e}); its credentials are not used", f.display());
                None
            }
        }
    })
}

/// The entry for `registry` in a config document's `auths`.
fn find(doc: &serde_json::Value, registry: &str) -> Option<Credentials> {
    let auths = doc.get("auths")?.as_object()?;
    let want = normalise(registry);
    auths.iter().filter(|(k, _)| normalise(k) == want).find_map(|(_, entry)| {
        if let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
            let decoded = base64_decode(encoded)?;
            let text = String::from_utf8(decoded).ok()?;
            let (u, p) = text.split_once(':')?;
            return Some(Credentials { username: u.to_string(), password: p.to_string() });
        }
        let username = entry.get("username")?.as_str()?.to_string();
        let password = entry.get("password")?.as_str()?.to_string();
        Some(Credentials { username, password })
    })
}

/// A key of `auths` as a registry name: no scheme, no path; Docker Hub's names as
/// `docker.io`.
fn normalise(key: &str) -> String {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        h => h.to_string(),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "user:pa:ss"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes(), "{s:?} -> {e}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn entries_are_found_by_normalised_host() {
        let doc = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": base64_encode(b"hub:secret")},
            "localhost:5000": {"username": "u", "password": "p:w"},
            "other:1": {"auth": "!!"}
        }});
        let hub = find(&doc, "docker.io").unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("hub", "secret"));
        assert_eq!(find(&doc, "localhost:5000").unwrap().password, "p:w");
        assert!(find(&doc, "other:1").is_none());
        assert!(find(&doc, "localhost:5001").is_none());
        assert!(!format!("{hub:?}").contains("secret"), "Debug hides the password");
        assert_eq!(hub.basic_header(), format!("Basic {}", base64_encode(b"hub:secret")));
    }
}
