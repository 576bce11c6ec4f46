//! Optional API keys: with none configured every request passes; otherwise a request must
//! carry `Authorization: Bearer KEY` (HTTP header or gRPC metadata) with a key whose SHA-256
//! is listed.
//!
//! The keys file (a mounted Secret's entry) holds a line per key: `NAME sha256:HEX`, a name
//! (for metrics, and to revoke one key by deleting its line) and the key's hash, so the
//! Secret never holds a key itself, then optionally `rpm=N` and `tpm=N`, the key's requests
//! and tokens per minute (`limits.rs`); `deepseek-router hash-key NAME` prints the line for
//! a key read from standard input. A bare key on a line, the older form, is hashed on load
//! and named `key-N` by its line. Blank lines and `#` comments are skipped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::limits::{Buckets, Limits};

/// The accepted keys, as names and hashes.
#[derive(Default)]
pub struct ApiKeys(Vec<Arc<Key>>);

/// One accepted key.
#[derive(Debug)]
pub struct Key {
    name: String,
    sha256: [u8; 32],
    limits: Limits,
    buckets: Mutex<Buckets>,
}

impl Key {
    fn new(name: String, sha256: [u8; 32], limits: Limits) -> Self {
        Key {
            name,
            sha256,
            limits,
            buckets: Mutex::new(Buckets::new(limits, Instant::now())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes one request of the key's rate limit, or says how long until one may go.
    pub fn admit(&self) -> Result<(), Duration> {
        self.buckets().admit(Instant::now())
    }

    /// Spends tokens streamed back to the key's holder.
    pub fn spend(&self, tokens: u64) {
        self.buckets().spend(tokens, Instant::now());
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Who a request comes as.
#[derive(Debug)]
pub enum Caller {
    /// No keys are configured.
    Anyone,
    /// The key's holder.
    Key(Arc<Key>),
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
        let mut keys: Vec<Arc<Key>> = Vec::new();
        let lines = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim());
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.is_empty()) {
            let key = parse_line(line, n + 1)
                .map_err(|why| Error::ApiKeys(format!("line {}: {why}", n + 1)))?;
            if keys.iter().any(|k| k.name == key.name) {
                let why = format!("line {}: the name {:?} is used twice", n + 1, key.name);
                return Err(Error::ApiKeys(why));
            }
            keys.push(Arc::new(key));
        }
        Ok(ApiKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Who a request with this `Authorization` value comes as; `None` when it may not pass.
    /// The presented key's hash is compared with every listed one in constant time, so how
    /// long this takes says nothing about how close a guess was.
    pub fn authorize(&self, authorization: Option<&str>) -> Option<Caller> {
        if self.0.is_empty() {
            return Some(Caller::Anyone);
        }
        let presented = sha256(authorization?.strip_prefix("Bearer ")?.trim());
        let mut found = None;
        for key in &self.0 {
            if bool::from(key.sha256.ct_eq(&presented)) {
                found = Some(Caller::Key(key.clone()));
            }
        }
        found
    }
}

/// One line of the keys file (line `number`): `NAME sha256:HEX [rpm=N] [tpm=N]`, or a bare
/// key.
fn parse_line(line: &str, number: usize) -> Result<Key, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let [key] = words[..] {
        return Ok(Key::new(
            format!("key-{number}"),
            sha256(key),
            Limits::default(),
        ));
    }
    let (name, hash, options) = match &words[..] {
        [name, hash, options @ ..] => (name, hash, options),
        _ => unreachable!("a line that is not empty has a word"),
    };
    let digits = hash
        .strip_prefix("sha256:")
        .ok_or("expected NAME sha256:HEX, or a bare key")?;
    let sha256 = parse_sha256(digits).ok_or("the hash is not 64 hex digits")?;
    let mut limits = Limits::default();
    for option in options {
        let (limit, value) = match option.split_once('=') {
            Some(("rpm", value)) => (&mut limits.requests_per_minute, value),
            Some(("tpm", value)) => (&mut limits.tokens_per_minute, value),
            _ => return Err(format!("{option:?}: expected rpm=N or tpm=N")),
        };
        *limit = Some(
            value
                .parse()
                .ok()
                .filter(|&n: &u32| n > 0)
                .ok_or_else(|| format!("{option:?}: expected a positive number per minute"))?,
        );
    }
    Ok(Key::new(name.to_string(), sha256, limits))
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
        let caller = |keys: &ApiKeys, authorization| match keys.authorize(authorization) {
            Some(Caller::Anyone) => Some("anyone".to_string()),
            Some(Caller::Key(key)) => Some(key.name().to_string()),
            None => None,
        };
        assert_eq!(caller(&ApiKeys::default(), None).as_deref(), Some("anyone"));
        let text = format!("# team a\n{}\n\n sk-two \n", key_line("team-a", "sk-one"));
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(
            caller(&keys, Some("Bearer sk-one")).as_deref(),
            Some("team-a")
        );
        assert_eq!(
            caller(&keys, Some("Bearer sk-two")).as_deref(),
            Some("key-4")
        );
        assert_eq!(caller(&keys, Some("Bearer sk-three")), None);
        assert_eq!(caller(&keys, Some("sk-one")), None);
        assert_eq!(caller(&keys, None), None);
    }

    #[test]
    fn a_line_may_set_the_keys_rate_limits() {
        let line = format!("{} rpm=60 tpm=1000", key_line("batch", "sk"));
        let keys = ApiKeys::parse(&line).unwrap();
        let Some(Caller::Key(key)) = keys.authorize(Some("Bearer sk")) else {
            panic!("the key is not accepted");
        };
        let expected = Limits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(1000),
        };
        assert_eq!(key.limits(), expected);
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
            (
                "a md5:00\n",
                "line 1: expected NAME sha256:HEX, or a bare key",
            ),
            ("a b c\n", "line 1: expected NAME sha256:HEX, or a bare key"),
            (
                &format!("a sha256:{} rpm=0\n", "0".repeat(64)),
                "line 1: \"rpm=0\": expected a positive number per minute",
            ),
            (
                &format!("a sha256:{} burst=3\n", "0".repeat(64)),
                "line 1: \"burst=3\": expected rpm=N or tpm=N",
            ),
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
