//! Optional API keys: with none configured every request passes; otherwise a request must
//! carry `Authorization: Bearer KEY` (HTTP header or gRPC metadata) with a key whose SHA-256
//! is listed.
//!
//! The keys file (a mounted Secret's entry) holds a line per key: `NAME sha256:HEX`, a name
//! (for metrics, and to revoke one key by deleting its line) and the key's hash, so the
//! Secret never holds a key itself; `deepseek-router hash-key NAME` prints that line for a
//! key read from standard input. A bare key on a line, the older form, is hashed on load and
//! named `key-N` by its line. Blank lines and `#` comments are skipped.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// The accepted keys, as names and hashes.
#[derive(Default)]
pub struct ApiKeys(Vec<NamedKey>);

struct NamedKey {
    name: String,
    sha256: [u8; 32],
}

/// Who a request comes as.
#[derive(Debug, PartialEq, Eq)]
pub enum Caller<'a> {
    /// No keys are configured.
    Anyone,
    /// The named key's holder.
    Key(&'a str),
}

fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys file's line for `key` under `name`.
pub fn key_line(name: &str, key: &str) -> String {
    format!("{name} sha256:{}", hex(&sha256(key)))
}

impl ApiKeys {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut keys: Vec<NamedKey> = Vec::new();
        let lines = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim());
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.is_empty()) {
            let invalid = |why: &str| Error::ApiKeys(format!("line {}: {why}", n + 1));
            let key = match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, hash] => {
                    let digits = hash
                        .strip_prefix("sha256:")
                        .ok_or_else(|| invalid("expected NAME sha256:HEX"))?;
                    NamedKey {
                        name: name.to_string(),
                        sha256: parse_sha256(digits)
                            .ok_or_else(|| invalid("the hash is not 64 hex digits"))?,
                    }
                }
                [key] => NamedKey {
                    name: format!("key-{}", n + 1),
                    sha256: sha256(key),
                },
                _ => return Err(invalid("expected NAME sha256:HEX, or a bare key")),
            };
            if keys.iter().any(|k| k.name == key.name) {
                return Err(invalid(&format!("the name {:?} is used twice", key.name)));
            }
            keys.push(key);
        }
        Ok(ApiKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Who a request with this `Authorization` value comes as; `None` when it may not pass.
    /// The presented key's hash is compared with every listed one in constant time, so how
    /// long this takes says nothing about how close a guess was.
    pub fn authorize(&self, authorization: Option<&str>) -> Option<Caller<'_>> {
        if self.0.is_empty() {
            return Some(Caller::Anyone);
        }
        let presented = sha256(authorization?.strip_prefix("Bearer ")?.trim());
        let mut found = None;
        for key in &self.0 {
            if bool::from(key.sha256.ct_eq(&presented)) {
                found = Some(Caller::Key(&key.name));
            }
        }
        found
    }
}

fn parse_sha256(digits: &str) -> Option<[u8; 32]> {
    if digits.len() != 64 || !digits.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_only_when_configured() {
        assert_eq!(ApiKeys::default().authorize(None), Some(Caller::Anyone));
        let text = format!("# team a\n{}\n\n sk-two \n", key_line("team-a", "sk-one"));
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(
            keys.authorize(Some("Bearer sk-one")),
            Some(Caller::Key("team-a"))
        );
        assert_eq!(
            keys.authorize(Some("Bearer sk-two")),
            Some(Caller::Key("key-4"))
        );
        assert_eq!(keys.authorize(Some("Bearer sk-three")), None);
        assert_eq!(keys.authorize(Some("sk-one")), None);
        assert_eq!(keys.authorize(None), None);
    }

    #[test]
    fn the_file_holds_hashes_not_keys() {
        // SHA-256 of "abc" (FIPS 180-2's first example).
        assert_eq!(
            key_line("ci", "abc"),
            "ci sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_bad_keys_file_is_refused_naming_the_line() {
        for (text, says) in [
            ("a sha256:00\n", "line 1: the hash is not 64 hex digits"),
            ("a md5:00\n", "line 1: expected NAME sha256:HEX"),
            ("a b c\n", "line 1: expected NAME sha256:HEX, or a bare key"),
            (
                "\nsk-1\nkey-2 sha256:0000000000000000000000000000000000000000000000000000000000000000\n",
                "line 3: the name \"key-2\" is used twice",
            ),
        ] {
            let err = ApiKeys::parse(text).err().map(|e| e.to_string());
            assert_eq!(err, Some(format!("API keys: {says}")), "{text:?}");
        }
    }
}
