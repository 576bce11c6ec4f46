//! A gRPC load generator for `bench/router/`: `Generate` calls (each read to its end) at a
//! fixed rate, or closed-loop at a fixed concurrency, for a duration; prints one JSON line
//! with requests/s and latency percentiles.
//!
//!   load --target 127.0.0.1:50051 --rate 2000 --seconds 10
//!   load --target 127.0.0.1:50051 --concurrency 64 --seconds 10

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_proto::v1::{GenerateRequest, StoppingCriteria, TokenIds, generate_request::Prompt};
use tokio::sync::Mutex;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    target: String,
    /// Requests per second, open loop; without it, closed loop at --concurrency.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

async fn one_call(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = client.generate(request).await.ok()?.into_inner();
    while stream.message().await.ok()?.is_some() {}
    Some(started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(InferenceClient::new(
            Channel::from_shared(format!("http://{}", args.target))?
                .connect()
                .await?,
        ));
    }
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3] })),
        stopping: Some(StoppingCriteria {
            max_new_tokens: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let record = |latencies: Arc<Mutex<Vec<Duration>>>,
                  errors: Arc<std::sync::atomic::AtomicUsize>,
                  d: Option<Duration>| async move {
        match d {
            Some(d) => latencies.lock().await.push(d),
            None => {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    match args.rate {
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = 0usize;
            while Instant::now() < until {
                tick.tick().await;
                let client = clients[n % clients.len()].clone();
                let (request, latencies, errors) =
                    (request.clone(), latencies.clone(), errors.clone());
                tasks.push(tokio::spawn(async move {
                    record(latencies, errors, one_call(client, request).await).await;
                }));
                n += 1;
            }
        }
        None => {
            for k in 0..args.concurrency {
                let client = clients[k % clients.len()].clone();
                let (request, latencies, errors) =
                    (request.clone(), latencies.clone(), errors.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let d = one_call(client.clone(), request.clone()).await;
                        record(latencies.clone(), errors.clone(), d).await;
                    }
                }));
            }
        }
    }
    for task in tasks {
        task.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut latencies = latencies.lock().await.clone();
    latencies.sort();
    println!(
        "{}",
        serde_json::json!({
            "target": args.target,
            "mode": if args.rate.is_some() { "rate" } else { "closed" },
            "rate": args.rate,
            "concurrency": args.concurrency,
            "requests": latencies.len(),
            "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
            "requests_per_s": latencies.len() as f64 / wall,
            "p50_ms": percentile(&latencies, 50.0),
            "p99_ms": percentile(&latencies, 99.0),
        })
    );
    Ok(())
}
