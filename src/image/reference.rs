//! [`Reference`]: an image reference, `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, parsed and
//! normalised as docker and containerd do (the grammar of distribution's `reference`
//! package): `busybox` is `docker.io/library/busybox:latest`; the first component is a
//! registry when it has a `.` or a `:` or is `localhost`; a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
//! a repository is lowercase components of `[a-z0-9]` joined by `.`, `_`, `__` or
//! dashes, separated by `/`.

use std::fmt;
use std::str::FromStr;

use super::digest::Digest;

/// The registry of references that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of references that name neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";
/// The longest repository name, registry included (distribution's limit).
pub const MAX_NAME: usize = 255;

/// An image reference, normalised.
///
/// ```
/// use vmhost::image::reference::Reference;
/// let r: Reference = "busybox".parse()?;
/// assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
/// let r: Reference = "localhost:5000/tools/x@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse()?;
/// assert_eq!((r.registry(), r.repository(), r.tag()), ("localhost:5000", "tools/x", None));
/// # Ok::<(), vmhost::image::reference::ReferenceError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceError {
    /// The string (cut at 300 characters).
    pub reference: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "image reference {:?}: {}", self.reference, self.why)
    }
}

impl std::error::Error for ReferenceError {}

impl Reference {
    /// The registry's name as the reference gives it (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository within the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference names one (after normalisation a reference without a
    /// digest always has one).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifests endpoint for: the digest when pinned (it
    /// wins over a tag, as docker has it), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository pinned to `digest` (what a pull resolved the tag to).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { digest: Some(digest), ..self.clone() }
    }

    /// The host to speak the registry API to: Docker Hub's API is not at `docker.io`.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine's loopback (`localhost`, `127.x`, `[::1]`),
    /// where plain HTTP is allowed.
    pub fn is_loopback(&self) -> bool {
        let host = host_part(&self.registry);
        host == "localhost"
            || host == "[::1]"
            || host.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
    }
}

/// The host of `registry` without its port.
fn host_part(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |i| &registry[..=i]);
    }
    registry.split_once(':').map_or(registry, |(h, _)| h)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        let bad = |why: String| ReferenceError { reference: s.chars().take(300).collect(), why };
        if s.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                "a 64-digit hex string is an image id, not a reference; write repository@sha256:DIGEST"
                    .into(),
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((name, d)) => (name, Some(d.parse::<Digest>().map_err(|e| bad(e.why.to_string()))?)),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/' (a port's ':' comes
        // before a '/').
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(i) if last_slash.is_none_or(|j| i > j) => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(bad)?;
        }
        if name.is_empty() {
            return Err(bad("the repository name is empty".into()));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[') =>
            {
                check_registry(first).map_err(bad)?;
                (first.to_string(), remainder.to_string())
            }
            Some(_) => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            None => (DEFAULT_REGISTRY.to_string(), format!("library/{name}")),
        };
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_string() } else { registry };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(&repository).map_err(bad)?;
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(bad(format!("the name is longer than {MAX_NAME} characters")));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { registry, repository, tag, digest })
    }
}

fn check_tag(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("tag {t:?}: use 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"))
    }
}

fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = if let Some(end) = r.strip_prefix('[').and_then(|x| x.find(']')) {
        let host = &r[1..=end];
        let after = &r[end + 2..];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {r:?}: not an IPv6 address in brackets"));
        }
        (None, after.strip_prefix(':'))
    } else {
        match r.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(r), None),
        }
    };
    if let Some(h) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !h.split('.').all(label_ok) {
            return Err(format!("registry {r:?}: not a host name"));
        }
    }
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().unwrap_or(0) > 65535
        {
            return Err(format!("registry {r:?}: the port is not a number up to 65535"));
        }
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), String> {
    if repo.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository {repo:?}: repository names must be lowercase"));
    }
    for component in repo.split('/') {
        if !component_ok(component) {
            return Err(format!(
                "repository {repo:?}: component {component:?} must be lowercase letters and digits, \
                 joined by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap_or_else(|e| panic!("{e}")).to_string()
    }

    #[test]
    fn references_normalise_as_docker_does() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("docker.io/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("index.docker.io/library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(norm("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(norm("localhost/x:t"), "localhost/x:t");
        assert_eq!(norm("127.0.0.1:5000/a/b/c:t_1.x-y"), "127.0.0.1:5000/a/b/c:t_1.x-y");
        assert_eq!(norm("ghcr.io/o/r"), "ghcr.io/o/r:latest");
        assert_eq!(norm("[::1]:5000/x:t"), "[::1]:5000/x:t");
        assert_eq!(norm(&format!("busybox@{D}")), format!("docker.io/library/busybox@{D}"));
        assert_eq!(norm(&format!("localhost:5000/x:t@{D}")), format!("localhost:5000/x:t@{D}"));
        assert_eq!(norm("a__b-c---d/e_f.g"), "docker.io/a__b-c---d/e_f.g:latest");

        let r: Reference = format!("localhost:5000/x:t@{D}").parse().unwrap();
        assert_eq!(r.manifest_reference(), D, "a digest wins over a tag");
        assert!(r.is_loopback());
        let r: Reference = "busybox".parse().unwrap();
        assert_eq!((r.api_host(), r.manifest_reference().as_str()), ("registry-1.docker.io", "latest"));
        assert!(!r.is_loopback());
        assert!("127.0.0.2:1/x".parse::<Reference>().unwrap().is_loopback());
        assert!(!"example.com:5000/x".parse::<Reference>().unwrap().is_loopback());
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            (&*format!("busybox:{}", "a".repeat(129)), "tag"),
            ("busybox@sha256:abc", "64 hex"),
            ("busybox@md5:abc", "algorithm"),
            ("a//b", "component"),
            ("a/b_", "component"),
            ("a/.b", "component"),
            ("a/b___c", "component"),
            ("localhost:99999/x", "port"),
            ("local_host.x/y", "host name"),
            ("/x", "component"),
            (&*"e".repeat(64), "image id"),
            (&*format!("x/{}", "a".repeat(260)), "longer than"),
        ];
        for (s, says) in cases {
            match s.parse::<Reference>() {
                Ok(r) => panic!("{s:?} parsed as {r}"),
                Err(e) => assert!(e.to_string().contains(says), "{s:?}: {e}"),
            }
        }
    }
}
