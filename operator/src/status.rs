//! Pure status and rollout logic: what the operator observed in, status and actions out.
//!
//! A group counts as ready only when every one of its ranks is Ready *and* runs the pool's
//! current revision; a half-started or half-updated group is not.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::api::{DeepSeekDeployment, DeepSeekDeploymentStatus, PoolStatus};
use crate::desired::{Desired, ModelMount};
use crate::model_cache::{MODEL_READY, ModelState};
use crate::names::*;
use crate::resolve::{self, ResolvedPool};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the controller read from the cluster for one deployment.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Worker StatefulSets (one per group).
    pub stateful_sets: Vec<StatefulSet>,
    /// Worker and router pods.
    pub pods: Vec<Pod>,
    pub router: Option<Deployment>,
    /// The model cache of a `huggingFace` source, as read (`model_cache::state`).
    pub model: Option<ModelState>,
    /// The pools found full, as `full_pools` reads the pods.
    pub full_pools: BTreeMap<String, FullPool>,
}

/// Why the deployment cannot be realised right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

/// Container states that will not resolve without a change from the user.
const FAILING_WAIT_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// The status to write, given the desired state (or why there is none) and what exists.
pub fn compute(
    dsd: &DeepSeekDeployment,
    desired: Result<&Desired, &Blocked>,
    observed: &Observed,
    now: &Time,
) -> DeepSeekDeploymentStatus {
    let name = dsd.name_any();
    let generation = dsd.metadata.generation.unwrap_or_default();
    let previous = dsd
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition =
        |type_: &str, verdict: Verdict| make_condition(previous, type_, verdict, generation, now);
    let mut status = DeepSeekDeploymentStatus {
        observed_generation: generation,
        selector: selector_string(&workers_selector(&name)),
        replicas: observed.stateful_sets.len() as i32,
        endpoints: Some(dsd.endpoints()),
        // The autoscaler's own record, kept as it wrote it while autoscaling is on.
        autoscaling: dsd
            .spec
            .autoscaling
            .as_ref()
            .and(dsd.status.as_ref())
            .and_then(|s| s.autoscaling.clone()),
        ..Default::default()
    };

    let desired = match desired {
        Ok(desired) => desired,
        Err(blocked) => {
            let verdict = |value| Verdict::new(value, blocked.reason, blocked.message.clone());
            status.conditions = vec![
                condition(READY, verdict(false)),
                condition(PROGRESSING, verdict(false)),
                condition(DEGRADED, verdict(true)),
            ];
            return status;
        }
    };

    let full = &observed.full_pools;
    status.pools = desired
        .pools
        .iter()
        .map(|(pool, revision)| PoolStatus {
            full_at: full.get(&pool.name).map(|f| f.groups),
            full_since: full.get(&pool.name).map(|f| f.since.clone()),
            ..pool_status(pool, revision, &observed.pods)
        })
        .collect();
    status.ready_replicas = status.pools.iter().map(|p| p.ready_replicas).sum();
    status.pool_summary = pool_summary(&status.pools);

    let wanted: i32 = status.pools.iter().map(|p| p.replicas).sum();
    let lagging = lagging_pools(&status.pools);
    let router_ready = router_ready(dsd, observed.router.as_ref());
    let mut ready = ready_verdict(dsd, wanted, &lagging, router_ready);
    let rolling_out = rolling_out(desired, &observed.pods);
    let mut progressing = progressing_verdict(rolling_out, status.replicas, wanted, &lagging);
    let mut degraded = degraded_verdict(&failing_pods(&observed.pods));
    let model = observed.model.as_ref();
    if let Some(model) = model {
        status.model = Some(model.status.clone());
        if model.mount == ModelMount::NotYet {
            ready = Verdict::new(
                false,
                model.ready.reason.clone(),
                format!(
                    "groups start once the model is downloaded: {}",
                    model.ready.message
                ),
            );
        }
        if !model.ready.status && !rolling_out {
            progressing = Verdict::new(
                true,
                model.ready.reason.clone(),
                model.ready.message.clone(),
            );
        }
        if model.failed {
            degraded = model.ready.clone();
            degraded.status = true;
        }
    }
    status.conditions = vec![
        condition(READY, ready),
        condition(PROGRESSING, progressing),
        condition(DEGRADED, degraded),
    ];
    if let Some(model) = model {
        status
            .conditions
            .push(condition(MODEL_READY, model.ready.clone()));
    }
    status
}

/// A condition's status, reason and message; [`make_condition`] adds the bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    pub fn new(status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Verdict {
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// `pool:ready/wanted` for every pool, space-separated (the printer column).
fn pool_summary(pools: &[PoolStatus]) -> String {
    pools
        .iter()
        .map(|p| format!("{}:{}/{}", p.name, p.ready_replicas, p.replicas))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line for every pool with fewer ready groups than it wants.
fn lagging_pools(pools: &[PoolStatus]) -> Vec<String> {
    pools
        .iter()
        .filter(|p| p.ready_replicas < p.replicas)
        .map(|p| {
            format!(
                "{}: {}/{} groups ready on revision {}",
                p.name, p.ready_replicas, p.replicas, p.revision
            )
        })
        .collect()
}

/// Ready when every wanted group is ready and the router can reach them; at zero groups,
/// only when the router holds requests while a group starts (autoscaling to zero).
fn ready_verdict(
    dsd: &DeepSeekDeployment,
    wanted: i32,
    lagging: &[String],
    router_ready: bool,
) -> Verdict {
    let holds_requests = dsd
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.scale_to_zero_after_seconds.is_some());
    if wanted == 0 && !holds_requests {
        Verdict::new(
            false,
            "ScaledToZero",
            "no expert-parallel groups are requested",
        )
    } else if !lagging.is_empty() {
        Verdict::new(false, "GroupsNotReady", lagging.join("; "))
    } else if !router_ready {
        let router = router_name(&dsd.name_any());
        Verdict::new(
            false,
            "RouterNotReady",
            format!("router {router} has no available replica"),
        )
    } else if wanted == 0 {
        Verdict::new(
            true,
            "ScaledToZero",
            "no group runs: the router holds the next request while one starts",
        )
    } else {
        Verdict::new(
            true,
            "AllGroupsReady",
            format!("{wanted} of {wanted} groups ready on the current revision"),
        )
    }
}

/// How long a pool stays full before its groups are tried again.
pub const FULL_FOR_SECONDS: i64 = 600;

/// How long past its deletion time (its grace period's end) a terminating pod still counts
/// as holding its node: the kubelet's last steps, not a lost node's forever.
const TERMINATING_MARGIN_SECONDS: i64 = 30;

/// A pool found full.
#[derive(Clone, Debug, PartialEq)]
pub struct FullPool {
    /// The groups it holds.
    pub groups: i32,
    pub since: Time,
}

/// The pools that count as full, by name. With `spec.replicas`, a pool is full when every
/// pod of its groups the scheduler has not placed has been unschedulable for
/// `spec.spillAfterSeconds`: at the groups its placed pods make, whichever groups they belong to (groups start all their pods at once, so the
/// scheduler may place some of every group; the groups beyond are removed and free their
/// pods' nodes for the others). It stays full (as `status.pools[].fullAt` remembers) for
/// `FULL_FOR_SECONDS`, then its groups are tried again, so nodes added later are used.
pub fn full_pools(
    dsd: &DeepSeekDeployment,
    pods: &[Pod],
    now: &Time,
) -> BTreeMap<String, FullPool> {
    let mut full = BTreeMap::new();
    // A spec that does not resolve is refused anyway; pools with their own counts never spill.
    let (Some(_), Ok(pools)) = (dsd.spec.replicas, resolve::resolve(dsd, &BTreeMap::new())) else {
        return full;
    };
    let seconds_since = |t: &Time| now.0.as_second() - t.0.as_second();
    let previous = dsd
        .status
        .as_ref()
        .map(|s| s.pools.as_slice())
        .unwrap_or_default();
    for pool in &pools {
        let remembered = previous.iter().find(|p| p.name == pool.name).and_then(|p| {
            Some(FullPool {
                groups: p.full_at?,
                since: p.full_since.clone()?,
            })
        });
        if let Some(remembered) = remembered.filter(|f| seconds_since(&f.since) < FULL_FOR_SECONDS)
        {
            full.insert(pool.name.clone(), remembered);
            continue;
        }
        let of_pool = pods
            .iter()
            .filter(|p| p.labels().get(LABEL_POOL) == Some(&pool.name));
        // Full once the scheduler has tried every pod it has not placed, and found no node
        // for any of them for spillAfterSeconds: until then the count of placed pods may
        // still grow. Placed pods count while they terminate within their grace period:
        // they hold their nodes until gone, then free them for the waiting pods of the
        // groups kept. (Not counting them made a reconcile that read a status from before
        // `fullAt` was written find the pool full again, at fewer groups, while the groups
        // beyond were being removed.) One stuck past it (a lost node) holds nothing usable.
        let (mut placed, mut waiting, mut stuck) = (0, 0, 0);
        for pod in of_pool {
            if pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                let gone_by = pod.metadata.deletion_timestamp.as_ref();
                placed += i32::from(gone_by.is_none_or(|t| {
                    now.0.as_second() < t.0.as_second() + TERMINATING_MARGIN_SECONDS
                }));
                continue;
            }
            if terminating(pod) {
                continue;
            }
            waiting += 1;
            stuck += i32::from(
                unschedulable_for(pod, now)
                    .is_some_and(|waited| waited >= i64::from(dsd.spec.spill_after_seconds)),
            );
        }
        if waiting > 0 && stuck == waiting {
            let groups = placed / pool.pods_per_group.max(1);
            let since = now.clone();
            full.insert(pool.name.clone(), FullPool { groups, since });
        }
    }
    full
}

/// Seconds the pod has waited for a node, if the scheduler found none (0 when it does not
/// say since when).
fn unschedulable_for(pod: &Pod, now: &Time) -> Option<i64> {
    let condition = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(
        condition
            .last_transition_time
            .as_ref()
            .map_or(0, |since| now.0.as_second() - since.0.as_second()),
    )
}

/// Whether any live pod of a wanted group runs another revision than its pool's.
fn rolling_out(desired: &Desired, pods: &[Pod]) -> bool {
    desired.pools.iter().any(|(pool, revision)| {
        (0..pool.replicas).any(|group| {
            group_pods(pods, &pool.name, group)
                .any(|p| !terminating(p) && revision_of(p) != Some(revision))
        })
    })
}

/// Progressing while a rollout, a scale or a start is under way; the rollout reason wins.
fn progressing_verdict(
    rolling_out: bool,
    replicas: i32,
    wanted: i32,
    lagging: &[String],
) -> Verdict {
    if rolling_out {
        Verdict::new(
            true,
            "RollingOut",
            "replacing groups that run an old revision, one per pool at a time",
        )
    } else if replicas != wanted {
        Verdict::new(
            true,
            "Scaling",
            format!("{replicas} groups exist, {wanted} wanted"),
        )
    } else if !lagging.is_empty() {
        Verdict::new(true, "GroupsStarting", lagging.join("; "))
    } else {
        Verdict::new(false, "Complete", "every group runs the current revision")
    }
}

/// Degraded by the first failing pod's reason, naming at most three of them.
fn degraded_verdict(failures: &[(String, String, String)]) -> Verdict {
    match failures.first() {
        Some((_, reason, _)) => Verdict::new(
            true,
            reason.as_str(),
            failures
                .iter()
                .take(3)
                .map(|(pod, reason, msg)| format!("pod {pod}: {reason}: {msg}"))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None => Verdict::new(false, "AsExpected", "no failing pods"),
    }
}

fn pool_status(pool: &ResolvedPool, revision: &str, pods: &[Pod]) -> PoolStatus {
    let mut ready_replicas = 0;
    let mut updated_replicas = 0;
    for group in 0..pool.replicas {
        let ranks: Vec<&Pod> = group_pods(pods, &pool.name, group)
            .filter(|p| !terminating(p))
            .collect();
        let current: Vec<&&Pod> = ranks
            .iter()
            .filter(|p| revision_of(p) == Some(revision))
            .collect();
        if current.len() as i32 >= pool.pods_per_group && current.len() == ranks.len() {
            updated_replicas += 1;
            if current.iter().all(|p| pod_ready(p)) {
                ready_replicas += 1;
            }
        }
    }
    PoolStatus {
        name: pool.name.clone(),
        replicas: pool.replicas,
        ready_replicas,
        updated_replicas,
        revision: revision.to_string(),
        ..Default::default()
    }
}

/// Pods of old revisions to delete now so that their StatefulSets recreate them on the
/// current one, group by group as `groups_to_replace` says.
pub fn pods_to_replace(desired: &Desired, pods: &[Pod]) -> Vec<String> {
    let pools: Vec<Vec<(Vec<&Pod>, GroupState)>> = desired
        .pools
        .iter()
        .map(|(pool, revision)| {
            (0..pool.replicas)
                .map(|group| {
                    let ranks: Vec<&Pod> = group_pods(pods, &pool.name, group).collect();
                    let serving = ranks.len() as i32 >= pool.pods_per_group
                        && ranks.iter().all(|p| !terminating(p) && pod_ready(p));
                    let stale: Vec<&Pod> = ranks
                        .into_iter()
                        .filter(|p| !terminating(p) && revision_of(p) != Some(revision.as_str()))
                        .collect();
                    let outdated = !stale.is_empty();
                    (stale, GroupState { serving, outdated })
                })
                .collect()
        })
        .collect();
    let states: Vec<Vec<GroupState>> = pools
        .iter()
        .map(|groups| groups.iter().map(|(_, state)| *state).collect())
        .collect();
    groups_to_replace(&states)
        .into_iter()
        .flat_map(|(pool, group)| pools[pool][group].0.iter().map(|p| p.name_any()))
        .collect()
}

/// A group as a rollout sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupState {
    /// Every rank up and ready.
    pub serving: bool,
    /// Some rank runs an old revision.
    pub outdated: bool,
}

/// The outdated groups to replace now, as (pool, group) indices. Groups that do not serve
/// anyway go at once. A serving group goes only while every other group of its pool serves
/// (one per pool at a time) and another group of the deployment keeps serving, unless it is
/// the deployment's only group: a deployment never loses its last serving group to a rollout
/// it could have waited for.
pub fn groups_to_replace(pools: &[Vec<GroupState>]) -> Vec<(usize, usize)> {
    let groups = pools.iter().map(Vec::len).sum::<usize>();
    let mut serving = pools.iter().flatten().filter(|g| g.serving).count();
    let mut out = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        let mut pool_disrupted = pool.iter().any(|g| !g.serving);
        for (i, group) in pool.iter().enumerate() {
            if !group.outdated {
                continue;
            }
            if group.serving {
                if pool_disrupted || (serving < 2 && groups > 1) {
                    continue;
                }
                pool_disrupted = true;
                serving -= 1;
            }
            out.push((p, i));
        }
    }
    out
}

/// `(pod, reason, message)` for every pod that is stuck in a way that needs a human.
pub fn failing_pods(pods: &[Pod]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    // A download attempt's failure is the Job's to retry; `ModelReady` reports it.
    let serving = pods.iter().filter(|p| {
        p.labels()
            .get("app.kubernetes.io/component")
            .map(String::as_str)
            != Some(COMPONENT_MODEL_CACHE)
    });
    for pod in serving {
        let Some(status) = &pod.status else { continue };
        if status.phase.as_deref() == Some("Failed") {
            let reason = status.reason.clone().unwrap_or_else(|| "PodFailed".into());
            out.push((
                pod.name_any(),
                reason,
                status.message.clone().unwrap_or_default(),
            ));
            continue;
        }
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        let waiting = containers
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref().map(|w| (c, w)))
            .find(|(_, w)| FAILING_WAIT_REASONS.contains(&w.reason.as_deref().unwrap_or_default()));
        if let Some((container, waiting)) = waiting {
            let mut message = format!(
                "container {}: {}",
                container.name,
                waiting.message.clone().unwrap_or_default()
            );
            // Why the last run ended: the worker's termination message (a failed preflight,
            // a model that cannot load).
            let last_exit = container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref());
            if let Some(said) = last_exit.and_then(|t| t.message.as_deref()) {
                message.push_str(&format!("; last exit: {}", said.trim()));
            }
            out.push((
                pod.name_any(),
                waiting.reason.clone().unwrap_or_default(),
                message,
            ));
            continue;
        }
        let unschedulable = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(c) = unschedulable {
            out.push((
                pod.name_any(),
                "Unschedulable".into(),
                c.message.clone().unwrap_or_default(),
            ));
        }
    }
    out
}

fn router_ready(dsd: &DeepSeekDeployment, router: Option<&Deployment>) -> bool {
    if dsd.spec.router.replicas == 0 {
        return true;
    }
    router
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        > 0
}

fn group_pods<'a>(pods: &'a [Pod], pool: &'a str, group: i32) -> impl Iterator<Item = &'a Pod> {
    let group = group.to_string();
    pods.iter().filter(move |p| {
        let labels = p.labels();
        labels.get(LABEL_POOL).map(String::as_str) == Some(pool)
            && labels.get(LABEL_GROUP) == Some(&group)
    })
}

fn revision_of(pod: &Pod) -> Option<&str> {
    pod.labels().get(LABEL_REVISION).map(String::as_str)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A condition that keeps its previous transition time unless its status flips.
fn make_condition(
    previous: &[Condition],
    type_: &str,
    Verdict {
        status,
        reason,
        message,
    }: Verdict,
    generation: i64,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason,
        message,
        observed_generation: Some(generation),
        last_transition_time,
    }
}

/// Conditions whose status or reason changed, grouped by reason in condition order. On the
/// first status, "not degraded" is not news and is left out.
pub fn events<'a>(
    old: Option<&DeepSeekDeploymentStatus>,
    new: &'a DeepSeekDeploymentStatus,
) -> Vec<(&'a str, Vec<&'a Condition>)> {
    let before: BTreeMap<&str, (&str, &str)> = old
        .map(|s| {
            s.conditions
                .iter()
                .map(|c| (c.type_.as_str(), (c.status.as_str(), c.reason.as_str())))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<(&str, Vec<&Condition>)> = Vec::new();
    for condition in &new.conditions {
        let unchanged = before.get(condition.type_.as_str())
            == Some(&(condition.status.as_str(), condition.reason.as_str()));
        let first_healthy =
            old.is_none() && condition.type_ == DEGRADED && condition.status == "False";
        if unchanged || first_healthy {
            continue;
        }
        match out
            .iter_mut()
            .find(|(reason, _)| *reason == condition.reason)
        {
            Some((_, group)) => group.push(condition),
            None => out.push((condition.reason.as_str(), vec![condition])),
        }
    }
    out
}
