//! `deepseek-worker download`: a model repository from the Hugging Face Hub (or a mirror at
//! `HF_ENDPOINT`) into a directory, once and verifiably.
//!
//! The revision is resolved to its commit first and every file is fetched at that commit, so
//! a branch that moves mid-download cannot mix two checkpoints. Files download in parallel
//! into `NAME.incomplete` beside their final name; an interrupted file resumes with a range
//! request from what it has. A file is done when its size is the one the hub lists and, for
//! safetensors, its header agrees with its data (`weights::check_safetensors`); only then is
//! it renamed into place. A file already in place that passes the same checks is kept, and
//! one that fails them is fetched again. `hub.rs` holds the protocol, `http.rs` the client,
//! `progress.rs` what is reported while it runs.

mod http;
pub mod hub;
mod progress;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

pub use self::progress::{Progress, ProgressLine};

use self::http::Http;
use self::hub::{HubFile, Revision};

/// The public hub, when `HF_ENDPOINT` does not name another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Tries per file before the download fails (a dropped connection resumes where it was).
const ATTEMPTS: u32 = 5;

/// Bytes gathered before a write to disk.
const WRITE_BUFFER: usize = 8 << 20;

/// How long a body may send nothing before the connection counts as dropped.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct DownloadConfig {
    /// The hub's base URL (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Bearer token (`HF_TOKEN`).
    pub token: Option<String>,
    /// `OWNER/NAME`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    pub dir: PathBuf,
    /// Globs of the files to fetch; empty: every file.
    pub include: Vec<String>,
    /// Files fetched at once.
    pub parallel: usize,
}

/// What was downloaded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Downloaded {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub files: usize,
    pub bytes: u64,
    /// Bytes that came over the network this time (the rest was already there).
    pub fetched_bytes: u64,
}

/// A download failure; the message names the file where there is one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DownloadError(pub String);

/// Downloads the revision's files (those `include` matches) into `config.dir`, counting on
/// `progress`.
pub async fn download(
    config: &DownloadConfig,
    progress: &Arc<Progress>,
) -> Result<Downloaded, DownloadError> {
    let fail = |message: String| DownloadError(message);
    if config.repo.split('/').count() != 2 || config.repo.split('/').any(str::is_empty) {
        return Err(fail(format!(
            "--repo {:?}: expected OWNER/NAME",
            config.repo
        )));
    }
    let http = Http::new(&config.endpoint, config.token.clone()).map_err(fail)?;
    let revision = resolve(&http, config).await?;
    tracing::debug!(repo = %config.repo, commit = %revision.commit, "revision resolved");
    let files: Vec<HubFile> = revision
        .files
        .into_iter()
        .filter(|f| {
            config.include.is_empty() || config.include.iter().any(|g| hub::glob_match(g, &f.path))
        })
        .collect();
    if files.is_empty() {
        return Err(fail(format!(
            "{}@{}: no file matches --include {:?}",
            config.repo, config.revision, config.include
        )));
    }
    progress.start(files.len(), files.iter().map(|f| f.size).sum());
    let commit = revision.commit;
    let results: Vec<Result<u64, DownloadError>> = futures::stream::iter(files.iter())
        .map(|file| fetch_file(&http, config, &commit, file, progress))
        .buffer_unordered(config.parallel.max(1))
        .collect()
        .await;
    let fetched_bytes = results
        .into_iter()
        .collect::<Result<Vec<u64>, _>>()?
        .iter()
        .sum();
    Ok(Downloaded {
        repo: config.repo.clone(),
        revision: config.revision.clone(),
        commit,
        files: files.len(),
        bytes: files.iter().map(|f| f.size).sum(),
        fetched_bytes,
    })
}

/// `hf:OWNER/NAME[@REVISION]` as `(repo, revision)`; `None` for anything else (a path).
pub fn hub_model(arg: &str) -> Option<(String, String)> {
    let spec = arg.strip_prefix("hf:")?;
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    Some((repo.to_string(), revision.to_string()))
}

/// The Hugging Face cache's directory for a repository (`huggingface_hub`'s layout):
/// `HF_HOME/hub/models--OWNER--NAME`.
pub fn cache_repo_dir(hf_home: &Path, repo: &str) -> PathBuf {
    hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// Downloads a revision into the Hugging Face cache, `snapshots/COMMIT/` of its repository,
/// and points `refs/REVISION` at the commit, as `huggingface_hub` does (whole files, not
/// links into `blobs/`); gives the snapshot directory.
pub async fn into_cache(
    mut config: DownloadConfig,
    hf_home: &Path,
    progress: &Arc<Progress>,
) -> Result<(PathBuf, Downloaded), DownloadError> {
    let http = Http::new(&config.endpoint, config.token.clone()).map_err(DownloadError)?;
    let commit = resolve(&http, &config).await?.commit;
    // The files at that commit even if the branch moves meanwhile.
    let revision = std::mem::replace(&mut config.revision, commit.clone());
    let repo_dir = cache_repo_dir(hf_home, &config.repo);
    config.dir = repo_dir.join("snapshots").join(&commit);
    let mut downloaded = download(&config, progress).await?;
    downloaded.revision.clone_from(&revision);
    let ref_file = repo_dir.join("refs").join(&revision);
    let write_ref = async {
        if let Some(dir) = ref_file.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::write(&ref_file, &commit).await
    };
    // A commit as revision is its own ref; branch names with `/` get directories.
    if revision != commit {
        write_ref
            .await
            .map_err(|e| DownloadError(format!("{}: {e}", ref_file.display())))?;
    }
    Ok((config.dir, downloaded))
}

async fn resolve(http: &Http, config: &DownloadConfig) -> Result<Revision, DownloadError> {
    if config.repo.split('/').count() != 2 || config.repo.split('/').any(str::is_empty) {
        return Err(DownloadError(format!(
            "{:?}: expected a repository as OWNER/NAME",
            config.repo
        )));
    }
    let url = hub::revision_url(&config.endpoint, &config.repo, &config.revision);
    let answer = http.get_body(&url).await.map_err(DownloadError)?;
    if answer.status != 200 {
        return Err(DownloadError(hub::refusal(
            answer.status,
            answer.error_code.as_deref(),
            &config.repo,
            &config.revision,
        )));
    }
    hub::parse_revision(&answer.body).map_err(|e| DownloadError(format!("{}: {e}", config.repo)))
}

/// Brings one file into place; gives the bytes fetched over the network.
async fn fetch_file(
    http: &Http,
    config: &DownloadConfig,
    commit: &str,
    file: &HubFile,
    progress: &Progress,
) -> Result<u64, DownloadError> {
    let target = config.dir.join(&file.path);
    let named = |message: String| DownloadError(format!("{}: {message}", file.path));
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| named(format!("creating {}: {e}", parent.display())))?;
    }
    if complete(&target, file).await.is_ok() {
        progress.already(file.size);
        progress.file_done();
        return Ok(0);
    }
    let partial = incomplete_path(&target);
    progress.already(len_of(&partial).await.min(file.size));
    let url = hub::file_url(&config.endpoint, &config.repo, commit, &file.path);
    let mut fetched = 0;
    let mut last_error = String::new();
    let mut refetched_whole = false;
    for _ in 0..ATTEMPTS {
        match fetch_into(http, &url, &partial, file.size, progress).await {
            Ok(bytes) => fetched += bytes,
            Err(Fetch::Retry(bytes, why)) => {
                fetched += bytes;
                last_error = why;
                continue;
            }
            Err(Fetch::Fatal(why)) => return Err(named(why)),
        }
        match complete(&partial, file).await {
            Ok(()) => {
                tokio::fs::rename(&partial, &target)
                    .await
                    .map_err(|e| named(format!("renaming into place: {e}")))?;
                progress.file_done();
                return Ok(fetched);
            }
            // Right size, wrong contents: once more from nothing, then give up.
            Err(why) if !refetched_whole => {
                tracing::warn!(file = %file.path, %why, "fetching it again");
                progress.discard(len_of(&partial).await);
                let _ = tokio::fs::remove_file(&partial).await;
                refetched_whole = true;
                last_error = why;
            }
            Err(why) => return Err(named(why)),
        }
    }
    Err(named(format!(
        "gave up after {ATTEMPTS} tries: {last_error}"
    )))
}

enum Fetch {
    /// Worth another try, resuming: the bytes fetched before it failed, and why.
    Retry(u64, String),
    Fatal(String),
}

/// Fetches what `partial` lacks of a `size`-byte file; gives the bytes fetched.
async fn fetch_into(
    http: &Http,
    url: &str,
    partial: &Path,
    size: u64,
    progress: &Progress,
) -> Result<u64, Fetch> {
    let mut have = len_of(partial).await;
    if have > size {
        // (counted as `size` when it was found)
        progress.discard(size);
        have = 0;
    }
    if have == size {
        return Ok(0);
    }
    let response = http
        .get_from(url, have)
        .await
        .map_err(|e| Fetch::Retry(0, e))?;
    let status = response.status().as_u16();
    let append = match status {
        206 => true,
        200 => {
            // A whole file (the server ignored the range, or none was asked): from nothing.
            progress.discard(have);
            have = 0;
            false
        }
        401 | 403 | 404 => {
            return Err(Fetch::Fatal(format!(
                "the hub answered {status} for {url} (set HF_TOKEN?)"
            )));
        }
        _ => return Err(Fetch::Retry(0, format!("the hub answered {status}"))),
    };
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(partial)
        .await
        .map_err(|e| Fetch::Fatal(format!("opening {}: {e}", partial.display())))?;
    // Large writes: each write of a tokio file is a trip to a blocking thread, and the
    // body comes in chunks of a few KiB.
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut body = std::pin::pin!(http::body_stream(response));
    let mut fetched = 0u64;
    loop {
        let next = tokio::time::timeout(STALL, body.next()).await;
        let chunk = match next {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                let _ = out.flush().await;
                let why = format!("no data for {} s", STALL.as_secs());
                return Err(Fetch::Retry(fetched, why));
            }
        };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = out.flush().await;
                return Err(Fetch::Retry(fetched, format!("the connection broke: {e}")));
            }
        };
        if have + fetched + chunk.len() as u64 > size {
            return Err(Fetch::Fatal(format!(
                "the hub lists {size} bytes, and more came"
            )));
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| Fetch::Fatal(format!("writing {}: {e}", partial.display())))?;
        fetched += chunk.len() as u64;
        progress.fetched(chunk.len() as u64);
    }
    out.flush()
        .await
        .map_err(|e| Fetch::Fatal(format!("writing {}: {e}", partial.display())))?;
    if have + fetched < size {
        return Err(Fetch::Fatal(format!(
            "the hub lists {size} bytes, and the download ended at {}",
            have + fetched
        )));
    }
    Ok(fetched)
}

/// Whether the file at `path` is the hub's `file`: its size, and a safetensors header that
/// agrees with its data.
async fn complete(path: &Path, file: &HubFile) -> Result<(), String> {
    let len = len_of(path).await;
    if len != file.size {
        return Err(format!("{len} bytes, the hub lists {}", file.size));
    }
    if file.path.ends_with(".safetensors") {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || crate::weights::check_safetensors(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn len_of(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// Where a file is written until it is complete.
pub fn incomplete_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".incomplete");
    PathBuf::from(name)
}
