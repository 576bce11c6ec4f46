//! The controller: thin I/O around `desired()` and `status::compute()`.
//!
//! One reconciliation reads what exists (group StatefulSets, pods, the router Deployment,
//! the model PVC), applies the desired objects with server-side apply under one field
//! manager, deletes groups that are no longer wanted, replaces old-revision groups one per
//! pool at a time, and writes status. Owner references make deletion of the custom resource
//! remove everything, so no finalizer is needed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepseek_proto::placement::expert_load_from_metrics;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{DeepSeekDeployment, DeepSeekDeploymentStatus};
use crate::desired::{Desired, ExpertLoad, ModelMount, Surroundings};
pub use crate::error::Error;
use crate::metrics::Metrics;
use crate::model_cache::{self, Caches};
use crate::names::*;
use crate::resolve;
use crate::status::{self, Blocked, Observed};
use crate::worker_ca;

/// What reconciliations share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DeepSeekDeployment>, u32>>,
    /// Whose pods may scrape worker metrics when a spec does not say.
    pub metrics_namespace: Option<String>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: String) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::default(),
            metrics_namespace: None,
        }
    }
}

/// Requeue intervals. Watches on owned objects and pods trigger reconciles on every change,
/// so these only bound how stale status can get.
const RESYNC: Duration = Duration::from_secs(300);
const NOT_READY_RESYNC: Duration = Duration::from_secs(30);
/// How often a running download's progress is read into status.
const DOWNLOAD_RESYNC: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Runs the controller until the stream ends (it does not, short of a shutdown signal).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let controller = Controller::new(
        api::<DeepSeekDeployment>(&client, &namespace),
        watcher::Config::default(),
    );
    let deployments = controller.store();
    controller
        // A deployment blocked on its model volume starts as soon as the claim appears.
        .watches(
            api::<PersistentVolumeClaim>(&client, &namespace),
            watcher::Config::default(),
            move |claim: PersistentVolumeClaim| claimants(&deployments.state(), &claim),
        )
        .owns(api::<StatefulSet>(&client, &namespace), managed.clone())
        .owns(api::<Deployment>(&client, &namespace), managed.clone())
        .owns(api::<Service>(&client, &namespace), managed.clone())
        .owns(api::<ConfigMap>(&client, &namespace), managed.clone())
        .owns(api::<Job>(&client, &namespace), managed.clone())
        // Pods belong to the StatefulSets; map them back to their deployment by label so
        // readiness changes update status at once.
        .watches(api::<Pod>(&client, &namespace), managed, |pod: Pod| {
            let deployment = pod.labels().get(LABEL_DEPLOYMENT)?.clone();
            Some(ObjectRef::new(&deployment).within(&pod.namespace()?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile stream error");
            }
        })
        .await;
}

/// The deployments in the claim's namespace whose model comes from that claim.
pub fn claimants(
    deployments: &[Arc<DeepSeekDeployment>],
    claim: &PersistentVolumeClaim,
) -> Vec<ObjectRef<DeepSeekDeployment>> {
    deployments
        .iter()
        .filter(|dsd| {
            dsd.namespace() == claim.namespace()
                && dsd.spec.model.source.pvc.as_ref().map(|p| &p.claim_name)
                    == claim.metadata.name.as_ref()
        })
        .map(|dsd| ObjectRef::from(dsd.as_ref()))
        .collect()
}

#[tracing::instrument(skip_all, fields(deployment = %dsd.name_any(), namespace = ?dsd.namespace()))]
pub async fn reconcile(dsd: Arc<DeepSeekDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    let name = dsd.name_any();
    let ns = dsd
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(name.clone()))?;
    if dsd.metadata.deletion_timestamp.is_some() {
        // Garbage collection follows the owner references.
        return Ok(Action::await_change());
    }
    let mut observed = observe(&ctx.client, &ns, &name).await?;
    let caches = match dsd.spec.model.source.hugging_face {
        Some(_) => observe_caches(&ctx.client, &dsd, &ns, &observed.pods).await?,
        None => Caches::default(),
    };
    observed.model = model_cache::state(&dsd, &caches, &observed.stateful_sets, &observed.pods);
    let model_mount = observed
        .model
        .as_ref()
        .map_or(ModelMount::Wanted, |m| m.mount.clone());
    let now = Time(Timestamp::now());
    observed.full_pools = status::full_pools(&dsd, &observed.pods, &now);
    let full_pools = (observed.full_pools.iter())
        .map(|(pool, full)| (pool.clone(), full.groups))
        .collect();
    let desired = match expert_load(&ctx.client, &dsd, &ns).await? {
        Err(blocked) => Err(blocked),
        Ok(expert_load) => match dsd.desired_in(&Surroundings {
            expert_load,
            metrics_namespace: ctx.metrics_namespace.clone(),
            full_pools,
            model_mount,
        }) {
            Ok(desired) => model_volume_present(&ctx.client, &dsd, &ns)
                .await?
                .map(|()| desired),
            Err(err) => Err(Blocked {
                reason: err.reason(),
                message: err.to_string(),
            }),
        },
    };
    let worker_ca = match &dsd.spec.worker_tls {
        Some(tls) if tls.operator_ca() => Some(keep_worker_ca(&ctx.client, &dsd, &ns).await?),
        _ => None,
    };
    let worker_ca_due = worker_ca
        .as_ref()
        .and_then(|due| due.as_ref().ok().copied());
    let desired = match worker_ca {
        Some(Err(blocked)) => Err(blocked),
        _ => desired,
    };
    if let Ok(desired) = &desired {
        if let Some(cache) = &desired.model_cache {
            create_unless_listed(&ctx.client, &ns, &cache.claim, &caches.claims).await?;
            create_unless_listed(&ctx.client, &ns, &cache.job, &caches.jobs).await?;
        }
        apply_all(&ctx.client, &ns, desired).await?;
        if !desired.groups_wait_for_model {
            prune(&ctx.client, &ns, desired, &observed).await?;
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            for pod in status::pods_to_replace(desired, &observed.pods) {
                tracing::info!(%pod, "replacing pod of an old revision");
                delete_ignoring_missing(&pods, &pod).await?;
            }
        }
        for cache in observed.model.iter().flat_map(|m| &m.stale) {
            tracing::info!(%cache, "deleting the model cache of a revision no group uses");
            delete_ignoring_missing(&Api::<Job>::namespaced(ctx.client.clone(), &ns), cache)
                .await?;
            delete_ignoring_missing(
                &Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns),
                cache,
            )
            .await?;
        }
    }

    let status = status::compute(&dsd, desired.as_ref(), &observed, &now);
    publish_transitions(&ctx, &dsd, &status).await;
    if dsd.status.as_ref() != Some(&status) {
        let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    ctx.failures
        .lock()
        .expect("not poisoned")
        .remove(&ObjectRef::from(dsd.as_ref()));
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True");
    let downloading = observed
        .model
        .as_ref()
        .is_some_and(|m| !m.ready.status && !m.failed);
    let resync = match desired {
        // Nothing will change until the spec (or the PVC) does; do not spin.
        Err(_) => RESYNC,
        Ok(_) if downloading => DOWNLOAD_RESYNC,
        Ok(_) if ready => RESYNC,
        Ok(_) => NOT_READY_RESYNC,
    };
    Ok(Action::requeue(
        worker_ca_due.map_or(resync, |due| due.min(resync)),
    ))
}

pub fn error_policy(dsd: Arc<DeepSeekDeployment>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(err.metric_label());
    let mut failures = ctx.failures.lock().expect("not poisoned");
    let count = failures.entry(ObjectRef::from(dsd.as_ref())).or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(deployment = %dsd.name_any(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// 5 s, 10 s, 20 s, … capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The measured expert load `spec.parallelism.expertLoadConfigMap` names (none when unset).
async fn expert_load(
    client: &Client,
    dsd: &DeepSeekDeployment,
    ns: &str,
) -> Result<Result<ExpertLoad, Blocked>, Error> {
    let Some(name) = &dsd.spec.parallelism.expert_load_config_map else {
        return Ok(Ok(ExpertLoad::new()));
    };
    let field = "spec.parallelism.expertLoadConfigMap";
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let Some(config_map) = api.get_opt(name).await? else {
        return Ok(Err(Blocked {
            reason: "ExpertLoadMissing",
            message: format!("{field}: ConfigMap {name:?} not found in namespace {ns}"),
        }));
    };
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(EXPERT_LOAD_ENTRY))
        .map_or("", String::as_str);
    let experts = match resolve::routed_experts(dsd) {
        Ok(experts) => experts as usize,
        // desired() reports the spec error itself.
        Err(_) => return Ok(Ok(ExpertLoad::new())),
    };
    Ok(
        expert_load_from_metrics([text], experts).map_err(|e| Blocked {
            reason: "ExpertLoadInvalid",
            message: format!("{field}: ConfigMap {name:?}, entry {EXPERT_LOAD_ENTRY:?}: {e}"),
        }),
    )
}

async fn model_volume_present(
    client: &Client,
    dsd: &DeepSeekDeployment,
    ns: &str,
) -> Result<Result<(), Blocked>, Error> {
    let Some(pvc) = &dsd.spec.model.source.pvc else {
        return Ok(Ok(()));
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    Ok(match api.get_opt(&pvc.claim_name).await? {
        Some(_) => Ok(()),
        None => Err(Blocked {
            reason: "ModelVolumeMissing",
            message: format!(
                "spec.model.source.pvc.claimName: PersistentVolumeClaim {:?} not found in namespace {ns}",
                pvc.claim_name
            ),
        }),
    })
}

/// The deployment's download Jobs and cache claims, and the running download's progress
/// from the tail of its log (a log that cannot be read is only logged).
async fn observe_caches(
    client: &Client,
    dsd: &DeepSeekDeployment,
    ns: &str,
    pods: &[Pod],
) -> Result<Caches, Error> {
    let caches =
        ListParams::default().labels(&selector_string(&model_cache_selector(&dsd.name_any())));
    let jobs = list(client, ns, &caches).await?;
    let claims = list(client, ns, &caches).await?;
    let mut progress = None;
    if let Some(pod) = model_cache::running_download_pod(dsd, pods) {
        let params = LogParams {
            tail_lines: Some(8),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(client.clone(), ns)
            .logs(&pod.name_any(), &params)
            .await
        {
            Ok(log) => progress = model_cache::last_progress(&log),
            Err(err) => {
                tracing::debug!(pod = %pod.name_any(), error = %err, "reading the download's progress")
            }
        }
    }
    Ok(Caches {
        jobs,
        claims,
        progress,
    })
}

/// Creates the object unless `listed` (what the controller read) has one of its name: a
/// model cache claim or download Job is never changed once made. One of that name the list
/// did not show (a claim the user made, unlabelled) is adopted as it is.
async fn create_unless_listed<K: Namespaced>(
    client: &Client,
    ns: &str,
    object: &K,
    listed: &[K],
) -> Result<(), Error> {
    let name = object.name_any();
    if listed.iter().any(|o| o.name_any() == name) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.create(&PostParams::default(), object).await {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        result => result.map(drop).map_err(Error::from),
    }
}

/// Keeps the deployment's worker CA and the Secret the pods mount (`worker_ca::plan`, one
/// step a pass); returns how long until the next step is due, or why it cannot.
async fn keep_worker_ca(
    client: &Client,
    dsd: &DeepSeekDeployment,
    ns: &str,
) -> Result<Result<Duration, Blocked>, Error> {
    match keep_worker_ca_steps(client, dsd, ns).await {
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 403 => Ok(Err(Blocked {
            reason: "WorkerCaForbidden",
            message: format!(
                "spec.workerTls: the operator may not read and write Secrets in namespace \
                 {ns} (installed with workerCa.enabled=false): name a Secret of yours in \
                 spec.workerTls.secretName, or grant it ({})",
                status.message
            ),
        })),
        result => result.map(Ok),
    }
}

async fn keep_worker_ca_steps(
    client: &Client,
    dsd: &DeepSeekDeployment,
    ns: &str,
) -> Result<Duration, Error> {
    let name = dsd.name_any();
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let owner = dsd.controller_owner_ref(&());
    // A first CA takes two steps (keep, publish) before it waits.
    for _ in 0..3 {
        let kept = api.get_opt(&worker_ca_secret_name(&name)).await?;
        let shown = api.get_opt(&worker_tls_secret_name(&name)).await?;
        let authority = kept.as_ref().and_then(worker_ca::authority_from);
        let published = shown.as_ref().and_then(worker_ca::published_from);
        let now = Timestamp::now().as_second();
        let plan = worker_ca::plan(
            &name,
            authority.as_ref(),
            published.as_ref().map(|(p, at)| (p, *at)),
            now,
            worker_ca::LIFETIMES,
        )
        .map_err(|source| Error::WorkerCa {
            secret: worker_ca_secret_name(&name),
            source,
        })?;
        match plan {
            worker_ca::Plan::Keep(authority) => {
                tracing::info!(secret = %worker_ca_secret_name(&name), "keeping a new state of the worker CA");
                let secret = worker_ca::authority_secret(&name, owner.clone(), &authority);
                create_or_replace(&api, kept, secret).await?;
            }
            worker_ca::Plan::Publish(published) => {
                tracing::info!(secret = %worker_tls_secret_name(&name), "publishing the worker certificate and trusted CAs");
                let secret = worker_ca::published_secret(&name, owner.clone(), &published, now);
                create_or_replace(&api, shown, secret).await?;
            }
            worker_ca::Plan::WaitFor(wait) => return Ok(wait),
        }
    }
    // Not settled in three steps (the Secrets changed under it): look again soon.
    Ok(Duration::from_secs(1))
}

/// Creates `object`, or replaces `existing` with it (failing if it changed since read).
async fn create_or_replace<K: Namespaced>(
    api: &Api<K>,
    existing: Option<K>,
    mut object: K,
) -> Result<(), Error> {
    match existing {
        None => api.create(&PostParams::default(), &object).await?,
        Some(existing) => {
            object.meta_mut().resource_version = existing.resource_version();
            api.replace(&existing.name_any(), &PostParams::default(), &object)
                .await?
        }
    };
    Ok(())
}

/// The namespaced kinds the controller lists, creates and applies.
trait Namespaced:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
{
}

impl<K> Namespaced for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
{
}

async fn list<K: Namespaced>(
    client: &Client,
    ns: &str,
    params: &ListParams,
) -> Result<Vec<K>, Error> {
    Ok(Api::<K>::namespaced(client.clone(), ns)
        .list(params)
        .await?
        .items)
}

async fn observe(client: &Client, ns: &str, name: &str) -> Result<Observed, Error> {
    let workers = ListParams::default().labels(&selector_string(&workers_selector(name)));
    let deployment = ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={name}"));
    let stateful_sets = list(client, ns, &workers).await?;
    let pods = list(client, ns, &deployment).await?;
    let router = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&router_name(name))
        .await?;
    Ok(Observed {
        stateful_sets,
        pods,
        router,
        model: None,
        full_pools: BTreeMap::new(),
    })
}

async fn apply_all(client: &Client, ns: &str, desired: &Desired) -> Result<(), Error> {
    apply_each(client, ns, &desired.service_accounts).await?;
    apply_each(client, ns, &desired.roles).await?;
    apply_each(client, ns, &desired.role_bindings).await?;
    apply_each(client, ns, &desired.config_maps).await?;
    apply_each(client, ns, &desired.services).await?;
    apply_each(client, ns, &desired.stateful_sets).await?;
    apply_each(client, ns, &desired.pod_disruption_budgets).await?;
    apply_each(client, ns, &desired.network_policies).await?;
    apply_each(client, ns, &desired.deployments).await?;
    Ok(())
}

async fn apply_each<K: Namespaced>(client: &Client, ns: &str, objects: &[K]) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        api.patch(&object.name_any(), &params, &Patch::Apply(object))
            .await?;
    }
    Ok(())
}

/// Deletes the objects of groups (and pools) that the spec no longer asks for. Each group's
/// objects share the group's name.
async fn prune(
    client: &Client,
    ns: &str,
    desired: &Desired,
    observed: &Observed,
) -> Result<(), Error> {
    let wanted: BTreeSet<String> = desired.stateful_sets.iter().map(|s| s.name_any()).collect();
    let wanted_pools: BTreeSet<&str> = desired.pools.iter().map(|(p, _)| p.name.as_str()).collect();
    let deployment = observed
        .stateful_sets
        .first()
        .and_then(|s| s.labels().get(LABEL_DEPLOYMENT).cloned());
    let mut gone_pools = BTreeSet::new();
    for sts in &observed.stateful_sets {
        let name = sts.name_any();
        if wanted.contains(&name) {
            continue;
        }
        tracing::info!(group = %name, "removing group no longer in the spec");
        delete_ignoring_missing(&Api::<StatefulSet>::namespaced(client.clone(), ns), &name).await?;
        delete_ignoring_missing(&Api::<Service>::namespaced(client.clone(), ns), &name).await?;
        delete_ignoring_missing(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
            &name,
        )
        .await?;
        delete_ignoring_missing(&Api::<NetworkPolicy>::namespaced(client.clone(), ns), &name)
            .await?;
        if let Some(pool) = sts
            .labels()
            .get(LABEL_POOL)
            .filter(|p| !wanted_pools.contains(p.as_str()))
        {
            gone_pools.insert(pool.clone());
        }
    }
    if let Some(deployment) = deployment {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        for pool in gone_pools {
            delete_ignoring_missing(&config_maps, &placement_name(&deployment, &pool)).await?;
        }
    }
    Ok(())
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// One Event per new condition reason, so `kubectl describe` tells the story without
/// repeating itself; Warning only for degradation. Failing to publish is logged, never fatal.
async fn publish_transitions(
    ctx: &Context,
    dsd: &DeepSeekDeployment,
    status: &DeepSeekDeploymentStatus,
) {
    for (reason, conditions) in status::events(dsd.status.as_ref(), status) {
        let degraded = conditions
            .iter()
            .any(|c| c.type_ == status::DEGRADED && c.status == "True");
        let summary = conditions
            .iter()
            .map(|c| format!("{}={}", c.type_, c.status))
            .collect::<Vec<_>>()
            .join(", ");
        let type_ = if degraded {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let note = format!("{summary}: {}", conditions[0].message);
        publish(ctx, dsd, type_, reason, &note, "Reconcile").await;
    }
}

/// Records an Event on the deployment; a failure to is only logged.
pub(crate) async fn publish(
    ctx: &Context,
    dsd: &DeepSeekDeployment,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note, 1024)),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &dsd.object_ref(&())).await {
        tracing::warn!(error = %err, "publishing event failed");
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => text[..i].to_string(),
        None => text.to_string(),
    }
}
