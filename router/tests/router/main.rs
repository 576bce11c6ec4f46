//! The router over real loopback sockets: against fake backends (instant, scriptable) for
//! policy, resilience and input handling, and against real worker processes.

mod discovery;
mod fakes;
mod http_input;
mod workers;

use std::net::SocketAddr;
use std::time::Duration;

use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_proto::v1::{
    GenerateRequest, GenerateResponse, StoppingCriteria, TokenIds, generate_request::Prompt,
};
use deepseek_router::auth::ApiKeys;
use deepseek_router::backend::BackendSpec;
use deepseek_router::policy::Policy;
use deepseek_router::proxy::RouterConfig;
use deepseek_router::{RunConfig, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// A running router: its gRPC and HTTP addresses.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Running {
    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}

/// A backends file in its own temporary directory, replaced whole on each write (write,
/// then rename) as its supervisor does.
pub struct BackendsFile {
    dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl BackendsFile {
    pub fn new(tag: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("router-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = BackendsFile {
            path: dir.join("backends"),
            dir,
        };
        file.write(text);
        file
    }

    pub fn write(&self, text: &str) {
        std::fs::write(self.dir.join("next"), text).unwrap();
        std::fs::rename(self.dir.join("next"), &self.path).unwrap();
    }
}

impl Drop for BackendsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn config(policy: Policy, pools: &[(&str, u32)], backends: &[(&str, SocketAddr)]) -> RunConfig {
    RunConfig {
        backends: backends
            .iter()
            .map(|(pool, addr)| BackendSpec {
                pool: pool.to_string(),
                weight: 1,
                addr: addr.to_string(),
                gpu: String::new(),
            })
            .collect(),
        discovery: None,
        backends_file: None,
        routing: RouterConfig {
            policy,
            pools: pools.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            max_in_flight_per_backend: 64,
            max_in_flight: 1024,
            max_attempts: 3,
            hold_for_backend: Duration::ZERO,
            worker_tls: None,
        },
        keys: ApiKeys::default(),
        served_name: None,
        tls: None,
        health_interval: Duration::from_millis(50),
    }
}

/// Starts the router in this process on ephemeral ports and waits until it is SERVING.
pub async fn start(config: RunConfig) -> Running {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(config, grpc, http, None, async {
        let _ = stopped.await;
    }));
    let running = Running {
        grpc: grpc_addr,
        http: http_addr,
        stop: Some(stop),
    };
    wait_serving(grpc_addr).await;
    running
}

/// Polls gRPC health until the server at `addr` answers SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    for _ in 0..1000 {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(r) = health.check(request).await
                && r.get_ref().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never became SERVING");
}

pub fn request(prompt: Vec<u32>, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt })),
        stopping: Some(StoppingCriteria {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every message of a stream, or the status that ended it.
pub async fn collect(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.message().await? {
        messages.push(m);
    }
    Ok(messages)
}

/// One HTTP/1.1 request on its own connection: `(status, body)`.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_with_head(addr, method, path, headers, body).await;
    (status, body)
}

/// `http`, with the response's head (status line and headers) too.
pub async fn http_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: router\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&response)));
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let body = &response[split + 4..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// The payload of a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .expect("a chunk size line");
        if size == 0 {
            break;
        }
        let data = &rest[line_end + 2..];
        out.extend_from_slice(&data[..size]);
        rest = &data[size + 2..];
    }
    out
}
