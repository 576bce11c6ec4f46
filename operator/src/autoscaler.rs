//! The built-in autoscaler in the cluster: thin I/O around `autoscale::decide`. Every
//! `SAMPLE_INTERVAL` it reads each autoscaled deployment's load from its router pods'
//! `/metrics`, decides, and writes `spec.replicas` through the scale subresource (as an HPA
//! would), with an Event and `status.autoscaling`; the controller does the rest. It steps
//! aside while a HorizontalPodAutoscaler targets the deployment, so the two never fight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{AutoscalingStatus, DeepSeekDeployment};
use crate::autoscale::{self, RouterLoad, Sample};
use crate::controller::{Context, Error, publish};
use crate::names::{METRICS_PORT, router_selector, selector_string};

/// How often the load is sampled and a decision made.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a router replica may take to give its `/metrics` page.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// The Events' action.
const ACTION: &str = "Autoscale";

/// `status.autoscaling.scaledBy` while the built-in autoscaler decides.
pub const SCALED_BY_OPERATOR: &str = "operator";

/// Runs until the process ends; only the leader runs it.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let api: Api<DeepSeekDeployment> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let clock = Instant::now();
    // Load samples per deployment (by uid), as far back as its windows reach.
    let mut histories: HashMap<String, Vec<Sample>> = HashMap::new();
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        let deployments = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(err) => {
                tracing::warn!(error = %err, "autoscaler: listing deployments failed");
                continue;
            }
        };
        let autoscaled: Vec<&DeepSeekDeployment> = deployments
            .iter()
            .filter(|d| d.spec.autoscaling.is_some() && d.metadata.deletion_timestamp.is_none())
            .collect();
        histories.retain(|uid, _| autoscaled.iter().any(|d| d.uid().as_ref() == Some(uid)));
        for dsd in autoscaled {
            let history = histories.entry(dsd.uid().unwrap_or_default()).or_default();
            let now = clock.elapsed().as_secs_f64();
            if let Err(err) = step(&ctx, dsd, history, now).await {
                tracing::warn!(deployment = %dsd.name_any(), error = %err, "autoscaler step failed");
            }
        }
    }
}

/// One sample and decision for one deployment.
async fn step(
    ctx: &Context,
    dsd: &DeepSeekDeployment,
    history: &mut Vec<Sample>,
    now: f64,
) -> Result<(), Error> {
    let (Some(spec), Some(ns)) = (&dsd.spec.autoscaling, dsd.namespace()) else {
        return Ok(());
    };
    // Pools without a ceiling: the controller reports that spec error by name.
    let Some(bounds) = autoscale::bounds(&dsd.spec.pools) else {
        return Ok(());
    };
    let name = dsd.name_any();
    let previous = dsd.status.as_ref().and_then(|s| s.autoscaling.clone());
    if let Some(hpa) = hpa_targeting(ctx, &ns, &name).await? {
        history.clear();
        let scaled_by = format!("HorizontalPodAutoscaler/{hpa}");
        if previous.as_ref().map(|p| &p.scaled_by) != Some(&scaled_by) {
            let reason =
                format!("{scaled_by} targets this deployment: the built-in autoscaler steps aside");
            publish(
                ctx,
                dsd,
                EventType::Warning,
                "AutoscalerStepsAside",
                &reason,
                ACTION,
            )
            .await;
            let status = AutoscalingStatus {
                scaled_by,
                desired_replicas: None,
                reason,
                last_scale_time: previous.and_then(|p| p.last_scale_time),
            };
            record(ctx, &ns, &name, &status).await?;
        }
        return Ok(());
    }
    let loads = router_loads(ctx, &ns, &name).await?;
    let sample = (!loads.is_empty()).then(|| Sample::of(now, &loads));
    autoscale::remember(history, sample, spec, now);
    let current = dsd
        .spec
        .replicas
        .unwrap_or_else(|| dsd.spec.pools.iter().map(|p| p.replicas).sum());
    let starting = dsd
        .status
        .as_ref()
        .is_some_and(|s| s.ready_replicas < s.replicas);
    let decision = autoscale::decide(spec, bounds, current, history, now, starting);
    if decision.groups == current {
        if previous.is_none_or(|p| p.scaled_by != SCALED_BY_OPERATOR) {
            let status = AutoscalingStatus {
                scaled_by: SCALED_BY_OPERATOR.into(),
                desired_replicas: Some(current),
                reason: decision.reason,
                last_scale_time: None,
            };
            record(ctx, &ns, &name, &status).await?;
        }
        return Ok(());
    }
    let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let scale = serde_json::json!({ "spec": { "replicas": decision.groups } });
    api.patch_scale(&name, &PatchParams::default(), &Patch::Merge(&scale))
        .await?;
    let note = format!(
        "{current} → {} groups: {}",
        decision.groups, decision.reason
    );
    tracing::info!(deployment = %name, "autoscaling {note}");
    publish(ctx, dsd, EventType::Normal, "Scaled", &note, ACTION).await;
    let status = AutoscalingStatus {
        scaled_by: SCALED_BY_OPERATOR.into(),
        desired_replicas: Some(decision.groups),
        reason: decision.reason,
        last_scale_time: Some(Time(Timestamp::now())),
    };
    record(ctx, &ns, &name, &status).await
}

/// The HPA in `ns` whose target is this deployment, if any.
async fn hpa_targeting(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Error> {
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    Ok(hpas
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|hpa| {
            hpa.spec.as_ref().is_some_and(|spec| {
                let target = &spec.scale_target_ref;
                target.kind == "DeepSeekDeployment"
                    && target.name == name
                    && target
                        .api_version
                        .as_deref()
                        .is_some_and(|v| v.starts_with(crate::api::GROUP))
            })
        })
        .map(|hpa| hpa.name_any()))
}

/// The load pages of the deployment's running router pods that answered.
async fn router_loads(ctx: &Context, ns: &str, name: &str) -> Result<Vec<RouterLoad>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = ListParams::default().labels(&selector_string(&router_selector(name)));
    let addresses: Vec<SocketAddr> = pods
        .list(&selector)
        .await?
        .items
        .iter()
        .filter_map(|pod| {
            let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
            Some(SocketAddr::new(ip, METRICS_PORT as u16))
        })
        .collect();
    let pages = futures::future::join_all(addresses.into_iter().map(scrape_metrics)).await;
    Ok(pages
        .into_iter()
        .filter_map(Result::ok)
        .map(|page| RouterLoad::parse(&page))
        .collect())
}

/// The `/metrics` page at `addr` (HTTP/1.1, one request on its own connection).
pub async fn scrape_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(std::io::Error::other(format!(
                "{addr}: no metrics page in the answer"
            ))),
        }
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, get)
        .await
        .map_err(|_| std::io::Error::other(format!("{addr}: no answer")))?
}

async fn record(
    ctx: &Context,
    ns: &str,
    name: &str,
    status: &AutoscalingStatus,
) -> Result<(), Error> {
    let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({ "status": { "autoscaling": status } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
