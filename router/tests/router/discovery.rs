//! EndpointSlice discovery against a scripted API server: the router's backend set follows
//! the list, then the watch events. And a backends file, followed as it is rewritten.

use std::sync::Arc;
use std::time::Duration;

use deepseek_router::discovery;
use deepseek_router::policy::Policy;
use deepseek_router::proxy::{Router, RouterConfig};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

fn slice(name: &str, pool: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "inference", "resourceVersion": "2",
                     "labels": {"serving.deepseek-operator.io/pool": pool}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
    })
}

fn addrs(router: &Router) -> Vec<(String, String)> {
    router
        .backends()
        .iter()
        .map(|b| (b.spec.pool.clone(), b.spec.addr.clone()))
        .collect()
}

fn empty_router() -> Arc<Router> {
    Arc::new(
        Router::new(
            Vec::new(),
            RouterConfig {
                policy: Policy::LeastLoad,
                pools: Vec::new(),
                max_in_flight_per_backend: 8,
                max_in_flight: 8,
                max_attempts: 1,
                hold_for_backend: Duration::ZERO,
                worker_tls: None,
            },
        )
        .unwrap(),
    )
}

async fn wait_for_backends(router: &Router, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(pool, addr)| (pool.to_string(), addr.to_string()))
        .collect();
    for _ in 0..500 {
        if addrs(router) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("backends {:?}, expected {want:?}", addrs(router));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_set_follows_the_endpoint_slices() {
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let router = empty_router();
    let watching = tokio::spawn(discovery::watch(
        client,
        "inference",
        "app.kubernetes.io/component=worker",
        router.clone(),
    ));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), api.next_request())
            .await
            .expect("the watcher calls the API")
            .expect("client alive")
    };

    let (request, send) = next().await;
    let uri = request.uri().to_string();
    assert!(
        uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/inference/endpointslices?")
            && uri.contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dworker")
            && !uri.contains("watch=true"),
        "{uri}"
    );
    let list = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "2"},
        "items": [slice("g0", "h100", &["10.0.0.1", "10.0.0.2"])],
    });
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(&list).unwrap(),
    )));

    let (request, send) = next().await;
    assert!(
        request.uri().to_string().contains("watch=true"),
        "{}",
        request.uri()
    );
    // Rank 10.0.0.2 goes away, a group in another pool comes up.
    let events = [
        json!({"type": "MODIFIED", "object": slice("g0", "h100", &["10.0.0.1"])}),
        json!({"type": "ADDED", "object": slice("g1", "a100", &["10.0.1.1"])}),
    ];
    let body: Vec<u8> = events
        .iter()
        .flat_map(|e| serde_json::to_vec(e).unwrap().into_iter().chain([b'\n']))
        .collect();
    send.send_response(Response::new(Body::from(body)));

    wait_for_backends(
        &router,
        &[("h100", "10.0.0.1:50051"), ("a100", "10.0.1.1:50051")],
    )
    .await;
    watching.abort();
}

#[tokio::test]
async fn the_backend_set_follows_a_rewritten_backends_file() {
    let file = crate::BackendsFile::new(
        "backends",
        "pool=a,addr=127.0.0.1:1\npool=b,addr=127.0.0.1:2\n",
    );
    let router = empty_router();
    let fixed = vec!["pool=x,addr=127.0.0.1:9".parse().unwrap()];
    let following = tokio::spawn(discovery::follow_file(
        deepseek_router::BackendsFile {
            path: file.path.clone(),
            fixed,
        },
        router.clone(),
    ));
    wait_for_backends(
        &router,
        &[
            ("x", "127.0.0.1:9"),
            ("a", "127.0.0.1:1"),
            ("b", "127.0.0.1:2"),
        ],
    )
    .await;
    // A line that does not parse keeps what the router has; a good file replaces it.
    file.write("pool=a,addr=nowhere\n");
    tokio::time::sleep(discovery::BACKENDS_FILE_POLL * 2).await;
    assert_eq!(addrs(&router).len(), 3);
    file.write("# the group in pool a is gone\npool=b,addr=127.0.0.1:2\n");
    wait_for_backends(&router, &[("x", "127.0.0.1:9"), ("b", "127.0.0.1:2")]).await;
    following.abort();
}
