//! An expert-parallel group of worker processes on loopback: each rank serves its own
//! requests (data-parallel attention) and holds half the experts; the group's tokens equal
//! one process's, an idle rank keeps stepping with a busy one, a killed rank fails the
//! others' requests promptly with UNAVAILABLE, and a rank whose peer does not answer stops
//! before it loads.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_worker::generate::{GenerateOptions, generate};
use deepseek_worker::model::Model;
use deepseek_worker::sampling::SamplingParams;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::grpc::request;
use crate::parity::fixture;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Rank(Child);

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The addresses of a group: each rank's gRPC and expert-parallel ones.
struct Addrs {
    grpc: Vec<String>,
    peers: Vec<String>,
    /// More `serve` flags for every rank.
    extra: Vec<String>,
}

impl Addrs {
    fn new(size: usize) -> Self {
        let addrs = || {
            (0..size)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect()
        };
        Addrs {
            grpc: addrs(),
            peers: addrs(),
            extra: Vec::new(),
        }
    }

    fn spawn(&self, rank: usize) -> Rank {
        Rank(self.serve(rank).stderr(Stdio::null()).spawn().unwrap())
    }

    /// `deepseek-worker serve` as rank `rank`.
    fn serve(&self, rank: usize) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_deepseek-worker"));
        command
            .args(["serve", "--listen", &self.grpc[rank]])
            .args(["--group-size", &self.peers.len().to_string()])
            .args([
                "--rank",
                &rank.to_string(),
                "--peers",
                &self.peers.join(","),
            ])
            .args(["--ep-wire", "f32", "--ep-stall-timeout-seconds", "5"])
            .args(&self.extra)
            .stdout(Stdio::null());
        command
    }
}

async fn health(addr: &str) -> Option<i32> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let reply = HealthClient::new(channel).check(request).await.ok()?;
    Some(reply.into_inner().status)
}

/// Waits (at most a minute) until the rank at `addr` reports `status`.
async fn reaches(addr: &str, status: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while health(addr).await != Some(status as i32) {
        assert!(
            Instant::now() < deadline,
            "rank at {addr} never reported {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serving(addr: &str) -> Channel {
    reaches(addr, ServingStatus::Serving).await;
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn alone(prompt: &[u32], n: usize) -> Vec<u32> {
    alone_with_logprobs(prompt, n).0
}

/// One process's greedy tokens and each one's log-probability.
fn alone_with_logprobs(prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let model = Model::open(&fixture("tiny-v3-bf16")).unwrap();
    let options = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        keep_logits: true,
    };
    let run = generate(&model, prompt, &options).unwrap();
    let logprobs = run
        .step_logits
        .iter()
        .zip(&run.tokens)
        .map(|(logits, &token)| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            (f64::from(logits[token as usize] - max) - sum.ln()) as f32
        })
        .collect();
    (run.tokens, logprobs)
}

async fn tokens(channel: Channel, prompt: Vec<u32>, n: u32) -> Result<Vec<u32>, tonic::Status> {
    let mut stream = InferenceClient::new(channel)
        .generate(request(prompt, n))
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await? {
        tokens.extend(m.token_ids);
    }
    Ok(tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_rank_group_serves_what_one_process_does_fails_fast_when_a_rank_dies_and_recovers() {
    let addrs = Addrs::new(2);
    let mut ranks = [addrs.spawn(0), addrs.spawn(1)];
    let grpc = &addrs.grpc;
    let channels = [serving(&grpc[0]).await, serving(&grpc[1]).await];
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..4 + i).map(|t| (t * 41 + i * 17) % 300).collect())
        .collect();

    // Requests on both ranks at once, then on rank 0 alone (rank 1 idles along).
    let both: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(tokens(channels[i % 2].clone(), p.clone(), 10)))
        .collect();
    for (p, task) in prompts.iter().zip(both) {
        assert_eq!(task.await.unwrap().unwrap(), alone(p, 10));
    }
    assert_eq!(
        tokens(channels[0].clone(), prompts[0].clone(), 10)
            .await
            .unwrap(),
        alone(&prompts[0], 10)
    );

    // Kill rank 1 in the middle of a long generation on rank 0.
    let long = tokio::spawn(tokens(channels[0].clone(), prompts[1].clone(), 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = ranks[1].0.kill();
    let started = Instant::now();
    let err = long.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed after {:?}",
        started.elapsed()
    );

    // The survivor says it cannot serve until the group is whole again, then serves.
    reaches(&grpc[0], ServingStatus::NotServing).await;
    let refused = tokens(channels[0].clone(), prompts[2].clone(), 4)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    ranks[1] = addrs.spawn(1);
    let channel = serving(&grpc[0]).await;
    serving(&grpc[1]).await;
    assert_eq!(
        tokens(channel, prompts[2].clone(), 10).await.unwrap(),
        alone(&prompts[2], 10)
    );
}

#[test]
fn a_rank_whose_peer_does_not_answer_stops_before_it_loads() {
    let mut addrs = Addrs::new(2);
    addrs.extra = vec!["--ep-connect-timeout-seconds".into(), "1".into()];
    let started = Instant::now();
    let out = addrs.serve(0).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30));
    for says in [
        "preflight",
        &format!("rank 1 at {} did not answer", addrs.peers[1]),
    ] {
        assert!(log.contains(says), "{says:?} not in {log}");
    }
    assert!(!log.contains("weights loaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_ranks_with_redundant_experts_match_one_process_to_1e_5() {
    let plan = deepseek_proto::placement::PlacementPlan::round_robin(4, 8, 4);
    let dir = tempfile_dir();
    let plan_file = dir.join("plan.json");
    std::fs::write(&plan_file, serde_json::to_string(&plan).unwrap()).unwrap();
    let mut addrs = Addrs::new(4);
    addrs.extra = vec!["--placement".into(), plan_file.display().to_string()];
    let _ranks: Vec<Rank> = (0..4).map(|r| addrs.spawn(r)).collect();
    let mut channels = Vec::new();
    for addr in &addrs.grpc {
        channels.push(serving(addr).await);
    }
    let streams: Vec<_> = (0..4u32)
        .map(|r| {
            let prompt: Vec<u32> = (0..3 + 2 * r).map(|t| (t * 53 + r * 29) % 300).collect();
            let mut req = request(prompt.clone(), 8);
            req.include_logprobs = true;
            let mut client = InferenceClient::new(channels[r as usize].clone());
            tokio::spawn(async move {
                let mut stream = client.generate(req).await.unwrap().into_inner();
                let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
                while let Some(m) = stream.message().await.unwrap() {
                    tokens.extend(m.token_ids);
                    logprobs.extend(m.logprobs.iter().map(|l| l.logprob));
                }
                (prompt, tokens, logprobs)
            })
        })
        .collect();
    for stream in streams {
        let (prompt, tokens, logprobs) = stream.await.unwrap();
        let (want_tokens, want_logprobs) = alone_with_logprobs(&prompt, 8);
        assert_eq!(tokens, want_tokens);
        for (got, want) in logprobs.iter().zip(&want_logprobs) {
            assert!((got - want).abs() < 1e-5, "logprob {got} vs {want}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("dsd-group-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
