//! The router in front of real worker processes serving the tiny fixture model.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deepseek_proto::v1::GetLoadRequest;
use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_router::policy::Policy;
use serde_json::Value;

use crate::{collect, config, http, request, start, wait_serving};

/// `target/<profile>/deepseek-worker`, which `cargo test --workspace` builds with this test.
fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/router-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("deepseek-worker");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p deepseek-worker` (or `cargo test --workspace`)",
        binary.display()
    );
    binary
}

struct Worker {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A worker process serving the tiny model, with `flags` after `serve --listen ADDR`.
fn start_worker(flags: &[String]) -> Worker {
    let addr = free_addr();
    let child = Command::new(worker_binary())
        .args(["serve", "--listen", &addr.to_string()])
        .args(flags)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Worker { addr, child }
}

async fn spawn_worker() -> Worker {
    let worker = start_worker(&[]);
    wait_serving(worker.addr).await;
    worker
}

/// The pods of an expert-parallel group of `pods × ranks_per_pod` ranks, as the operator
/// makes them: pod `p` runs ranks `p × ranks_per_pod` onwards, from its pod index.
async fn spawn_group(pods: u32, ranks_per_pod: u32) -> Vec<Worker> {
    let size = pods * ranks_per_pod;
    let peers: Vec<String> = (0..size).map(|_| free_addr().to_string()).collect();
    let workers: Vec<Worker> = (0..pods)
        .map(|pod| {
            let flags = [
                "--group-size".into(),
                size.to_string(),
                "--ranks-per-pod".into(),
                ranks_per_pod.to_string(),
                "--pod-index".into(),
                pod.to_string(),
                "--peers".into(),
                peers.join(","),
                "--ep-wire".into(),
                "f32".into(),
            ];
            start_worker(&flags)
        })
        .collect();
    for worker in &workers {
        wait_serving(worker.addr).await;
    }
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_workers_behind_the_router_answer_both_fronts_and_survive_a_kill() {
    let (first, mut second) = (spawn_worker().await, spawn_worker().await);
    let router = start(config(
        Policy::LeastLoad,
        &[],
        &[("h100", first.addr), ("a100", second.addr)],
    ))
    .await;
    // Greedy tokens through the router equal the worker's own.
    let mut direct = InferenceClient::connect(format!("http://{}", first.addr))
        .await
        .unwrap();
    let mut routed = router.client().await;
    let tokens = |messages: Vec<deepseek_proto::v1::GenerateResponse>| -> Vec<u32> {
        messages.into_iter().flat_map(|m| m.token_ids).collect()
    };
    let want = tokens(
        collect(&mut direct, request(vec![0, 1, 2, 3], 12))
            .await
            .unwrap(),
    );
    for _ in 0..4 {
        let got = tokens(
            collect(&mut routed, request(vec![0, 1, 2, 3], 12))
                .await
                .unwrap(),
        );
        assert_eq!(got, want);
    }

    let body = br#"{"model": "tiny-v3-bf16", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 6, "temperature": 0}"#;
    let (status, text) = http(router.http, "POST", "/v1/chat/completions", &[], body).await;
    assert_eq!(status, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["usage"]["completion_tokens"], 6);
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(reply["choices"][0]["logprobs"], Value::Null);

    // Log-probabilities of the sampled tokens, on both endpoints; alternatives are refused.
    let body = br#"{"model": "tiny-v3-bf16", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 6, "temperature": 0, "logprobs": true}"#;
    let (status, text) = http(router.http, "POST", "/v1/chat/completions", &[], body).await;
    assert_eq!(status, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    let content = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 6, "{text}");
    assert!(
        content
            .iter()
            .all(|c| c["logprob"].as_f64().unwrap() <= 0.0),
        "{text}"
    );
    let joined: String = content
        .iter()
        .map(|c| c["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        joined,
        reply["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let body = br#"{"model": "tiny-v3-bf16", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 6, "temperature": 0, "logprobs": true, "stream": true}"#;
    let (status, text) = http(router.http, "POST", "/v1/chat/completions", &[], body).await;
    assert_eq!(status, 200, "{text}");
    let (mut streamed, mut spelled, mut scored) = (String::new(), String::new(), 0);
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<Value>(line) else {
            continue; // [DONE]
        };
        let choice = &chunk["choices"][0];
        streamed.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for token in choice["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
        {
            spelled.push_str(token["token"].as_str().unwrap());
            scored += 1;
        }
    }
    assert_eq!((scored, &spelled), (6, &streamed), "{text}");
    let body = br#"{"model": "tiny-v3-bf16", "prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0,
                    "ignore_eos": true}"#;
    let (status, text) = http(router.http, "POST", "/v1/completions", &[], body).await;
    assert_eq!(status, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    let logprobs = &reply["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["token_logprobs"].as_array().unwrap().len(),
        4,
        "{text}"
    );
    assert_eq!(logprobs["text_offset"][0], 0, "{text}");
    let body = br#"{"model": "tiny-v3-bf16", "messages": [{"role": "user", "content": "hello"}],
                    "logprobs": true, "top_logprobs": 2}"#;
    let (status, text) = http(router.http, "POST", "/v1/chat/completions", &[], body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"param\":\"top_logprobs\""), "{text}");
    // The worker refuses top_p 0 (an explicit value, no longer read as "unset"); the router
    // names the OpenAI parameter from the worker's field violation.
    let body = br#"{"model": "tiny-v3-bf16", "prompt": [5, 6, 7], "max_tokens": 2, "top_p": 0}"#;
    let (status, text) = http(router.http, "POST", "/v1/completions", &[], body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"param\":\"top_p\""), "{text}");
    let stream_body = br#"{"model": "tiny-v3-bf16", "prompt": [5, 6, 7], "max_tokens": 5,
                           "ignore_eos": true, "stream": true,
                           "stream_options": {"include_usage": true}}"#;
    let (status, text) = http(router.http, "POST", "/v1/completions", &[], stream_body).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"completion_tokens\":5"), "{text}");

    // A client that goes away cancels the request on the worker.
    let mut stream = routed
        .generate(request(vec![1, 2], 200))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    let mut loads = Vec::new();
    for _ in 0..200 {
        loads.clear();
        for addr in [first.addr, second.addr] {
            let mut c = InferenceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            loads.push(c.get_load(GetLoadRequest {}).await.unwrap().into_inner());
        }
        if loads
            .iter()
            .all(|l| l.running_sequences == 0 && l.kv_blocks_used == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(loads.iter().all(|l| l.running_sequences == 0), "{loads:?}");

    // Kill one worker process: every request still succeeds, on the other.
    let _ = second.child.kill();
    let _ = second.child.wait();
    for i in 0..20 {
        let messages = collect(&mut routed, request(vec![i, i + 1], 3))
            .await
            .unwrap();
        assert_eq!(tokens(messages).len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_of_two_ranks_behind_the_router_serve_what_one_process_does() {
    let alone = spawn_worker().await;
    let pods = spawn_group(2, 2).await;
    let router = start(config(
        Policy::LeastLoad,
        &[],
        &[("h100", pods[0].addr), ("h100", pods[1].addr)],
    ))
    .await;
    let tokens = |messages: Vec<deepseek_proto::v1::GenerateResponse>| -> Vec<u32> {
        messages.into_iter().flat_map(|m| m.token_ids).collect()
    };
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..3 + i).map(|t| (t * 37 + i * 11) % 300).collect())
        .collect();
    let mut direct = InferenceClient::connect(format!("http://{}", alone.addr))
        .await
        .unwrap();
    let mut want = Vec::new();
    for prompt in &prompts {
        want.push(tokens(
            collect(&mut direct, request(prompt.clone(), 8))
                .await
                .unwrap(),
        ));
    }
    // All at once, so every rank of both pods takes requests.
    let streams: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let request = request(prompt.clone(), 8);
            let routed = InferenceClient::connect(format!("http://{}", router.grpc));
            tokio::spawn(async move { collect(&mut routed.await.unwrap(), request).await })
        })
        .collect();
    for (stream, want) in streams.into_iter().zip(want) {
        assert_eq!(tokens(stream.await.unwrap().unwrap()), want);
    }
    // Each pod reports both of its ranks' caches.
    let mut pod = InferenceClient::connect(format!("http://{}", pods[0].addr))
        .await
        .unwrap();
    let load = pod.get_load(GetLoadRequest {}).await.unwrap().into_inner();
    assert_eq!(load.kv_blocks_total, 2 * 4096);
}
