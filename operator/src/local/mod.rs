//! `deepseek-operator run-local`: a `DeepSeekDeployment` run as processes on this machine.
//!
//! The operator's own builders compute the desired objects; this module reads the processes
//! off them (pure): each pod of each group becomes a `deepseek-worker serve` with its pod
//! template's environment, the cluster-only parts (DNS names, mounts, the pod index) replaced
//! by local ones, and the router Deployment becomes a `deepseek-router` whose backends come
//! from a file instead of EndpointSlices. `rollout` decides, as the controller does, which
//! group to start or retire next. `run` (the I/O) supervises the processes.

pub mod run;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deepseek_proto::placement::PLAN_FILE;
use deepseek_proto::pod::env;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::desired::Desired;
use crate::names::{
    KERNEL_CACHE_DIR, LABEL_POD_INDEX, MODEL_MOUNT, ROUTER_KEYS_DIR, group_name, placement_name,
};
use crate::resolve::{ResolvedPool, SpecError};
use crate::status::{GroupState, groups_to_replace};

/// Why a deployment cannot run here. Each names the field or flag to change.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "the model volume's claim {claim:?} has no local directory; give --pvc {claim}=DIR \
         (for a huggingFace source, DIR/checkpoint holds the checkpoint: \
         `deepseek-worker download --repo OWNER/NAME --dir DIR/checkpoint` fetches it)"
    )]
    UnmappedClaim { claim: String },
    #[error(
        "spec.pools[{pool}]: a group needs {needed} GPUs, {free} of this machine's are free \
         (--gpus says how many it has)"
    )]
    NotEnoughGpus {
        pool: String,
        needed: usize,
        free: usize,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl LocalError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
        let what = what.into();
        move |source| LocalError::Io { what, source }
    }
}

/// Where the pods' volumes are on this machine.
#[derive(Clone, Debug, Default)]
pub struct LocalVolumes {
    /// PersistentVolumeClaim name → directory (`--pvc CLAIM=DIR`).
    pub claims: BTreeMap<String, PathBuf>,
    /// For claims not named: the directory the samples' checkpoints are in.
    pub default_claim_dir: Option<PathBuf>,
    /// The router's keys file, for a deployment whose router reads a Secret.
    pub api_keys_file: Option<PathBuf>,
}

/// A process to supervise: a pod of a group, or the router.
#[derive(Clone, Debug, PartialEq)]
pub struct Process {
    /// `pool/group/rank` (`pool/group/first-last` for a pod of several ranks), or `router`.
    pub label: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where its gRPC health service answers.
    pub grpc: SocketAddr,
    /// Where its Prometheus `/metrics` answers.
    pub metrics: SocketAddr,
    /// How long it may drain after SIGTERM (the pod's `terminationGracePeriodSeconds`).
    pub grace: Duration,
    /// The GPUs it holds (as `CUDA_VISIBLE_DEVICES`, as the device plugin would).
    pub gpus: Vec<u32>,
}

/// One expert-parallel group of a pool, on one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalGroup {
    pub pool: String,
    pub index: i32,
    pub revision: String,
    pub pods: Vec<Process>,
}

/// What a pool should be: the resolved pool and its revision.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolTarget {
    pub pool: ResolvedPool,
    pub revision: String,
}

/// Free ports on this machine, one per call.
pub type Ports<'a> = &'a mut dyn FnMut() -> Result<u16, LocalError>;

/// What a group takes from this machine.
pub struct Host<'a> {
    pub volumes: &'a LocalVolumes,
    /// Holds the pools' placement plans (`plan_path`) and the kernel cache.
    pub run_dir: &'a Path,
    pub ports: Ports<'a>,
    /// GPUs not yet taken; the group takes its own from the front.
    pub free_gpus: &'a mut Vec<u32>,
}

/// The pods of group `group` of `target`, on fresh ports.
pub fn worker_group(
    desired: &Desired,
    deployment: &str,
    target: &PoolTarget,
    group: i32,
    host: &mut Host,
) -> Result<LocalGroup, LocalError> {
    let (run_dir, ports) = (host.run_dir, &mut host.ports);
    let free_gpus = &mut *host.free_gpus;
    let pool = &target.pool;
    let sts_name = group_name(deployment, &pool.name, group);
    let pod = desired
        .stateful_sets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(sts_name.as_str()))
        .and_then(pod_spec)
        .ok_or_else(|| LocalError::Unsupported(format!("no StatefulSet {sts_name}")))?;
    let container = &pod.containers[0];
    let model_dir = model_dir(pod, host.volumes)?;
    let ranks_per_pod = pool.ranks_per_pod as usize;
    let gpus_needed = if pool.gpu_product.is_some() {
        pool.group_size as usize
    } else {
        0
    };
    if gpus_needed > free_gpus.len() {
        return Err(LocalError::NotEnoughGpus {
            pool: pool.name.clone(),
            needed: gpus_needed,
            free: free_gpus.len(),
        });
    }
    let peers = (0..pool.group_size)
        .map(|_| Ok(format!("127.0.0.1:{}", ports()?)))
        .collect::<Result<Vec<_>, LocalError>>()?;
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30) as u64);
    let mut pods = Vec::new();
    for index in 0..pool.pods_per_group as usize {
        let grpc = SocketAddr::from(([127, 0, 0, 1], ports()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], ports()?));
        let first_rank = index * ranks_per_pod;
        let local = LocalPod {
            index,
            peers: &peers,
            grpc,
            metrics,
            model_dir: &model_dir,
            plan: &plan_path(run_dir, &pool.name, &target.revision),
            kernels: &run_dir.join("kernels"),
        };
        let mut env = local_env(container, &local)?;
        // Taken only once nothing else can fail for this pod, so none are lost.
        let gpus: Vec<u32> = if gpus_needed > 0 {
            free_gpus.drain(..ranks_per_pod).collect()
        } else {
            Vec::new()
        };
        if !gpus.is_empty() {
            let visible = gpus.iter().map(u32::to_string).collect::<Vec<_>>();
            env.push(("CUDA_VISIBLE_DEVICES".into(), visible.join(",")));
        }
        let last_rank = first_rank + ranks_per_pod - 1;
        pods.push(Process {
            label: if ranks_per_pod == 1 {
                format!("{}/{group}/{first_rank}", pool.name)
            } else {
                format!("{}/{group}/{first_rank}-{last_rank}", pool.name)
            },
            args: container.args.clone().unwrap_or_default(),
            env,
            grpc,
            metrics,
            grace,
            gpus,
        });
    }
    Ok(LocalGroup {
        pool: pool.name.clone(),
        index: group,
        revision: target.revision.clone(),
        pods,
    })
}

/// Where a pool's placement plan of one revision is written.
pub fn plan_path(run_dir: &Path, pool: &str, revision: &str) -> PathBuf {
    run_dir.join(pool).join(revision).join(PLAN_FILE)
}

/// The placement plan JSON of `pool`, as its ConfigMap holds it.
pub fn plan_json<'a>(desired: &'a Desired, deployment: &str, pool: &str) -> Option<&'a str> {
    let name = placement_name(deployment, pool);
    desired
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
        .and_then(|c| c.data.as_ref()?.get(PLAN_FILE))
        .map(String::as_str)
}

fn pod_spec(sts: &StatefulSet) -> Option<&PodSpec> {
    sts.spec.as_ref()?.template.spec.as_ref()
}

/// The checkpoint's directory on this machine: the model volume's claim, mapped.
fn model_dir(pod: &PodSpec, volumes: &LocalVolumes) -> Result<PathBuf, LocalError> {
    let model = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "model")
        .ok_or_else(|| LocalError::Unsupported("the pod template has no model volume".into()))?;
    let Some(claim) = &model.persistent_volume_claim else {
        return Err(LocalError::Unsupported(
            "the pod template's model volume is not a claim".into(),
        ));
    };
    volumes
        .claims
        .get(&claim.claim_name)
        .or(volumes.default_claim_dir.as_ref())
        .cloned()
        .ok_or_else(|| LocalError::UnmappedClaim {
            claim: claim.claim_name.clone(),
        })
}

/// What differs for one pod on this machine.
struct LocalPod<'a> {
    index: usize,
    peers: &'a [String],
    grpc: SocketAddr,
    metrics: SocketAddr,
    model_dir: &'a Path,
    plan: &'a Path,
    kernels: &'a Path,
}

/// The worker container's environment with its cluster-only values replaced: the pod index
/// (a label there), the peers' DNS names, the listen addresses, and the mounted paths.
fn local_env(container: &Container, pod: &LocalPod) -> Result<Vec<(String, String)>, LocalError> {
    let under_mount = |value: &str, mount: &str, local: &Path| match value
        .strip_prefix(mount)
        .unwrap_or(value)
        .trim_start_matches('/')
    {
        "" => local.display().to_string(),
        rest => local.join(rest).display().to_string(),
    };
    container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let name = var.name.as_str();
            if let Some(from) = &var.value_from {
                let pod_index_label = format!("metadata.labels['{LABEL_POD_INDEX}']");
                return match &from.field_ref {
                    Some(field) if field.field_path == pod_index_label => {
                        Ok((name.into(), pod.index.to_string()))
                    }
                    _ => Err(LocalError::Unsupported(format!(
                        "spec.worker.env[{name}]: valueFrom needs a cluster; give a value"
                    ))),
                };
            }
            if name == env::TLS_CERT {
                return Err(LocalError::Unsupported(
                    "spec.workerTls: run-local runs plaintext on loopback; leave it out here"
                        .into(),
                ));
            }
            let value = var.value.clone().unwrap_or_default();
            let value = match name {
                env::MODEL => under_mount(&value, MODEL_MOUNT, pod.model_dir),
                env::PEERS => pod.peers.join(","),
                env::PLACEMENT => pod.plan.display().to_string(),
                env::LISTEN => pod.grpc.to_string(),
                env::METRICS_LISTEN => pod.metrics.to_string(),
                env::KERNEL_CACHE => under_mount(&value, KERNEL_CACHE_DIR, pod.kernels),
                _ => value,
            };
            Ok((name.into(), value))
        })
        .collect()
}

/// The router's process: its Deployment's arguments, with the backends from `backends_file`
/// instead of EndpointSlices, and local listen addresses.
pub fn router_process(
    desired: &Desired,
    volumes: &LocalVolumes,
    backends_file: &Path,
    ports: Ports,
) -> Result<(Process, Endpoints), LocalError> {
    let pod = desired
        .deployments
        .first()
        .and_then(|d| d.spec.as_ref()?.template.spec.as_ref())
        .ok_or_else(|| LocalError::Unsupported("no router Deployment".into()))?;
    let mut args = pod.containers[0].args.clone().unwrap_or_default();
    let endpoints = Endpoints {
        grpc: SocketAddr::from(([127, 0, 0, 1], ports()?)),
        http: SocketAddr::from(([127, 0, 0, 1], ports()?)),
        metrics: SocketAddr::from(([127, 0, 0, 1], ports()?)),
    };
    let metrics = endpoints.metrics;
    for flag in ["--discover-namespace", "--discover-selector"] {
        set_flag(&mut args, flag, None);
    }
    set_flag(&mut args, "--grpc-listen", Some(endpoints.grpc.to_string()));
    set_flag(&mut args, "--http-listen", Some(endpoints.http.to_string()));
    set_flag(&mut args, "--metrics-listen", Some(metrics.to_string()));
    set_flag(
        &mut args,
        "--backends-file",
        Some(backends_file.display().to_string()),
    );
    if flag_value(&args, "--tls-cert").is_some() {
        return Err(LocalError::Unsupported(
            "spec.router.tls: run-local serves plaintext on loopback; leave it out here".into(),
        ));
    }
    let keys_flag = "--api-keys-file";
    if flag_value(&args, keys_flag).is_some_and(|v| v.starts_with(ROUTER_KEYS_DIR)) {
        let file = volumes.api_keys_file.as_ref().ok_or_else(|| {
            LocalError::Unsupported(
                "spec.router.apiKeysSecret: a Secret needs a cluster; give its keys file with \
                 --api-keys-file"
                    .into(),
            )
        })?;
        set_flag(&mut args, keys_flag, Some(file.display().to_string()));
    }
    let process = Process {
        label: "router".into(),
        args,
        env: Vec::new(),
        grpc: endpoints.grpc,
        metrics,
        grace: Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30) as u64),
        gpus: Vec::new(),
    };
    Ok((process, endpoints))
}

/// One process's `/metrics`, for Prometheus's file-based discovery.
pub struct ScrapeTarget<'a> {
    pub deployment: &'a str,
    /// The worker's pool; none for the router.
    pub pool: Option<&'a str>,
    pub process: &'a Process,
}

/// A `file_sd_configs` file of `targets`, labelled as the chart's PodMonitors label a
/// cluster's pods (`deployment`, `component`, `pool`, `pod`), so one dashboard reads both.
pub fn prometheus_targets<'a>(targets: impl IntoIterator<Item = ScrapeTarget<'a>>) -> String {
    let groups: Vec<serde_json::Value> = targets
        .into_iter()
        .map(|target| {
            let mut labels = serde_json::Map::new();
            labels.insert("deployment".into(), target.deployment.into());
            let component = if target.pool.is_some() {
                "worker"
            } else {
                "router"
            };
            labels.insert("component".into(), component.into());
            if let Some(pool) = target.pool {
                labels.insert("pool".into(), pool.into());
            }
            labels.insert("pod".into(), target.process.label.as_str().into());
            serde_json::json!({
                "targets": [target.process.metrics.to_string()],
                "labels": labels,
            })
        })
        .collect();
    serde_json::to_string_pretty(&groups).expect("JSON values always serialise") + "\n"
}

/// Where clients reach a deployment run here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The router's `/metrics`, where the autoscaler reads the load.
    pub metrics: SocketAddr,
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// Sets `flag VALUE` (replacing it where present), or removes it with `None`.
fn set_flag(args: &mut Vec<String>, flag: &str, value: Option<String>) {
    if let Some(at) = args.iter().position(|a| a == flag) {
        args.drain(at..(at + 2).min(args.len()));
    }
    if let Some(value) = value {
        args.extend([flag.to_string(), value]);
    }
}

/// The backends file of the router: every pod of the groups in service, one line each, as
/// EndpointSlice discovery would list them.
pub fn backends_file(groups: &[(&LocalGroup, Option<&str>)]) -> String {
    let mut out = String::from("# written by deepseek-operator run-local\n");
    for (group, gpu) in groups {
        for pod in &group.pods {
            out.push_str(&format!("pool={},addr={}", group.pool, pod.grpc));
            if let Some(gpu) = gpu {
                out.push_str(&format!(",gpu={gpu}"));
            }
            out.push('\n');
        }
    }
    out
}

/// Restart delay after `failures` crashes in a row: 1 s, doubling, at most 30 s (a kubelet
/// starts at 10 s; a local run wants its group back sooner).
pub fn restart_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// A process that ran this long before it crashed starts its backoff again.
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// A running group as the rollout sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupView {
    pub index: i32,
    pub revision: String,
    pub ready: bool,
    /// Taken out of the router's backends, stopping.
    pub leaving: bool,
}

/// What the rollout does next in a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Start(i32),
    Retire(i32),
}

/// A pool as the rollout sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    pub replicas: i32,
    pub revision: String,
    pub groups: Vec<GroupView>,
}

/// The next steps for a deployment's pools (by index), as the controller takes them: groups
/// beyond a pool's count retire and missing ones start at once; groups on an old revision
/// are replaced as `status::groups_to_replace` says.
pub fn rollout(pools: &[PoolView]) -> Vec<(usize, Step)> {
    let mut steps = Vec::new();
    let mut states = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        let group = |index| pool.groups.iter().find(|g| g.index == index);
        steps.extend(
            pool.groups
                .iter()
                .filter(|g| g.index >= pool.replicas && !g.leaving)
                .map(|g| (p, Step::Retire(g.index))),
        );
        steps.extend(
            (0..pool.replicas)
                .filter(|i| group(*i).is_none())
                .map(|i| (p, Step::Start(i))),
        );
        states.push(
            (0..pool.replicas)
                .map(|i| match group(i) {
                    Some(g) => GroupState {
                        serving: g.ready && !g.leaving,
                        outdated: g.revision != pool.revision && !g.leaving,
                    },
                    None => GroupState {
                        serving: false,
                        outdated: false,
                    },
                })
                .collect::<Vec<_>>(),
        );
    }
    steps.extend(
        groups_to_replace(&states)
            .into_iter()
            .map(|(p, i)| (p, Step::Retire(i as i32))),
    );
    steps
}

/// The ports run-local listens on: the half below the kernel's ephemeral range (given as
/// `/proc/sys/net/ipv4/ip_local_port_range` reads, "32768\t60999"), or none when that range
/// is unknown or leaves no room.
pub fn listen_port_range(ephemeral_range: &str) -> Option<std::ops::Range<u16>> {
    let low: u16 = ephemeral_range.split_whitespace().next()?.parse().ok()?;
    (low >= 2048).then_some(low / 2..low)
}

/// A pool's line in the status: its groups ready on the current revision, of those it wants,
/// and those still serving on an old one during a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStatus {
    pub pool: String,
    pub ready: usize,
    pub desired: i32,
    pub ready_outdated: usize,
}

/// A deployment's status line, like the resource's status: groups ready per pool.
pub fn status_line(deployment: &str, pools: &[PoolStatus]) -> String {
    let pools: Vec<String> = pools
        .iter()
        .map(|p| {
            let old = match p.ready_outdated {
                0 => String::new(),
                n => format!(" (+{n} serving on an old revision)"),
            };
            format!(
                "pool {} {}/{} groups ready{old}",
                p.pool, p.ready, p.desired
            )
        })
        .collect();
    format!("{deployment}: {}", pools.join(", "))
}

#[cfg(test)]
mod tests;
