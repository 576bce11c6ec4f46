//! The Hugging Face Hub's HTTP protocol, as far as a download needs it (pure): the URLs,
//! the revision's file list, and what a refusal means.

use serde::Deserialize;

/// One file of a revision, as the hub lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    /// Path within the repository.
    pub path: String,
    pub size: u64,
}

/// A revision resolved to its commit, with its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub commit: String,
    pub files: Vec<HubFile>,
}

#[derive(Deserialize)]
struct ModelInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
}

/// `GET` this for a revision's commit and files with their sizes.
pub fn revision_url(endpoint: &str, repo: &str, revision: &str) -> String {
    format!(
        "{}/api/models/{repo}/revision/{}?blobs=true",
        endpoint.trim_end_matches('/'),
        encode_path(revision)
    )
}

/// `GET` this for a file's bytes at a commit (it may redirect, and serves ranges).
pub fn file_url(endpoint: &str, repo: &str, commit: &str, path: &str) -> String {
    format!(
        "{}/{repo}/resolve/{commit}/{}",
        endpoint.trim_end_matches('/'),
        encode_path(path)
    )
}

/// Percent-encodes what a path segment may not hold as is; `/` stays (branch names and
/// file paths have them).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The revision endpoint's answer: the commit and every file with its size.
pub fn parse_revision(body: &[u8]) -> Result<Revision, String> {
    let info: ModelInfo = serde_json::from_slice(body)
        .map_err(|e| format!("the hub's revision answer is not what was expected: {e}"))?;
    if info.sha.len() != 40 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the hub's commit {:?} is not a commit hash",
            info.sha
        ));
    }
    let files = info
        .siblings
        .into_iter()
        .map(|s| match s.size {
            Some(size) => Ok(HubFile {
                path: s.rfilename,
                size,
            }),
            None => Err(format!("the hub lists {} without its size", s.rfilename)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = files.iter().find(|f| !safe_relative_path(&f.path)) {
        return Err(format!(
            "the hub lists a file outside the repository: {:?}",
            bad.path
        ));
    }
    Ok(Revision {
        commit: info.sha,
        files,
    })
}

/// A path that stays inside the download directory.
fn safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// What a refusal of the revision request means, for the message.
pub fn refusal(status: u16, error_code: Option<&str>, repo: &str, revision: &str) -> String {
    match (status, error_code) {
        (401 | 403, _) => format!(
            "{repo}: the hub refused access ({status}); set HF_TOKEN to a token that may read it"
        ),
        (404, Some("RevisionNotFound")) => format!("{repo}: revision {revision:?} not found"),
        (404, _) => format!("{repo}: repository not found (or private: set HF_TOKEN)"),
        _ => format!("{repo}@{revision}: the hub answered {status}"),
    }
}

/// Whether `path` matches a glob (`*` any run of characters, `?` one character), as
/// `huggingface_hub`'s `allow_patterns` do (fnmatch: `*` crosses `/`).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let (pattern, path): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), path.chars().collect());
    // The classic two-pointer match with one backtrack point for the last `*`.
    let (mut p, mut s, mut star, mut mark) = (0, 0, None, 0);
    while s < path.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == path[s]) {
            p += 1;
            s += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = s;
            p += 1;
        } else if let Some(at) = star {
            p = at + 1;
            mark += 1;
            s = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_hub_and_encode_what_they_must() {
        assert_eq!(
            revision_url("https://huggingface.co/", "deepseek-ai/DeepSeek-V3", "main"),
            "https://huggingface.co/api/models/deepseek-ai/DeepSeek-V3/revision/main?blobs=true"
        );
        assert_eq!(
            file_url(
                "http://mirror:8080",
                "o/n",
                "abc",
                "sub dir/model-00001-of-00002.safetensors"
            ),
            "http://mirror:8080/o/n/resolve/abc/sub%20dir/model-00001-of-00002.safetensors"
        );
        assert_eq!(
            revision_url("h", "o/n", "refs/pr/1"),
            "h/api/models/o/n/revision/refs/pr/1?blobs=true"
        );
    }

    #[test]
    fn a_revision_parses_and_what_is_wrong_with_it_is_named() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let body = format!(
            r#"{{"id": "o/n", "sha": "{sha}", "siblings": [
                {{"rfilename": "config.json", "size": 7}},
                {{"rfilename": "model.safetensors", "size": 1000, "lfs": {{"sha256": "x", "size": 1000}}}}]}}"#
        );
        let revision = parse_revision(body.as_bytes()).unwrap();
        assert_eq!(revision.commit, sha);
        assert_eq!(
            revision.files[1],
            HubFile {
                path: "model.safetensors".into(),
                size: 1000
            }
        );
        let no_size = body.replace(r#", "size": 7}"#, "}");
        assert_eq!(
            parse_revision(no_size.as_bytes()).unwrap_err(),
            "the hub lists config.json without its size"
        );
        let escape = body.replace("config.json", "../etc/passwd");
        assert!(
            parse_revision(escape.as_bytes())
                .unwrap_err()
                .contains("outside the repository")
        );
        let short = body.replace(sha, "main");
        assert!(
            parse_revision(short.as_bytes())
                .unwrap_err()
                .contains("not a commit hash")
        );
        assert!(
            parse_revision(b"<html>")
                .unwrap_err()
                .starts_with("the hub's revision answer")
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        assert!(refusal(401, None, "o/n", "main").contains("set HF_TOKEN"));
        assert_eq!(
            refusal(404, Some("RevisionNotFound"), "o/n", "v9"),
            "o/n: revision \"v9\" not found"
        );
        assert!(refusal(404, Some("RepoNotFound"), "o/n", "main").contains("repository not found"));
        assert_eq!(
            refusal(500, None, "o/n", "main"),
            "o/n@main: the hub answered 500"
        );
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match(
            "*.safetensors",
            "model-00001-of-00163.safetensors"
        ));
        assert!(glob_match("*.json", "sub/config.json"));
        assert!(glob_match("tokenizer*", "tokenizer_config.json"));
        assert!(glob_match(
            "model-0000?-of-*.safetensors",
            "model-00003-of-00163.safetensors"
        ));
        assert!(!glob_match("*.json", "model.safetensors"));
        assert!(!glob_match("config.json", "config.json.bak"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "a-b-x-c"));
        assert!(!glob_match("a*b*c", "a-c-b"));
    }
}
