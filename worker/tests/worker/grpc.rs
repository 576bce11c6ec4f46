//! The gRPC service over a real loopback socket, against the tiny fixture.

use std::path::Path;
use std::time::Duration;

use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_proto::v1::{
    ChatMessage, ChatMessages, DetokenizeRequest, FinishReason, GenerateRequest, GetLoadRequest,
    GetLoadResponse, ModelInfoRequest, SamplingParams, StoppingCriteria, TokenIds, TokenizeRequest,
    ToolCall, ToolChoice, generate_request::Prompt, tokenize_request,
};
use deepseek_worker::gpu::{DeviceSpec, Dtype};
use deepseek_worker::scheduler::SchedulerConfig;
use deepseek_worker::server::{ServeConfig, serve};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-v3-bf16")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Starts a worker on 127.0.0.1:0 and waits until it is SERVING.
async fn start(kv_blocks: usize) -> Channel {
    start_with_metrics(kv_blocks, None).await
}

async fn start_with_metrics(
    kv_blocks: usize,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Channel {
    launch(
        kv_blocks,
        metrics_listen,
        Duration::from_secs(30),
        None,
        std::future::pending(),
    )
    .await
    .0
}

/// Starts a worker that stops when `shutdown` completes; returns a channel to it once it is
/// SERVING, and the server task.
async fn launch(
    kv_blocks: usize,
    metrics_listen: Option<std::net::SocketAddr>,
    shutdown_grace: Duration,
    chat_template: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    Channel,
    tokio::task::JoinHandle<deepseek_worker::error::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServeConfig {
        model_dir: fixture(),
        chat_template,
        listen: addr,
        metrics_listen,
        tls: None,
        health_listen: None,
        shutdown_grace,
        served_name: "tiny".into(),
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            max_seqs: 8,
            prefill_chunk: 32,
            kv_blocks,
            max_waiting: 64,
            compute_threads: None,
        },
        rank: 0,
        ranks: 1,
        ranks_per_gpu: 1,
        group_size: 1,
        pool: "cpu".into(),
        group: None,
        device: DeviceSpec::Cpu,
        gpu_product: None,
        dtype: Dtype::Auto,
        kv_cache_fraction: None,
    };
    let server = tokio::spawn(serve(config, listener, shutdown));
    let channel = loop {
        match Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut health = HealthClient::new(channel.clone());
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let liveness = health
        .check(status("liveness"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(liveness, ServingStatus::Serving as i32);
    for _ in 0..500 {
        if health.check(status("")).await.unwrap().into_inner().status
            == ServingStatus::Serving as i32
        {
            return (channel, server);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the worker never became SERVING");
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

/// Every token of a stream, and its last message's finish reason.
async fn collect(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> (Vec<u32>, i32) {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut tokens, mut finish) = (Vec::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        tokens.extend(message.token_ids);
        if message.finish_reason != 0 {
            finish = message.finish_reason;
            assert!(message.usage.is_some());
        }
    }
    (tokens, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_over_grpc_equal_the_reference() {
    let mut client = InferenceClient::new(start(256).await);
    let reference = reference();
    let (tokens, finish) = collect(&mut client, request(ids(&reference["prompt_ids"]), 16)).await;
    assert_eq!(tokens, ids(&reference["greedy_tokens"]));
    assert_eq!(finish, FinishReason::Length as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_get_exactly_their_tokens_alone() {
    let channel = start(256).await;
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..3 + i).map(|t| (t * 37 + i * 11) % 384).collect())
        .collect();
    assert_alone_equals_together(&channel, &prompts, 8).await;
}

/// Greedy tokens of each prompt run one at a time equal those of all of them at once.
async fn assert_alone_equals_together(channel: &Channel, prompts: &[Vec<u32>], max_new: u32) {
    let mut alone = Vec::new();
    for prompt in prompts {
        let mut client = InferenceClient::new(channel.clone());
        alone.push(
            collect(&mut client, request(prompt.clone(), max_new))
                .await
                .0,
        );
    }
    let together = futures_join(prompts.iter().map(|prompt| {
        let mut client = InferenceClient::new(channel.clone());
        let request = request(prompt.clone(), max_new);
        async move { collect(&mut client, request).await.0 }
    }))
    .await;
    assert_eq!(together, alone);
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_kv_cache() {
    let channel = start(256).await;
    let mut client = InferenceClient::new(channel.clone());
    let mut stream = client
        .generate(request(vec![0, 1, 2], 200))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let busy = client
        .get_load(GetLoadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        busy.kv_blocks_used > 0 && busy.running_sequences == 1,
        "{busy:?}"
    );
    drop(stream);
    let load = load_once_idle(&mut client)
        .await
        .expect("the cancelled sequence kept its KV blocks");
    assert_eq!(load.kv_blocks_total, 256);
}

/// The load once nothing runs and no KV block is held, if that comes within two seconds:
/// the gauges are published at the end of a step, after its last messages went out.
async fn load_once_idle(client: &mut InferenceClient<Channel>) -> Option<GetLoadResponse> {
    for _ in 0..200 {
        let load = client
            .get_load(GetLoadRequest {})
            .await
            .unwrap()
            .into_inner();
        if load.kv_blocks_used == 0 && load.running_sequences == 0 {
            return Some(load);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let mut client = InferenceClient::new(start(256).await);
    let status = |r: Result<_, tonic::Status>| {
        r.err()
            .map(|s| (s.code(), s.message().to_string()))
            .unwrap()
    };
    let (code, message) = status(client.generate(request(vec![], 4)).await);
    assert_eq!(
        (code, message.as_str()),
        (Code::InvalidArgument, "prompt: is empty")
    );
    let (code, message) = status(client.generate(request(vec![1, 999], 4)).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.starts_with("prompt.token_ids: ids[1] = 999"),
        "{message}"
    );
    let mut hot = request(vec![1], 4);
    hot.sampling = Some(SamplingParams {
        temperature: -1.0,
        ..Default::default()
    });
    assert_eq!(status(client.generate(hot).await).0, Code::InvalidArgument);
    let (code, message) = status(client.generate(request(vec![1], 100_000)).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.starts_with("stopping.max_new_tokens: 100000 exceeds"),
        "{message}"
    );
    // Programs read the field from a google.rpc.BadRequest, not from the message.
    let mut wide = request(vec![1], 4);
    wide.sampling = Some(SamplingParams {
        top_p: Some(1.5),
        ..Default::default()
    });
    let violation = client
        .generate(wide)
        .await
        .err()
        .and_then(|s| s.get_details_bad_request())
        .map(|bad| bad.field_violations)
        .unwrap();
    assert_eq!(violation.len(), 1);
    assert_eq!(
        (
            violation[0].field.as_str(),
            violation[0].description.as_str()
        ),
        ("sampling.top_p", "top_p must be in (0, 1], got 1.5")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_chat_and_model_info() {
    let mut client = InferenceClient::new(start(256).await);
    let info = client
        .model_info(ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.served_name.as_str(),
            info.architecture.as_str(),
            info.vocab_size,
            info.context_length
        ),
        ("tiny", "deepseek_v3", 384, 256)
    );
    let text = tokenize_request::Input::Text("Hello world é".into());
    let ids = client
        .tokenize(TokenizeRequest { input: Some(text) })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids, [0, 54, 326, 90, 93, 293, 285, 90, 82, 235, 142, 117]);
    let text = client
        .detokenize(DetokenizeRequest { ids })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, "Hello world é");
    let chat = GenerateRequest {
        prompt: Some(Prompt::Chat(ChatMessages {
            messages: vec![user("Hi")],
            ..Default::default()
        })),
        stopping: Some(StoppingCriteria {
            max_new_tokens: 5,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(chat).await.unwrap().into_inner();
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(message) = stream.message().await.unwrap() {
        text.push_str(&message.text);
        tokens.extend(message.token_ids);
    }
    assert_eq!(tokens.len(), 5);
    // the streamed deltas add up to the whole decoding
    let whole = client
        .detokenize(DetokenizeRequest { ids: tokens })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, whole);
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
        ..Default::default()
    }
}

const WEATHER_TOOL: &str = r#"[{"type": "function", "function": {"name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#;

/// The worker's token ids of `input`.
async fn tokenized(
    client: &mut InferenceClient<Channel>,
    input: tokenize_request::Input,
) -> Vec<u32> {
    client
        .tokenize(TokenizeRequest { input: Some(input) })
        .await
        .unwrap()
        .into_inner()
        .ids
}

/// The text of a rendered chat (special tokens dropped, as Detokenize does).
async fn rendered(client: &mut InferenceClient<Channel>, chat: ChatMessages) -> String {
    let ids = tokenized(client, tokenize_request::Input::Chat(chat)).await;
    client
        .detokenize(DetokenizeRequest { ids })
        .await
        .unwrap()
        .into_inner()
        .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_reach_the_model_only_through_a_template_that_shows_them() {
    let invalid = |r: Result<_, tonic::Status>| {
        let Err(status) = r else {
            panic!("not refused")
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let violations = status.get_details_bad_request().unwrap().field_violations;
        (
            violations[0].field.clone(),
            violations[0].description.clone(),
        )
    };
    let with_tools = |messages: Vec<ChatMessage>| ChatMessages {
        messages,
        tools_json: WEATHER_TOOL.into(),
    };
    let generate = |chat: ChatMessages, choice: ToolChoice, function: &str| GenerateRequest {
        prompt: Some(Prompt::Chat(chat)),
        tool_choice: choice as i32,
        tool_choice_function: function.into(),
        stopping: Some(StoppingCriteria {
            max_new_tokens: 3,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };

    // The fixture's own template is DeepSeek-V3's, which never shows tools.
    let mut own = InferenceClient::new(start(256).await);
    let chat = with_tools(vec![user("Weather in Paris?")]);
    let (field, message) = invalid(own.generate(generate(chat, ToolChoice::Auto, "")).await);
    assert_eq!(field, "prompt.chat.tools_json");
    assert!(message.contains("does not show tools"), "{message}");

    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/chat-templates/deepseek-v3-tools.jinja"),
    )
    .unwrap();
    let (channel, _server) = launch(
        256,
        None,
        Duration::from_secs(30),
        Some(template),
        std::future::pending(),
    )
    .await;
    let mut client = InferenceClient::new(channel);
    let text = rendered(&mut client, with_tools(vec![user("Weather in Paris?")])).await;
    assert!(
        text.contains("## Tools") && text.contains(r#"{"name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}}, "type": "object"}}"#),
        "{text}"
    );
    // A call and its result, fed back.
    let call = ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        }],
        ..Default::default()
    };
    let result = ChatMessage {
        role: "tool".into(),
        content: "18 C".into(),
        tool_call_id: "call_1".into(),
        ..Default::default()
    };
    let chat = with_tools(vec![user("Weather?"), call, result]);
    let ids = tokenized(&mut client, tokenize_request::Input::Chat(chat)).await;
    // (special tokens first, so its tokens are the same alone as at the end of the chat)
    let tail = tokenized(&mut client, tokenize_request::Input::Text("<｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18 C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>".into())).await;
    assert!(ids.ends_with(&tail[1..]), "{ids:?} ends with {tail:?}");

    // A forced call the tiny model cannot finish in 3 tokens: all of it comes back as text,
    // its forced start included. (Its context is short: one bare tool.)
    let chat = ChatMessages {
        messages: vec![user("Hi")],
        tools_json: r#"[{"type": "function", "function": {"name": "get_weather"}}]"#.into(),
    };
    let mut stream = client
        .generate(generate(chat, ToolChoice::Function, "get_weather"))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut tokens, mut calls, mut last) = (String::new(), 0, 0, None);
    while let Some(message) = stream.message().await.unwrap() {
        text.push_str(&message.text);
        tokens += message.token_ids.len();
        calls += message.tool_calls.len();
        last = Some(message.finish_reason());
    }
    assert_eq!((tokens, calls, last), (3, 0, Some(FinishReason::Length)));
    assert!(
        text.starts_with("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"),
        "{text}"
    );

    for (request, field) in [
        (
            generate(
                with_tools(vec![user("x")]),
                ToolChoice::Function,
                "get_time",
            ),
            "tool_choice_function",
        ),
        (
            generate(with_tools(vec![user("x")]), ToolChoice::Auto, "get_weather"),
            "tool_choice_function",
        ),
        (
            generate(
                ChatMessages {
                    messages: vec![user("x")],
                    tools_json: "{".into(),
                },
                ToolChoice::Auto,
                "",
            ),
            "prompt.chat.tools_json",
        ),
        (
            generate(
                ChatMessages {
                    messages: vec![user("x")],
                    ..Default::default()
                },
                ToolChoice::None,
                "",
            ),
            "tool_choice",
        ),
    ] {
        assert_eq!(invalid(client.generate(request).await).0, field);
    }
}

/// An unused loopback address for `/metrics`.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn scrape(metrics_addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_pool_preempts_and_every_stream_still_gets_its_tokens_alone() {
    // 8 blocks of 16 tokens; each request grows to 40 + 40 tokens (5 blocks), and its
    // 40-token prompt runs in two chunks (32 + 8).
    let metrics_addr = free_addr();
    let channel = start_with_metrics(8, Some(metrics_addr)).await;
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..40).map(|t| (t * 29 + i * 13) % 384).collect())
        .collect();
    assert_alone_equals_together(&channel, &prompts, 40).await;
    let body = scrape(metrics_addr).await;
    let preemptions: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("deepseek_worker_preemptions_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(preemptions > 0, "the pool never ran dry:\n{body}");
    let idle = load_once_idle(&mut InferenceClient::new(channel)).await;
    assert!(
        idle.is_some(),
        "sequences kept their KV blocks after every stream ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tokens_requests_and_expert_load() {
    let metrics_addr = free_addr();
    let mut client = InferenceClient::new(start_with_metrics(256, Some(metrics_addr)).await);
    collect(&mut client, request(vec![0, 1, 2, 3], 5)).await;
    let body = scrape(metrics_addr).await;
    for expected in [
        "deepseek_worker_generation_tokens_total 5",
        "deepseek_worker_prompt_tokens_total 4",
        "deepseek_worker_requests_total{finish_reason=\"length\"} 1",
        "deepseek_worker_time_to_first_token_seconds_count 1",
        "deepseek_worker_inter_token_latency_seconds_count 4",
        "deepseek_worker_kv_blocks_total 256",
        "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
    assert!(body.trim_end().ends_with("# EOF"));
}

/// Resident memory of this process (the in-process server included), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_short_requests_leaks_no_blocks_and_no_memory() {
    let channel = start(256).await;
    let run = |count: u32| {
        let channel = channel.clone();
        async move {
            let batches: Vec<_> = (0..8u32)
                .map(|lane| {
                    let mut client = InferenceClient::new(channel.clone());
                    tokio::spawn(async move {
                        for i in 0..count / 8 {
                            let prompt = vec![0, (lane * 31 + i) % 384, (i * 7) % 384];
                            let (tokens, _) =
                                collect(&mut client, request(prompt, 1 + i % 3)).await;
                            assert_eq!(tokens.len() as u32, 1 + i % 3);
                        }
                    })
                })
                .collect();
            for batch in batches {
                batch.await.unwrap();
            }
        }
    };
    run(400).await;
    let warm = rss_kib();
    run(2000).await;
    let load = InferenceClient::new(channel.clone())
        .get_load(GetLoadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            load.running_sequences,
            load.waiting_sequences,
            load.kv_blocks_used
        ),
        (0, 0, 0),
        "{load:?}"
    );
    let grown = rss_kib().saturating_sub(warm);
    assert!(
        grown < 20 * 1024,
        "resident memory grew by {grown} KiB over 2000 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_work_and_ends_open_streams_after_the_grace_period() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let (channel, server) = launch(256, None, Duration::from_millis(50), None, shutdown).await;
    let mut client = InferenceClient::new(channel);
    let mut open = client
        .generate(request(vec![0, 1, 2], 240))
        .await
        .unwrap()
        .into_inner();
    open.message().await.unwrap().unwrap();
    stop.send(()).unwrap();
    // the open stream is ended with UNAVAILABLE once the grace period is over
    let ended = loop {
        match open.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    let refused = client.generate(request(vec![0, 1], 2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

/// `GenerateRequest` with its `text` prompt as raw bytes, to send what a string cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawTextRequest {
    #[prost(bytes = "vec", tag = "2")]
    text: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_invalid_argument() {
    let mut grpc = tonic::client::Grpc::new(start(256).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/deepseek.v1.Inference/Generate");
    let codec =
        tonic_prost::ProstCodec::<RawTextRequest, deepseek_proto::v1::GenerateResponse>::default();
    let request = tonic::Request::new(RawTextRequest {
        text: vec![b'h', 0xff, 0xfe],
    });
    let status = grpc
        .server_streaming(request, path, codec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("does not decode"), "{status:?}");
}

/// 10,000 generated requests (edge numbers, long strings, ids past the vocabulary) through the
/// server: each ends in a stream or a status, none takes the worker down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_requests_through_the_server() {
    let channel = start(256).await;
    let lanes: Vec<_> = (0..8u64)
        .map(|lane| {
            let mut client = InferenceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut rng = deepseek_worker::sampling::Rng::new(lane);
                let floats = [0.0, -1.0, 0.5, 1.0, 2.0, f32::NAN, f32::INFINITY, 1e-30];
                let (mut streams, mut refusals) = (0, 0);
                for _ in 0..1250 {
                    let mut next = || rng.next_u64();
                    let prompt = match next() % 5 {
                        0 => None,
                        1 => Some(Prompt::Text("é🦀 ".repeat((next() % 8) as usize))),
                        2 => Some(Prompt::TokenIds(TokenIds {
                            ids: vec![(next() % 500) as u32; (next() % 4) as usize],
                        })),
                        3 => Some(Prompt::Chat(ChatMessages {
                            messages: vec![user(&"x".repeat((next() % 50) as usize))],
                            ..Default::default()
                        })),
                        _ => Some(Prompt::TokenIds(TokenIds {
                            ids: (0..next() % 24).map(|i| i as u32 % 384).collect(),
                        })),
                    };
                    let pick = |n: u64| floats[(n % floats.len() as u64) as usize];
                    let request = GenerateRequest {
                        prompt,
                        sampling: Some(SamplingParams {
                            temperature: pick(next()),
                            // 0 stands for unset, as it did before the field was optional.
                            top_p: Some(pick(next())).filter(|p| *p != 0.0),
                            top_k: next() as u32 % 50,
                            ..Default::default()
                        }),
                        stopping: Some(StoppingCriteria {
                            max_new_tokens: [0, 1, 1, u32::MAX][(next() % 4) as usize],
                            stop: vec!["s".repeat((next() % 300) as usize)],
                            ignore_eos: next() % 2 == 0,
                        }),
                        ..Default::default()
                    };
                    match client.generate(request).await {
                        Ok(stream) => {
                            let mut stream = stream.into_inner();
                            while stream.message().await.unwrap().is_some() {}
                            streams += 1;
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                            refusals += 1;
                        }
                    }
                }
                (streams, refusals)
            })
        })
        .collect();
    let (mut streams, mut refusals) = (0, 0);
    for lane in lanes {
        let (s, r) = lane.await.unwrap();
        streams += s;
        refusals += r;
    }
    assert_eq!(streams + refusals, 10_000);
    assert!(
        streams > 500 && refusals > 500,
        "{streams} streams, {refusals} refusals"
    );
    let info = InferenceClient::new(channel)
        .model_info(ModelInfoRequest {})
        .await;
    assert!(info.is_ok(), "the worker still serves");
}

/// A stream's tokens, their log-probabilities and the prompt tokens it found cached.
async fn generate_logged(channel: &Channel, prompt: &[u32]) -> (Vec<u32>, Vec<f32>, u32) {
    let mut req = request(prompt.to_vec(), 12);
    req.include_logprobs = true;
    let mut stream = InferenceClient::new(channel.clone())
        .generate(req)
        .await
        .unwrap()
        .into_inner();
    let (mut tokens, mut logprobs, mut cached) = (Vec::new(), Vec::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        tokens.extend(message.token_ids);
        logprobs.extend(message.logprobs.iter().map(|l| l.logprob));
        if let Some(usage) = message.usage {
            cached = usage.cached_prompt_tokens;
        }
    }
    (tokens, logprobs, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_prefix_comes_from_the_cache_with_the_same_numbers() {
    let metrics_addr = free_addr();
    let channel = start_with_metrics(256, Some(metrics_addr)).await;
    // 80 tokens: whole chunks of 32 at 0 and 32 are cached, the partial chunk at 64 is not.
    let prompt: Vec<u32> = (0..80).map(|t| (t * 7 + 3) % 300).collect();
    let (tokens, logprobs, cached) = generate_logged(&channel, &prompt).await;
    assert_eq!(cached, 0);
    let again = generate_logged(&channel, &prompt).await;
    assert_eq!(
        again,
        (tokens.clone(), logprobs.clone(), 64),
        "bit for bit, 64 cached"
    );
    // Sharing the first 40 tokens only: the first chunk comes from the cache.
    let mut other = prompt.clone();
    other[40] = 299;
    let (_, _, cached) = generate_logged(&channel, &other).await;
    assert_eq!(cached, 32);
    let body = scrape(metrics_addr).await;
    assert!(
        body.contains("deepseek_worker_prompt_tokens_cached_total 96"),
        "{body}"
    );
}

/// Tokens, answer text and thinking text of a stream.
async fn collect_text(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> (Vec<u32>, String, String) {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut tokens, mut text, mut reasoning) = (Vec::new(), String::new(), String::new());
    while let Some(message) = stream.message().await.unwrap() {
        tokens.extend(message.token_ids);
        text.push_str(&message.text);
        reasoning.push_str(&message.reasoning_text);
    }
    (tokens, text, reasoning)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_streams_apart_from_the_answer_unless_asked_otherwise() {
    let mut client = InferenceClient::new(start(256).await);
    // <think> and </think> in the fixture's vocabulary.
    let (open, close) = (4, 5);
    let mut prompt = ids(&reference()["prompt_ids"]);
    prompt.push(open);
    let thinking = request(prompt.clone(), 12);
    let (tokens, text, reasoning) = collect_text(&mut client, thinking.clone()).await;
    let in_text = GenerateRequest {
        reasoning_in_text: true,
        ..thinking
    };
    let (same_tokens, all_text, none) = collect_text(&mut client, in_text).await;
    assert_eq!(tokens, same_tokens);
    assert_eq!(
        (none.as_str(), format!("{reasoning}{text}")),
        ("", all_text.clone())
    );
    // The prompt opened <think>: everything up to a </think> is thinking.
    let thought = tokens
        .iter()
        .position(|t| *t == close)
        .unwrap_or(tokens.len());
    let decoded = client
        .detokenize(deepseek_proto::v1::DetokenizeRequest {
            ids: tokens[..thought].to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert!(!reasoning.is_empty());
    assert_eq!(reasoning, decoded);

    // Without an open <think> in the prompt, the answer starts at once.
    prompt.pop();
    let (tokens, text, reasoning) = collect_text(&mut client, request(prompt, 12)).await;
    if !tokens.contains(&open) {
        assert_eq!((reasoning.as_str(), text.is_empty()), ("", false));
    }
}
