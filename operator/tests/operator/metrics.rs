//! The operator's HTTP endpoints over a real socket.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deepseek_operator::metrics::{self, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let state = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, metrics::router(state.clone())).into_future());

    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    state.ready.store(true, Ordering::Relaxed);
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));

    drop(state.start_reconcile());
    state.failed("api");
    let body = get(addr, "/metrics").await;
    assert!(
        body.contains("deepseek_operator_reconciliations_total 1"),
        "{body}"
    );
    assert!(
        body.contains("deepseek_operator_reconcile_failures_total{error=\"api\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("deepseek_operator_reconcile_duration_seconds_count 1"),
        "{body}"
    );
    assert!(body.contains("deepseek_operator_leader 0"), "{body}");
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
}
