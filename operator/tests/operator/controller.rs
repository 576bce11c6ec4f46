//! The controller's I/O against a scripted API server: every call it makes, in order.

use std::sync::Arc;
use std::time::Duration;

use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::controller::{self, Context, Error, backoff};
use deepseek_operator::metrics::Metrics;
use http::{Request, Response};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tower_test::mock::Handle;

use crate::fixtures::*;

enum Reply {
    /// 200 with this body.
    Json(Value),
    /// 200 with the request body, as an apply or create answers.
    Echo,
    /// An API error with this HTTP code.
    Status(u16),
}

struct FakeApi {
    handle: Handle<Request<Body>, Response<Body>>,
}

impl FakeApi {
    /// Like `expect`, answering 200 with a body made from the request body.
    async fn expect_with(
        &mut self,
        method: &str,
        path: &str,
        reply: impl FnOnce(&Value) -> Value,
    ) -> (String, Value) {
        self.answer(method, path, |body| (200, reply(body))).await
    }

    /// Waits (at most a second) for the next call, checks it, answers it, and returns the
    /// request URI and JSON body.
    async fn expect(&mut self, method: &str, path: &str, reply: Reply) -> (String, Value) {
        self.answer(method, path, |body| match reply {
            Reply::Json(value) => (200, value),
            Reply::Echo => (200, body.clone()),
            Reply::Status(code) => (code, json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
                "reason": if code == 404 { "NotFound" } else { "Conflict" }, "message": format!("scripted {code}"),
            })),
        })
        .await
    }

    async fn answer(
        &mut self,
        method: &str,
        path: &str,
        reply: impl FnOnce(&Value) -> (u16, Value),
    ) -> (String, Value) {
        let next = tokio::time::timeout(Duration::from_secs(1), self.handle.next_request());
        let (request, send) = next
            .await
            .unwrap_or_else(|_| panic!("expected {method} {path}"))
            .expect("client alive");
        let uri = request.uri().to_string();
        assert_eq!(
            (request.method().as_str(), uri.starts_with(path)),
            (method, true),
            "expected {method} {path}, got {uri}"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let (code, reply) = reply(&body);
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap();
        send.send_response(response);
        (uri, body)
    }

    async fn expect_no_more_calls(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(100), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

fn setup() -> (Arc<Context>, FakeApi) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        "test".into(),
    ));
    (ctx, FakeApi { handle })
}

fn list(kind: &str, items: Vec<Value>) -> Reply {
    Reply::Json(
        json!({ "apiVersion": "v1", "kind": kind, "metadata": { "resourceVersion": "1" }, "items": items }),
    )
}

const NS: &str = "/namespaces/default";
const APPS: &str = "/apis/apps/v1/namespaces/default";
const CORE: &str = "/api/v1/namespaces/default";

/// The reads at the start of a reconcile of the tiny sample.
async fn observe(api: &mut FakeApi, stateful_sets: Vec<Value>, pods: Vec<Value>) {
    observe_children(api, stateful_sets, pods).await;
    model_volume(api).await;
}

/// The model's claim, read once the spec resolves.
async fn model_volume(api: &mut FakeApi) {
    api.expect("GET", &format!("{CORE}/persistentvolumeclaims/tiny-model"), Reply::Json(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "tiny-model"}}))).await;
}

async fn observe_children(api: &mut FakeApi, stateful_sets: Vec<Value>, pods: Vec<Value>) {
    let (uri, _) = api
        .expect(
            "GET",
            &format!("{APPS}/statefulsets?"),
            list("StatefulSetList", stateful_sets),
        )
        .await;
    assert!(uri.contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dworker%2Cserving.deepseek-operator.io%2Fdeployment%3Dtiny"), "{uri}");
    api.expect("GET", &format!("{CORE}/pods?"), list("PodList", pods))
        .await;
    api.expect(
        "GET",
        &format!("{APPS}/deployments/tiny-router"),
        Reply::Status(404),
    )
    .await;
}

/// Server-side applies of every object of the tiny sample, in order.
async fn applies(api: &mut FakeApi) -> Vec<Value> {
    let mut applied = Vec::new();
    for path in [
        format!("{CORE}/serviceaccounts/tiny-router"),
        format!("/apis/rbac.authorization.k8s.io/v1{NS}/roles/tiny-router"),
        format!("/apis/rbac.authorization.k8s.io/v1{NS}/rolebindings/tiny-router"),
        format!("{CORE}/configmaps/tiny-cpu-placement"),
        format!("{CORE}/services/tiny-cpu-g0"),
        format!("{CORE}/services/tiny-router"),
        format!("{APPS}/statefulsets/tiny-cpu-g0"),
        format!("/apis/policy/v1{NS}/poddisruptionbudgets/tiny-cpu-g0"),
        format!("/apis/networking.k8s.io/v1{NS}/networkpolicies/tiny-cpu-g0"),
        format!("{APPS}/deployments/tiny-router"),
    ] {
        let (uri, body) = api.expect("PATCH", &path, Reply::Echo).await;
        assert!(
            uri.contains("fieldManager=deepseek-operator") && uri.contains("force=true"),
            "{uri}"
        );
        applied.push(body);
    }
    applied
}

async fn events(api: &mut FakeApi, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(
            api.expect(
                "POST",
                &format!("/apis/events.k8s.io/v1{NS}/events"),
                Reply::Echo,
            )
            .await
            .1,
        );
    }
    out
}

async fn status_patch(api: &mut FakeApi) -> Value {
    let path =
        format!("/apis/serving.deepseek-operator.io/v1alpha1{NS}/deepseekdeployments/tiny/status");
    let mut merged = serde_json::to_value(tiny()).unwrap();
    let reply = move |patch: &Value| {
        merged["status"] = patch["status"].clone();
        merged
    };
    let (_, body) = api.expect_with("PATCH", &path, reply).await;
    body["status"].clone()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

fn run(
    ctx: &Arc<Context>,
    dsd: DeepSeekDeployment,
) -> tokio::task::JoinHandle<Result<Action, Error>> {
    tokio::spawn(controller::reconcile(Arc::new(dsd), ctx.clone()))
}

#[tokio::test]
async fn create_applies_every_object_then_writes_status() {
    let (ctx, mut api) = setup();
    let task = run(&ctx, tiny());
    observe(&mut api, vec![], vec![]).await;
    let applied = applies(&mut api).await;
    assert_eq!(applied[6]["kind"], "StatefulSet");
    assert_eq!(
        applied[6]["metadata"]["ownerReferences"][0]["kind"],
        "DeepSeekDeployment"
    );
    let events = events(&mut api, 2).await;
    assert_eq!(events[0]["reason"], "GroupsNotReady");
    assert_eq!(events[0]["type"], "Normal");
    assert_eq!(events[1]["reason"], "Scaling");
    let status = status_patch(&mut api).await;
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Progressing")["reason"], "Scaling");
    assert_eq!(status["poolSummary"], "cpu:0/1");
    assert_eq!(status["observedGeneration"], 1);
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    api.expect_no_more_calls().await;
}

#[tokio::test]
async fn a_ready_group_patches_status_ready_and_an_unchanged_world_writes_nothing() {
    let (ctx, mut api) = setup();
    let dsd = tiny();
    let pods: Vec<Value> = all_ready_pods(&dsd)
        .into_iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "tiny-cpu-g0", "labels": {"serving.deepseek-operator.io/deployment": "tiny", "serving.deepseek-operator.io/pool": "cpu"}}});
    let router = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "tiny-router"}, "status": {"availableReplicas": 1}});

    let task = run(&ctx, dsd.clone());
    observe_children_with_router(&mut api, vec![sts.clone()], pods.clone(), router.clone()).await;
    model_volume(&mut api).await;
    applies(&mut api).await;
    events(&mut api, 2).await;
    let status = status_patch(&mut api).await;
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Ready")["reason"], "AllGroupsReady");
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );

    // The same world again, with that status stored: applies (idempotent), no event, no status write.
    let mut stored = dsd.clone();
    stored.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, stored);
    observe_children_with_router(&mut api, vec![sts.clone()], pods.clone(), router.clone()).await;
    model_volume(&mut api).await;
    applies(&mut api).await;
    task.await.unwrap().unwrap();
    api.expect_no_more_calls().await;
}

async fn observe_children_with_router(
    api: &mut FakeApi,
    stateful_sets: Vec<Value>,
    pods: Vec<Value>,
    router: Value,
) {
    api.expect(
        "GET",
        &format!("{APPS}/statefulsets?"),
        list("StatefulSetList", stateful_sets),
    )
    .await;
    api.expect("GET", &format!("{CORE}/pods?"), list("PodList", pods))
        .await;
    api.expect(
        "GET",
        &format!("{APPS}/deployments/tiny-router"),
        Reply::Json(router),
    )
    .await;
}

#[tokio::test]
async fn a_conflict_on_apply_fails_the_reconcile_and_backs_off() {
    let (ctx, mut api) = setup();
    let dsd = tiny();
    let task = run(&ctx, dsd.clone());
    observe(&mut api, vec![], vec![]).await;
    api.expect(
        "PATCH",
        &format!("{CORE}/serviceaccounts/tiny-router"),
        Reply::Status(409),
    )
    .await;
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Kube(kube::Error::Api(s)) if s.code == 409),
        "{err}"
    );
    api.expect_no_more_calls().await;

    let dsd = Arc::new(dsd);
    assert_eq!(
        controller::error_policy(dsd.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        controller::error_policy(dsd.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert!(
        ctx.metrics
            .render()
            .contains("deepseek_operator_reconcile_failures_total{error=\"api\"} 2")
    );
    assert_eq!(backoff(30), Duration::from_secs(300));
}

#[tokio::test]
async fn a_missing_model_volume_blocks_without_creating_anything() {
    let (ctx, mut api) = setup();
    let task = run(&ctx, tiny());
    observe_children(&mut api, vec![], vec![]).await;
    api.expect(
        "GET",
        &format!("{CORE}/persistentvolumeclaims/tiny-model"),
        Reply::Status(404),
    )
    .await;
    let events = events(&mut api, 1).await;
    assert_eq!(events[0]["reason"], "ModelVolumeMissing");
    assert_eq!(events[0]["type"], "Warning");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .starts_with("Ready=False, Progressing=False, Degraded=True: spec.model")
    );
    let status = status_patch(&mut api).await;
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ModelVolumeMissing"))
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.model.source.pvc.claimName")
    );
    // no hot loop: wait for a change or the slow resync
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    api.expect_no_more_calls().await;
}

#[test]
fn a_claim_wakes_only_the_deployments_that_read_their_model_from_it() {
    let in_namespace = |name: &str, namespace: &str, claim: &str| {
        let mut dsd = tiny();
        dsd.metadata.name = Some(name.into());
        dsd.metadata.namespace = Some(namespace.into());
        dsd.spec.model.source.pvc.as_mut().unwrap().claim_name = claim.into();
        Arc::new(dsd)
    };
    let deployments = [
        in_namespace("a", "default", "tiny-model"),
        in_namespace("b", "default", "other-model"),
        in_namespace("c", "elsewhere", "tiny-model"),
        in_namespace("d", "default", "tiny-model"),
    ];
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "tiny-model", "namespace": "default"}
    }))
    .unwrap();
    let woken: Vec<String> = controller::claimants(&deployments, &claim)
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(woken, ["a", "d"]);
}

fn with_expert_load() -> DeepSeekDeployment {
    let mut dsd = tiny();
    dsd.spec.parallelism.expert_load_config_map = Some("expert-load".into());
    dsd
}

#[tokio::test]
async fn the_expert_load_config_map_feeds_the_placement_plan() {
    let (ctx, mut api) = setup();
    let task = run(&ctx, with_expert_load());
    let metrics = "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"3\"} 900\n";
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "expert-load"}, "data": {"metrics": metrics}});
    observe_children(&mut api, vec![], vec![]).await;
    api.expect(
        "GET",
        &format!("{CORE}/configmaps/expert-load"),
        Reply::Json(config_map),
    )
    .await;
    model_volume(&mut api).await;
    let applied = applies(&mut api).await;
    let plan = applied[3]["data"]["plan.json"].as_str().unwrap();
    let plan: Value = serde_json::from_str(plan).unwrap();
    assert!(plan["layers"]["1"].is_array(), "a balanced layer 1: {plan}");
    task.abort();
}

#[tokio::test]
async fn a_missing_expert_load_config_map_blocks_naming_the_field() {
    let (ctx, mut api) = setup();
    let task = run(&ctx, with_expert_load());
    observe_children(&mut api, vec![], vec![]).await;
    api.expect(
        "GET",
        &format!("{CORE}/configmaps/expert-load"),
        Reply::Status(404),
    )
    .await;
    let events = events(&mut api, 1).await;
    assert_eq!(events[0]["reason"], "ExpertLoadMissing");
    let status = status_patch(&mut api).await;
    let ready = condition(&status, "Ready");
    assert!(
        ready["message"].as_str().unwrap().starts_with(
            "spec.parallelism.expertLoadConfigMap: ConfigMap \"expert-load\" not found"
        ),
        "{ready}"
    );
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    api.expect_no_more_calls().await;
}

#[tokio::test]
async fn groups_scaled_away_are_deleted_and_old_revision_pods_replaced() {
    let (ctx, mut api) = setup();
    let dsd = tiny();
    let group = |i: i32| json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": format!("tiny-cpu-g{i}"), "labels": {"serving.deepseek-operator.io/deployment": "tiny", "serving.deepseek-operator.io/pool": "cpu"}}});
    let stale =
        serde_json::to_value(worker_pod(&dsd, "cpu", 0, 0, "0ld0ld0ld0").ready().build()).unwrap();
    let task = run(&ctx, dsd);
    observe(&mut api, vec![group(0), group(1)], vec![stale]).await;
    applies(&mut api).await;
    api.expect(
        "DELETE",
        &format!("{APPS}/statefulsets/tiny-cpu-g1"),
        Reply::Json(json!({"apiVersion": "v1", "kind": "Status", "status": "Success"})),
    )
    .await;
    api.expect(
        "DELETE",
        &format!("{CORE}/services/tiny-cpu-g1"),
        Reply::Status(404),
    )
    .await;
    api.expect(
        "DELETE",
        &format!("/apis/policy/v1{NS}/poddisruptionbudgets/tiny-cpu-g1"),
        Reply::Status(404),
    )
    .await;
    api.expect(
        "DELETE",
        &format!("/apis/networking.k8s.io/v1{NS}/networkpolicies/tiny-cpu-g1"),
        Reply::Status(404),
    )
    .await;
    api.expect(
        "DELETE",
        &format!("{CORE}/pods/tiny-cpu-g0-0"),
        Reply::Json(json!({"apiVersion": "v1", "kind": "Status", "status": "Success"})),
    )
    .await;
    events(&mut api, 2).await;
    let status = status_patch(&mut api).await;
    assert_eq!(condition(&status, "Progressing")["reason"], "RollingOut");
    assert_eq!(status["replicas"], 2);
    task.await.unwrap().unwrap();
    api.expect_no_more_calls().await;
}

#[tokio::test]
async fn deleting_the_resource_leaves_cleanup_to_owner_references() {
    let (ctx, mut api) = setup();
    let mut dsd = tiny();
    dsd.metadata.deletion_timestamp = Some(now());
    let action = run(&ctx, dsd).await.unwrap().unwrap();
    assert_eq!(action, Action::await_change());
    api.expect_no_more_calls().await;
}

#[tokio::test]
async fn leader_election_takes_a_free_lease_and_yields_to_a_live_holder() {
    use deepseek_operator::leader::{self, LeaseConfig};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = FakeApi { handle };
    let config = |identity: &str| LeaseConfig {
        name: "deepseek-operator".into(),
        namespace: "default".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        retry: Duration::from_millis(10),
    };
    let lease_path = format!("/apis/coordination.k8s.io/v1{NS}/leases");
    let (tx, mut leading) = tokio::sync::watch::channel(false);
    let client = Client::new(service, "default");
    let elector = tokio::spawn(leader::run(client.clone(), config("a"), tx));
    api.expect(
        "GET",
        &format!("{lease_path}/deepseek-operator"),
        Reply::Status(404),
    )
    .await;
    let (_, created) = api.expect("POST", &lease_path, Reply::Echo).await;
    assert_eq!(created["spec"]["holderIdentity"], "a");
    tokio::time::timeout(Duration::from_secs(1), leading.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    elector.abort();

    // A second replica sees a's fresh lease and follows without writing.
    let (tx, leading) = tokio::sync::watch::channel(false);
    let elector = tokio::spawn(leader::run(client, config("b"), tx));
    api.expect(
        "GET",
        &format!("{lease_path}/deepseek-operator"),
        Reply::Json(created.clone()),
    )
    .await;
    api.expect(
        "GET",
        &format!("{lease_path}/deepseek-operator"),
        Reply::Json(created),
    )
    .await;
    assert!(!*leading.borrow());
    elector.abort();
}

#[tokio::test]
async fn an_unknown_gpu_product_is_reported_without_creating_anything() {
    let (ctx, mut api) = setup();
    let mut dsd = tiny();
    dsd.spec.pools[0].gpu_product = Some("NVIDIA-V100-SXM2-16GB".into());
    let task = run(&ctx, dsd);
    observe_children(&mut api, vec![], vec![]).await;
    let events = events(&mut api, 1).await;
    assert_eq!(
        (events[0]["reason"].as_str(), events[0]["type"].as_str()),
        (Some("UnknownGpuProduct"), Some("Warning"))
    );
    let status = status_patch(&mut api).await;
    let ready = condition(&status, "Ready");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.pools[cpu].gpuProduct: unknown GPU product")
    );
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    api.expect_no_more_calls().await;
}

#[tokio::test]
async fn a_pool_the_model_does_not_fit_is_refused_with_its_numbers() {
    let (ctx, mut api) = setup();
    // DeepSeek-V3 in groups of 8 H100s: the experts leave no room for a KV cache.
    let mut dsd = tiny();
    dsd.spec.model.architecture = v3().spec.model.architecture;
    dsd.spec.model.routed_experts = None;
    dsd.spec.worker.max_batch_tokens = Some(4096);
    let pool = &mut dsd.spec.pools[0];
    pool.name = "h100".into();
    pool.gpu_product = Some("NVIDIA-H100-80GB-HBM3".into());
    (pool.gpus_per_pod, pool.pods_per_group) = (8, Some(1));
    let task = run(&ctx, dsd);
    observe_children(&mut api, vec![], vec![]).await;
    let events = events(&mut api, 1).await;
    assert_eq!(
        (events[0]["reason"].as_str(), events[0]["type"].as_str()),
        (Some("InsufficientGpuMemory"), Some("Warning"))
    );
    let status = status_patch(&mut api).await;
    let message = condition(&status, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_string();
    for says in [
        "spec.pools[h100]: the model does not fit a rank's NVIDIA-H100-80GB-HBM3",
        "76.1 GiB experts (32 per layer)",
        "KV cache 0 tokens",
        "a pass needs 4096 tokens",
    ] {
        assert!(message.contains(says), "{says:?} not in {message}");
    }
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    api.expect_no_more_calls().await;
}
