//! `deepseek-worker download` against a local server that speaks the hub's protocol: the
//! revision endpoint (401 without the token it wants, 404 with `X-Error-Code` for a missing
//! revision), `resolve` redirecting to storage that serves ranges, and faults on cue (a
//! connection cut half-way, a size the metadata lies about).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deepseek_worker::download::{
    DownloadConfig, Progress, ProgressLine, download, incomplete_path,
};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Hub {
    files: Vec<(String, Vec<u8>)>,
    /// The bearer token it wants, if any.
    token: Option<String>,
    /// Sizes the metadata gives instead of the true ones.
    listed_sizes: HashMap<String, u64>,
    /// Files whose next serving stops after this many bytes, the connection cut.
    cut_after: Mutex<HashMap<String, usize>>,
    /// Bytes served per file, and the offsets asked for.
    served: Mutex<HashMap<String, u64>>,
    offsets: Mutex<Vec<(String, u64)>>,
}

impl Hub {
    fn bytes(&self, path: &str) -> &[u8] {
        &self.files.iter().find(|(p, _)| p == path).unwrap().1
    }

    fn served(&self, path: &str) -> u64 {
        self.served.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn revision(
    State(hub): State<Arc<Hub>>,
    UrlPath((_owner, _name, revision)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(token) = &hub.token
        && auth != Some(&format!("Bearer {token}"))
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if revision != "main" && revision != COMMIT {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "RevisionNotFound")],
        )
            .into_response();
    }
    let siblings: Vec<serde_json::Value> = hub
        .files
        .iter()
        .map(|(path, bytes)| {
            let size = hub
                .listed_sizes
                .get(path)
                .copied()
                .unwrap_or(bytes.len() as u64);
            serde_json::json!({"rfilename": path, "size": size})
        })
        .collect();
    let body = serde_json::json!({"id": "o/n", "sha": COMMIT, "siblings": siblings});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `resolve` redirects to storage, as the hub does for large files.
async fn resolve(
    UrlPath((_owner, _name, commit, path)): UrlPath<(String, String, String, String)>,
) -> Response {
    assert_eq!(commit, COMMIT, "files are fetched at the resolved commit");
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/storage/{path}"))],
    )
        .into_response()
}

async fn storage(
    State(hub): State<Arc<Hub>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let bytes = hub.bytes(&path).to_vec();
    let offset: usize = headers
        .get(header::RANGE)
        .and_then(|v| {
            v.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    hub.offsets
        .lock()
        .unwrap()
        .push((path.clone(), offset as u64));
    let rest = bytes[offset.min(bytes.len())..].to_vec();
    let cut = hub.cut_after.lock().unwrap().remove(&path);
    let sent = cut.map_or(rest.len(), |n| n.min(rest.len()));
    *hub.served.lock().unwrap().entry(path).or_default() += sent as u64;
    let status = if offset > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let length = rest.len().to_string();
    let body = match cut {
        None => Body::from(rest),
        Some(n) => {
            // The bytes go out, then the connection is cut.
            let first = axum::body::Bytes::from(rest[..n.min(rest.len())].to_vec());
            let stream = futures::stream::unfold(Some(first), |first| async move {
                match first {
                    Some(first) => Some((Ok(first), None)),
                    None => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        Some((Err(std::io::Error::other("cut")), None))
                    }
                }
            });
            Body::from_stream(stream)
        }
    };
    (status, [(header::CONTENT_LENGTH, length)], body).into_response()
}

async fn serve(hub: Arc<Hub>) -> SocketAddr {
    let app = axum::Router::new()
        .route(
            "/api/models/{owner}/{name}/revision/{*revision}",
            get(revision),
        )
        .route("/{owner}/{name}/resolve/{commit}/{*path}", get(resolve))
        .route("/storage/{*path}", get(storage))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A safetensors file of one f32 tensor of `n` values.
fn safetensors(n: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        n * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend((0..n).flat_map(|i| (i as f32).to_le_bytes()));
    bytes
}

fn checkpoint() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "config.json".into(),
            br#"{"model_type": "deepseek_v3"}"#.to_vec(),
        ),
        ("model-00001-of-00002.safetensors".into(), safetensors(5000)),
        (
            "sub/model-00002-of-00002.safetensors".into(),
            safetensors(3000),
        ),
    ]
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("download-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(addr: SocketAddr, dir: &Path) -> DownloadConfig {
    DownloadConfig {
        endpoint: format!("http://{addr}"),
        token: None,
        repo: "o/n".into(),
        revision: "main".into(),
        dir: dir.to_path_buf(),
        include: Vec::new(),
        parallel: 2,
    }
}

async fn run(config: &DownloadConfig) -> Result<deepseek_worker::download::Downloaded, String> {
    download(config, &Arc::new(Progress::default()))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_sharded_checkpoint_downloads_byte_for_byte_at_the_resolved_commit() {
    let hub = Arc::new(Hub {
        files: checkpoint(),
        ..Default::default()
    });
    let addr = serve(hub.clone()).await;
    let dir = temp_dir("whole");
    let done = run(&config(addr, &dir)).await.unwrap();
    assert_eq!((done.commit.as_str(), done.files), (COMMIT, 3));
    assert_eq!(done.fetched_bytes, done.bytes);
    for (path, bytes) in &hub.files {
        assert_eq!(&std::fs::read(dir.join(path)).unwrap(), bytes, "{path}");
        assert!(!incomplete_path(&dir.join(path)).exists());
    }
    // Again: everything is there and checks out, nothing is fetched.
    let again = run(&config(addr, &dir)).await.unwrap();
    assert_eq!(again.fetched_bytes, 0);
    // Only what --include names.
    let only_json = temp_dir("include");
    let mut json = config(addr, &only_json);
    json.include = vec!["*.json".into()];
    assert_eq!(run(&json).await.unwrap().files, 1);
    assert!(!only_json.join("model-00001-of-00002.safetensors").exists());
    json.include = vec!["*.bin".into()];
    assert!(
        run(&json)
            .await
            .unwrap_err()
            .contains("no file matches --include")
    );
}

#[tokio::test]
async fn a_cut_connection_and_a_killed_download_resume_without_fetching_twice() {
    let shard = "model-00001-of-00002.safetensors";
    let hub = Arc::new(Hub {
        files: checkpoint(),
        ..Default::default()
    });
    hub.cut_after.lock().unwrap().insert(shard.into(), 7000);
    let addr = serve(hub.clone()).await;
    let dir = temp_dir("resume");
    run(&config(addr, &dir)).await.unwrap();
    let size = hub.bytes(shard).len() as u64;
    assert_eq!(hub.served(shard), size, "every byte served once");
    assert!(
        hub.offsets
            .lock()
            .unwrap()
            .contains(&(shard.to_string(), 7000))
    );
    assert_eq!(std::fs::read(dir.join(shard)).unwrap(), hub.bytes(shard));

    // A download killed half-way left an incomplete file: only the rest is fetched.
    let killed = temp_dir("killed");
    let half = hub.bytes(shard).len() / 2;
    std::fs::write(
        incomplete_path(&killed.join(shard)),
        &hub.bytes(shard)[..half],
    )
    .unwrap();
    let before = hub.served(shard);
    let done = run(&config(addr, &killed)).await.unwrap();
    assert_eq!(hub.served(shard) - before, size - half as u64);
    assert_eq!(std::fs::read(killed.join(shard)).unwrap(), hub.bytes(shard));
    assert!(done.fetched_bytes < done.bytes);
}

#[tokio::test]
async fn truncated_or_corrupted_files_are_fetched_again() {
    let shard = "model-00001-of-00002.safetensors";
    let hub = Arc::new(Hub {
        files: checkpoint(),
        ..Default::default()
    });
    let addr = serve(hub.clone()).await;
    let dir = temp_dir("damaged");
    run(&config(addr, &dir)).await.unwrap();
    let good = hub.bytes(shard).to_vec();
    for damaged in [good[..good.len() - 10].to_vec(), {
        // Right size, a header that runs past the data.
        let mut bytes = good.clone();
        bytes[0] = 0xff;
        bytes
    }] {
        std::fs::write(dir.join(shard), &damaged).unwrap();
        let before = hub.served(shard);
        run(&config(addr, &dir)).await.unwrap();
        assert_eq!(hub.served(shard) - before, good.len() as u64);
        assert_eq!(std::fs::read(dir.join(shard)).unwrap(), good);
    }
}

#[tokio::test]
async fn a_size_the_hub_lies_about_is_an_error_naming_the_file() {
    let shard = "model-00001-of-00002.safetensors";
    let mut files = checkpoint();
    let true_size = files[1].1.len() as u64;
    let hub = Arc::new(Hub {
        listed_sizes: HashMap::from([(shard.to_string(), true_size + 100)]),
        files: std::mem::take(&mut files),
        ..Default::default()
    });
    let addr = serve(hub).await;
    let err = run(&config(addr, &temp_dir("lying"))).await.unwrap_err();
    assert_eq!(
        err,
        format!(
            "{shard}: the hub lists {} bytes, and the download ended at {true_size}",
            true_size + 100
        )
    );
}

#[tokio::test]
async fn refusals_say_what_is_wrong() {
    let hub = Arc::new(Hub {
        files: checkpoint(),
        token: Some("hf_secret".into()),
        ..Default::default()
    });
    let addr = serve(hub).await;
    let dir = temp_dir("refused");
    let mut config = config(addr, &dir);
    assert!(run(&config).await.unwrap_err().contains("set HF_TOKEN"));
    config.token = Some("hf_secret".into());
    config.revision = "v9".into();
    assert_eq!(
        run(&config).await.unwrap_err(),
        "o/n: revision \"v9\" not found"
    );
    config.revision = COMMIT.into();
    assert_eq!(run(&config).await.unwrap().commit, COMMIT);
    config.repo = "no-owner".into();
    assert!(
        run(&config)
            .await
            .unwrap_err()
            .contains("expected OWNER/NAME")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_reports_progress_as_json_lines_and_the_result_on_stdout() {
    let hub = Arc::new(Hub {
        files: checkpoint(),
        ..Default::default()
    });
    let addr = serve(hub).await;
    let dir = temp_dir("cli");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deepseek-worker"));
    command
        .args(["download", "--repo", "o/n", "--dir"])
        .arg(&dir)
        .args(["--include", "*.safetensors", "--include", "config.json"])
        .env("HF_ENDPOINT", format!("http://{addr}"))
        .env_remove("HF_TOKEN");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<ProgressLine> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!((last.files_done, last.files_total), (3, 3));
    assert_eq!(last.bytes_done, last.bytes_total);
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["commit"], COMMIT);
    assert_eq!(result["files"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_serves_a_hub_model_from_the_hugging_face_cache() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-v3-bf16");
    let files = std::fs::read_dir(&fixture)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    let addr = serve(Arc::new(Hub {
        files,
        ..Default::default()
    }))
    .await;
    let hf_home = temp_dir("hf-home");
    let generate = move |hf_home: PathBuf| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deepseek-worker"));
        command
            .args([
                "generate",
                "--model",
                "hf:o/n@main",
                "--prompt-ids",
                "1,2,3",
            ])
            .args(["--max-new-tokens", "2", "--threads", "1"])
            .env("HF_HOME", hf_home)
            .env("HF_ENDPOINT", format!("http://{addr}"));
        command.output().unwrap()
    };
    let home = hf_home.clone();
    let output = tokio::task::spawn_blocking(move || generate(home))
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["tokens"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    let repo = hf_home.join("hub/models--o--n");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(
        repo.join("snapshots")
            .join(COMMIT)
            .join("config.json")
            .is_file()
    );
}
