//! Policy and resilience against fake backends: instant gRPC servers that answer with their
//! own name, count their calls, and can be told to fail or to hold a stream open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepseek_proto::deadline::grpc_timeout;
use deepseek_proto::v1::inference_server::{Inference, InferenceServer};
use deepseek_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, FinishReason, GenerateRequest, GenerateResponse,
    GetLoadRequest, GetLoadResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse, ToolCall, Usage, generate_request::Prompt,
};
use deepseek_router::auth::{ApiKeys, key_line};
use deepseek_router::policy::Policy;
use futures::Stream;
use tonic::{Code, Request, Response, Status};

use crate::{collect, config, http, http_with_head, request, start};

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// One token carrying the backend's name, then the finish message.
    Answer,
    /// One token, then the stream fails.
    TokenThenFail,
    /// A token, then the stream stays open until the client goes away.
    Hold,
    /// A thought, then `Answer`'s token: the thought as `reasoning_text`, or in `text` when
    /// the request asks for it there, as a worker serving a thinking model does.
    Think,
    /// `Answer`'s token, then a call of the function the request names in
    /// `tool_choice_function`, its arguments `{"offered": <tools_json>}`, then EOS.
    CallTool,
}

pub struct Fake {
    pub name: String,
    pub calls: Arc<AtomicUsize>,
    mode: Mode,
    /// The `grpc-timeout` of the last `Generate` call.
    deadline: Arc<Mutex<Option<Duration>>>,
}

type Messages = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for Fake {
    type GenerateStream = Messages;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Messages>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        *self.deadline.lock().unwrap() = grpc_timeout(request.metadata());
        let thought = GenerateResponse {
            token_ids: vec![7],
            ..if request.get_ref().reasoning_in_text {
                GenerateResponse {
                    text: "hmm. ".into(),
                    ..Default::default()
                }
            } else {
                GenerateResponse {
                    reasoning_text: "hmm. ".into(),
                    ..Default::default()
                }
            }
        };
        let token = GenerateResponse {
            token_ids: vec![1],
            text: self.name.clone(),
            ..Default::default()
        };
        let done = GenerateResponse {
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let chat_tools = match &request.get_ref().prompt {
            Some(Prompt::Chat(chat)) => chat.tools_json.clone(),
            _ => String::new(),
        };
        let call = GenerateResponse {
            token_ids: vec![2],
            tool_calls: vec![ToolCall {
                id: "call_x".into(),
                name: request.get_ref().tool_choice_function.clone(),
                arguments: format!(r#"{{"offered": {chat_tools}}}"#),
            }],
            ..Default::default()
        };
        let stream: Messages = match self.mode {
            Mode::Answer => Box::pin(futures::stream::iter([Ok(token), Ok(done)])),
            Mode::TokenThenFail => Box::pin(futures::stream::iter([
                Ok(token),
                Err(Status::unavailable("the backend died mid-stream")),
            ])),
            Mode::Think => Box::pin(futures::stream::iter([Ok(thought), Ok(token), Ok(done)])),
            Mode::CallTool => Box::pin(futures::stream::iter([
                Ok(token),
                Ok(call),
                Ok(GenerateResponse {
                    finish_reason: FinishReason::Eos as i32,
                    ..done
                }),
            ])),
            Mode::Hold => Box::pin(futures::StreamExt::chain(
                futures::stream::iter([Ok(token)]),
                futures::stream::pending(),
            )),
        };
        Ok(Response::new(stream))
    }

    async fn tokenize(
        &self,
        _: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Ok(Response::new(TokenizeResponse { ids: vec![1, 2] }))
    }

    async fn detokenize(
        &self,
        _: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        Ok(Response::new(DetokenizeResponse {
            text: self.name.clone(),
        }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(ModelInfoResponse {
            served_name: "fake".into(),
            ..Default::default()
        }))
    }

    async fn get_load(
        &self,
        _: Request<GetLoadRequest>,
    ) -> Result<Response<GetLoadResponse>, Status> {
        Ok(Response::new(GetLoadResponse::default()))
    }
}

/// A fake backend serving on loopback until `kill` is sent.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub deadline: Arc<Mutex<Option<Duration>>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(name: &str, mode: Mode) -> Self {
        Self::start_at(name, mode, "127.0.0.1:0".parse().unwrap()).await
    }

    /// `start` on `addr` (port 0: any free port).
    pub async fn start_at(name: &str, mode: Mode, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let deadline = Arc::new(Mutex::new(None));
        let fake = Fake {
            name: name.into(),
            calls: calls.clone(),
            mode,
            deadline: deadline.clone(),
        };
        let (_, health) = tonic_health::server::health_reporter();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(InferenceServer::new(fake))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = killed.await;
                    },
                )
                .await;
        });
        FakeServer {
            addr,
            calls,
            deadline,
            kill: Some(kill),
            server,
        }
    }

    /// Stops serving and closes the listener, as a crashed process would.
    pub async fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

/// Which backend answered: the text of the first message.
async fn answer(
    client: &mut deepseek_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
    prompt: Vec<u32>,
) -> String {
    collect(client, request(prompt, 1)).await.unwrap()[0]
        .text
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_share_traffic_by_weight_and_ranks_by_load() {
    let fakes = [
        FakeServer::start("h100-a", Mode::Answer).await,
        FakeServer::start("h100-b", Mode::Answer).await,
        FakeServer::start("a100-a", Mode::Answer).await,
    ];
    let router = start(config(
        Policy::LeastLoad,
        &[("h100", 3), ("a100", 1)],
        &[
            ("h100", fakes[0].addr),
            ("h100", fakes[1].addr),
            ("a100", fakes[2].addr),
        ],
    ))
    .await;
    let mut client = router.client().await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..400 {
        *counts
            .entry(answer(&mut client, vec![i]).await)
            .or_default() += 1;
    }
    let h100 = counts["h100-a"] + counts["h100-b"];
    assert!((290..=310).contains(&h100), "{counts:?}");
    assert!(
        counts["h100-a"].abs_diff(counts["h100-b"]) <= 20,
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prefix_goes_to_the_same_rank() {
    let mut fakes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        fakes.push(FakeServer::start(name, Mode::Answer).await);
    }
    let backends: Vec<(&str, SocketAddr)> = fakes.iter().map(|f| ("h100", f.addr)).collect();
    let router = start(config(Policy::PrefixAffinity, &[], &backends)).await;
    let mut client = router.client().await;
    // On a loaded machine a health check can time out and leave a backend out for a moment;
    // homes are only comparable once every backend takes traffic.
    let mut answered = std::collections::HashSet::new();
    for warm_up in 100..10_000u32 {
        if answered.len() == fakes.len() {
            break;
        }
        answered.insert(answer(&mut client, (0..80).map(|t| warm_up * 1000 + t).collect()).await);
    }
    assert_eq!(
        answered.len(),
        fakes.len(),
        "backends never answered: {answered:?}"
    );
    let mut homes = HashMap::new();
    for round in 0..5 {
        for prefix in 0..12u32 {
            // The same 80-token prefix, a different tail every round.
            let prompt: Vec<u32> = (0..80).map(|t| prefix * 1000 + t).chain([round]).collect();
            let backend = answer(&mut client, prompt).await;
            assert_eq!(
                homes.entry(prefix).or_insert_with(|| backend.clone()),
                &backend
            );
        }
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert!(used.len() >= 3, "prefixes spread over the ranks: {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_follows_a_conversation_to_where_its_history_went() {
    let mut fakes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        fakes.push(FakeServer::start(name, Mode::Answer).await);
    }
    let backends: Vec<(&str, SocketAddr)> = fakes.iter().map(|f| ("h100", f.addr)).collect();
    let router = start(config(Policy::CacheAware, &[], &backends)).await;
    let mut client = router.client().await;
    let mut homes = HashMap::new();
    for turn in 0..3u32 {
        for conversation in 0..12u32 {
            // Each turn is the conversation so far and 40 tokens more.
            let history: Vec<u32> = (0..80 + 40 * turn)
                .map(|t| conversation * 1000 + t)
                .collect();
            let backend = answer(&mut client, history).await;
            assert_eq!(
                homes.entry(conversation).or_insert_with(|| backend.clone()),
                &backend,
                "conversation {conversation}, turn {turn}"
            );
        }
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert!(
        used.len() >= 3,
        "new conversations spread by load: {homes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_loses_no_request_that_had_not_started() {
    let mut fakes = Vec::new();
    for name in ["a", "b", "c"] {
        fakes.push(FakeServer::start(name, Mode::Answer).await);
    }
    let backends: Vec<(&str, SocketAddr)> = fakes.iter().map(|f| ("h100", f.addr)).collect();
    let router = start(config(Policy::LeastLoad, &[], &backends)).await;
    let client = router.client().await;
    let burst = |n: u32| {
        let client = client.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let mut client = client.clone();
                    tokio::spawn(async move { collect(&mut client, request(vec![i], 1)).await })
                })
                .collect();
            for task in tasks {
                let messages = task.await.unwrap().expect("every request succeeds");
                assert_eq!(messages.len(), 2);
            }
        }
    };
    burst(30).await;
    assert!(
        fakes[1].calls.load(Ordering::Relaxed) > 0,
        "b took its share before"
    );
    fakes[1].kill().await;
    // Until a health check notices, requests still pick b, find it dead before their first
    // token and are retried on a or c.
    burst(60).await;
    burst(60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_after_its_first_token_is_not_retried() {
    let broken = FakeServer::start("broken", Mode::TokenThenFail).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", broken.addr)])).await;
    let mut client = router.client().await;
    let mut stream = client
        .generate(request(vec![1], 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().text, "broken");
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(broken.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_deadline_reaches_the_worker() {
    let fake = FakeServer::start("a", Mode::Answer).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", fake.addr)])).await;
    let mut client = router.client().await;
    let mut call = tonic::Request::new(request(vec![1], 1));
    call.set_timeout(Duration::from_secs(5));
    client.generate(call).await.unwrap();
    let seen = fake
        .deadline
        .lock()
        .unwrap()
        .expect("a grpc-timeout header");
    assert!(
        seen <= Duration::from_secs(5) && seen > Duration::from_secs(4),
        "{seen:?}"
    );
    client.generate(request(vec![1], 1)).await.unwrap();
    assert_eq!(
        *fake.deadline.lock().unwrap(),
        None,
        "no deadline, none invented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_limit_refuses_with_resource_exhausted_and_429() {
    let holder = FakeServer::start("holder", Mode::Hold).await;
    let mut cfg = config(Policy::LeastLoad, &[], &[("p", holder.addr)]);
    cfg.routing.max_in_flight = 1;
    let router = start(cfg).await;
    let mut client = router.client().await;
    let mut open = client
        .generate(request(vec![1], 4))
        .await
        .unwrap()
        .into_inner();
    open.message().await.unwrap().unwrap();
    let refused = client.generate(request(vec![2], 4)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let body = br#"{"model": "fake", "prompt": "hi"}"#;
    let (status, text) = http(router.http, "POST", "/v1/completions", &[], body).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("rate_limit_error"), "{text}");
    drop(open); // the held stream ends, and with it the router's count
    for _ in 0..100 {
        if client.generate(request(vec![3], 4)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the router kept counting a stream its client dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_enforced_on_both_fronts() {
    let fake = FakeServer::start("a", Mode::Answer).await;
    let mut cfg = config(Policy::LeastLoad, &[], &[("p", fake.addr)]);
    // Two named keys, held as hashes; the other team's line deleted revokes its key.
    let file = format!(
        "{}\n{}\n",
        key_line("team-a", "sk-right"),
        key_line("team-b", "sk-b")
    );
    cfg.keys = ApiKeys::parse(&file).unwrap();
    let router = start(cfg).await;
    let body = br#"{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}"#;
    let path = "/v1/chat/completions";
    let (status, text) = http(router.http, "POST", path, &[], body).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"), "{text}");
    let wrong = [("Authorization", "Bearer sk-wrong")];
    assert_eq!(http(router.http, "POST", path, &wrong, body).await.0, 401);
    let right = [("Authorization", "Bearer sk-right")];
    let (status, text) = http(router.http, "POST", path, &right, body).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"content\":\"a\""), "{text}");

    let mut client = router.client().await;
    let refused = client.generate(request(vec![1], 1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut with_key = tonic::Request::new(request(vec![1], 1));
    with_key
        .metadata_mut()
        .insert("authorization", "Bearer sk-right".parse().unwrap());
    assert!(client.generate(with_key).await.is_ok());
    drop(router);

    let mut cfg = config(Policy::LeastLoad, &[], &[("p", fake.addr)]);
    cfg.keys = ApiKeys::parse(&key_line("team-a", "sk-right")).unwrap();
    let router = start(cfg).await;
    let revoked = [("Authorization", "Bearer sk-b")];
    assert_eq!(http(router.http, "POST", path, &revoked, body).await.0, 401);
    assert_eq!(http(router.http, "POST", path, &right, body).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_limit_waits_with_429_and_retry_after() {
    let fake = FakeServer::start("a", Mode::Answer).await;
    let mut cfg = config(Policy::LeastLoad, &[], &[("p", fake.addr)]);
    let file = format!(
        "{} rpm=2\n{} tpm=1\n",
        key_line("two-a-minute", "sk-rpm"),
        key_line("one-token", "sk-tpm")
    );
    cfg.keys = ApiKeys::parse(&file).unwrap();
    let router = start(cfg).await;
    let body = br#"{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}"#;
    let path = "/v1/chat/completions";
    let rpm = [("Authorization", "Bearer sk-rpm")];
    for _ in 0..2 {
        assert_eq!(http(router.http, "POST", path, &rpm, body).await.0, 200);
    }
    let (status, head, text) = http_with_head(router.http, "POST", path, &rpm, body).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("rate_limit_exceeded"), "{text}");
    // One request comes back every 30 s.
    let retry_after =
        retry_after_header(&head).unwrap_or_else(|| panic!("no Retry-After in {head}"));
    assert!((29..=31).contains(&retry_after), "{head}");
    let mut limited = tonic::Request::new(request(vec![1], 1));
    limited
        .metadata_mut()
        .insert("authorization", "Bearer sk-rpm".parse().unwrap());
    let refused = router.client().await.generate(limited).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // The first answer spends the only token of the minute: the next waits.
    let tpm = [("Authorization", "Bearer sk-tpm")];
    assert_eq!(http(router.http, "POST", path, &tpm, body).await.0, 200);
    assert_eq!(http(router.http, "POST", path, &tpm, body).await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_is_reasoning_content_apart_from_the_answer() {
    let fake = FakeServer::start("a", Mode::Think).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", fake.addr)])).await;
    let chat = |extra: &str| {
        format!(r#"{{"model": "fake", "messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#)
    };
    let post = |path: &'static str, body: String| async move {
        let (status, text) = http(router.http, "POST", path, &[], body.as_bytes()).await;
        assert_eq!(status, 200, "{text}");
        text
    };
    let whole: serde_json::Value =
        serde_json::from_str(&post("/v1/chat/completions", chat("")).await).unwrap();
    let message = &whole["choices"][0]["message"];
    assert_eq!(
        (
            message["reasoning_content"].as_str(),
            message["content"].as_str()
        ),
        (Some("hmm. "), Some("a"))
    );

    let streamed = post("/v1/chat/completions", chat(r#", "stream": true"#)).await;
    let deltas: Vec<serde_json::Value> = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(d).unwrap()["choices"][0]["delta"].clone()
        })
        .collect();
    assert_eq!(
        deltas[0],
        serde_json::json!({"role": "assistant", "reasoning_content": "hmm. "})
    );
    assert_eq!(deltas[1], serde_json::json!({"content": "a"}));

    // Asked to keep it in the answer; and a completion is the raw text, thinking included.
    let kept: serde_json::Value = serde_json::from_str(
        &post(
            "/v1/chat/completions",
            chat(r#", "separate_reasoning": false"#),
        )
        .await,
    )
    .unwrap();
    let message = &kept["choices"][0]["message"];
    assert_eq!(
        (
            message["reasoning_content"].is_null(),
            message["content"].as_str()
        ),
        (true, Some("hmm. a"))
    );
    let completion: serde_json::Value = serde_json::from_str(
        &post(
            "/v1/completions",
            r#"{"model": "fake", "prompt": "hi"}"#.to_string(),
        )
        .await,
    )
    .unwrap();
    assert_eq!(completion["choices"][0]["text"], "hmm. a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_in_openais_shape_whole_and_streamed() {
    let fake = FakeServer::start("a", Mode::CallTool).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", fake.addr)])).await;
    let tools = r#"[{"type": "function", "function": {"name": "get_weather"}}]"#;
    let chat = |extra: &str| {
        format!(
            r#"{{"model": "fake", "messages": [{{"role": "user", "content": "hi"}}], "tools": {tools},
                "tool_choice": {{"type": "function", "function": {{"name": "get_weather"}}}}{extra}}}"#
        )
    };
    let post = |body: String| async move {
        let (status, text) = http(
            router.http,
            "POST",
            "/v1/chat/completions",
            &[],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        text
    };
    // The tools as the router passed them on (compact JSON).
    let offered: serde_json::Value = serde_json::from_str(tools).unwrap();
    let arguments = format!(r#"{{"offered": {offered}}}"#);
    let call = serde_json::json!({
        "id": "call_x",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    });
    let whole: serde_json::Value = serde_json::from_str(&post(chat("")).await).unwrap();
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["content"], "a");
    assert_eq!(choice["message"]["tool_calls"], serde_json::json!([call]));
    assert_eq!(choice["finish_reason"], "tool_calls");

    let streamed = post(chat(r#", "stream": true"#)).await;
    let choices: Vec<serde_json::Value> = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap()["choices"][0].clone())
        .collect();
    let mut indexed = call.clone();
    indexed["index"] = 0.into();
    assert_eq!(
        choices[0]["delta"],
        serde_json::json!({"role": "assistant", "content": "a"})
    );
    assert_eq!(
        choices[1]["delta"],
        serde_json::json!({"tool_calls": [indexed]})
    );
    assert_eq!(choices[2]["finish_reason"], "tool_calls");
}

/// A `Retry-After` header's seconds.
fn retry_after_header(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after: ")?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_backend_a_request_is_held_until_one_serves() {
    let file = crate::BackendsFile::new("hold", "# the deployment is at zero groups\n");
    let mut cfg = config(Policy::LeastLoad, &[], &[]);
    cfg.routing.hold_for_backend = Duration::from_secs(30);
    cfg.backends_file = Some(deepseek_router::BackendsFile {
        path: file.path.clone(),
        fixed: Vec::new(),
    });
    // Ready (SERVING) with no backend: it takes requests and holds them.
    let router = start(cfg).await;
    let mut client = router.client().await;
    let held = tokio::spawn(async move { answer(&mut client, vec![1]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished());
    let woken = FakeServer::start("woken", Mode::Answer).await;
    file.write(&format!("pool=p,addr={}\n", woken.addr));
    assert_eq!(held.await.unwrap(), "woken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_past_the_limit_is_refused_with_retry_after() {
    let mut cfg = config(Policy::LeastLoad, &[], &[]);
    cfg.routing.hold_for_backend = Duration::from_secs(1);
    let router = start(cfg).await;
    let refused = router
        .client()
        .await
        .generate(request(vec![1], 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("retry-after").unwrap(), "1");
    let body = br#"{"model": "fake", "prompt": "hi", "max_tokens": 1}"#;
    let (status, head, text) =
        http_with_head(router.http, "POST", "/v1/completions", &[], body).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("no healthy backend after holding"), "{text}");
    assert_eq!(retry_after_header(&head), Some(1), "{head}");
}

/// A backend the router ejected while nothing listened there (a rank still loading), which
/// serves by now, is asked again before a request finds no healthy backend: a rollout's new
/// group is up and the old one has just gone, before the next periodic check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_backend_serving_again_is_asked_before_a_request_is_refused() {
    let mut old = FakeServer::start("old", Mode::Answer).await;
    // A free port, with nothing listening on it yet.
    let new_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(Policy::LeastLoad, &[], &[("p", old.addr), ("p", new_addr)]);
    // One check, at start (it ejects the second); only a request's recheck can readmit it.
    cfg.health_interval = Duration::from_secs(3600);
    let router = start(cfg).await;
    let mut client = router.client().await;
    assert_eq!(answer(&mut client, vec![1]).await, "old");
    let _new = FakeServer::start_at("new", Mode::Answer, new_addr).await;
    old.kill().await;
    // Every request is answered: by `old` while its last connection lingers, then by `new`.
    for _ in 0..100 {
        if answer(&mut client, vec![2]).await == "new" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("`new` never answered");
}
