//! [`Digest`]: a content address, `ALGORITHM:HEX`, as the OCI image spec defines it
//! (`sha256:` with 64 lowercase hex digits, `sha512:` with 128), and the check of bytes
//! against one.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// A content digest, validated: a registered algorithm and its exact encoding.
///
/// ```
/// use vmhost::image::digest::Digest;
/// let d: Digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".parse()?;
/// assert_eq!(d, Digest::sha256_of(b"hello"));
/// assert_eq!(d.hex().len(), 64);
/// # Ok::<(), vmhost::image::digest::DigestError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// The algorithms the OCI image spec registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256: 64 hex digits. What every registry uses.
    Sha256,
    /// SHA-512: 128 hex digits.
    Sha512,
}

impl Algorithm {
    /// The name before the colon.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestError {
    /// The string.
    pub digest: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "digest {:?}: {}", self.digest, self.why)
    }
}

impl std::error::Error for DigestError {}

impl Digest {
    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest { algorithm: Algorithm::Sha256, hex: hex(&Sha256::digest(data)) }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher that computes a digest of this digest's algorithm, to check streamed
    /// bytes against it.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let bad = |why| DigestError { digest: s.chars().take(200).collect(), why };
        let (alg, hex) =
            s.split_once(':').ok_or_else(|| bad("no ':' between the algorithm and the digits"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad("the algorithm is not sha256 or sha512")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(bad(if algorithm == Algorithm::Sha256 {
                "sha256 takes exactly 64 hex digits"
            } else {
                "sha512 takes exactly 128 hex digits"
            }));
        }
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad("the digits must be lowercase hex"));
        }
        Ok(Digest { algorithm, hex: hex.to_string() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Computes a digest over bytes fed to it in pieces.
#[derive(Debug, Clone)]
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-512.
    Sha512(Sha512),
}

impl Hasher {
    /// A hasher of `algorithm`.
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest { algorithm: Algorithm::Sha256, hex: hex(&h.finalize()) },
            Hasher::Sha512(h) => Digest { algorithm: Algorithm::Sha512, hex: hex(&h.finalize()) },
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_strictly_and_hash_as_they_say() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = empty.parse().unwrap();
        assert_eq!(d, Digest::sha256_of(b""));
        assert_eq!(d.to_string(), empty);
        let mut h = d.hasher();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), Digest::sha256_of(b"hello"));
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert!(sha512.parse::<Digest>().is_ok());
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/..",
            "sha256:../../../../etc/passwd",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }
}
