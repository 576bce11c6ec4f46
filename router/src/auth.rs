//! Optional API keys: with none configured every request passes; otherwise a request must
//! carry `Authorization: Bearer KEY` (HTTP header or gRPC metadata) with a listed key.

use std::collections::HashSet;

#[derive(Default)]
pub struct ApiKeys(HashSet<String>);

impl ApiKeys {
    /// One key per line; blank lines and `#` comments are skipped (a mounted Secret's file
    /// works as is).
    pub fn parse(text: &str) -> Self {
        ApiKeys(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a request with this `Authorization` value may pass.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|key| self.0.contains(key.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_only_when_configured() {
        assert!(ApiKeys::default().allows(None));
        let keys = ApiKeys::parse("# team a\nsk-one\n\n sk-two \n");
        assert!(keys.allows(Some("Bearer sk-one")));
        assert!(keys.allows(Some("Bearer sk-two")));
        assert!(!keys.allows(Some("Bearer sk-three")));
        assert!(!keys.allows(Some("sk-one")));
        assert!(!keys.allows(None));
    }
}
