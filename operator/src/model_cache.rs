//! The model cache of a `huggingFace` source, as the controller finds it: which claim the
//! workers mount, how far the download is, and which caches of earlier revisions can go.
//! Pure: the objects read in, the decisions out.
//!
//! One claim and one Job per repository revision (`names::model_cache_name`). The groups
//! mount the spec revision's claim once its Job succeeded; until then they keep the claim
//! they mount (an earlier revision's), or, at the first download, wait. A cache no group
//! and no pod mounts, other than the spec revision's, is deleted.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodSpec};
use kube::ResourceExt;
use serde::Deserialize;

use crate::api::{DeepSeekDeployment, ModelStatus};
use crate::desired::ModelMount;
use crate::names::*;
use crate::status::Verdict;

pub const MODEL_READY: &str = "ModelReady";

/// The label the Job controller puts on its pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// What the controller read about a deployment's model caches.
#[derive(Clone, Debug, Default)]
pub struct Caches {
    /// Download Jobs and cache claims of the deployment (by their labels).
    pub jobs: Vec<Job>,
    pub claims: Vec<PersistentVolumeClaim>,
    /// The last progress line of the running download's log, if it could be read.
    pub progress: Option<DownloadProgress>,
}

/// One progress line of `deepseek-worker download` (a JSON line on its stderr).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct DownloadProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_per_second: u64,
}

/// What a finished download wrote to its termination message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
struct Downloaded {
    commit: String,
    files: u64,
    bytes: u64,
}

/// The controller's view of the model cache, for a `huggingFace` source.
#[derive(Clone, Debug)]
pub struct ModelState {
    pub mount: ModelMount,
    /// The `ModelReady` condition.
    pub ready: Verdict,
    /// The download failed for good (the Job gave up): the deployment is degraded.
    pub failed: bool,
    pub status: ModelStatus,
    /// Caches (claim and Job, by name) to delete: no group or pod mounts them.
    pub stale: Vec<String>,
}

/// The model cache state, or `None` for a `pvc` source.
pub fn state(
    dsd: &DeepSeekDeployment,
    caches: &Caches,
    stateful_sets: &[StatefulSet],
    pods: &[Pod],
) -> Option<ModelState> {
    let hf = dsd.spec.model.source.hugging_face.as_ref()?;
    let deployment = dsd.name_any();
    let wanted = wanted_cache(dsd)?;
    let model = format!("{}@{}", hf.repo, hf.revision);
    let job = caches.jobs.iter().find(|j| j.name_any() == wanted);
    let job_pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.labels().get(JOB_NAME_LABEL) == Some(&wanted))
        .collect();
    let mut status = ModelStatus {
        claim_name: wanted.clone(),
        ..Default::default()
    };
    let (ready, failed) = match job.map(job_outcome) {
        Some(JobOutcome::Succeeded) => {
            let downloaded = job_pods.iter().find_map(|p| downloaded(p));
            // The pods of a finished Job may be gone; the commit stays in status.
            let previous = dsd.status.as_ref().and_then(|s| s.model.as_ref());
            status.commit = downloaded.as_ref().map(|d| d.commit.clone()).or_else(|| {
                previous
                    .filter(|p| p.claim_name == wanted)
                    .and_then(|p| p.commit.clone())
            });
            let bytes = downloaded.as_ref().map(|d| d.bytes as i64);
            status.bytes_done = bytes;
            status.bytes_total = bytes;
            let commit = status.commit.as_deref().unwrap_or("not reported");
            let size = downloaded.map_or(String::new(), |d| {
                format!(": {} in {} files", gigabytes(d.bytes), d.files)
            });
            let message = format!("{model} (commit {commit}) is in claim {wanted}{size}");
            (Verdict::new(true, "Downloaded", message), false)
        }
        Some(JobOutcome::Failed(why)) => {
            let last = last_failure(&job_pods).unwrap_or(why);
            let message = format!(
                "the download of {model} gave up: {last}; delete Job {wanted} to try again"
            );
            (Verdict::new(false, "DownloadFailed", message), true)
        }
        Some(JobOutcome::Running { failed_attempts }) => {
            let mut message = format!("downloading {model} into claim {wanted}");
            match (&caches.progress, waiting(&job_pods)) {
                (_, Some(why)) => message.push_str(&format!(": {why}")),
                (Some(progress), None) => {
                    status.bytes_done = Some(progress.bytes_done as i64);
                    status.bytes_total = Some(progress.bytes_total as i64);
                    message.push_str(&format!(
                        ": {} of {}, {} of {} files, {}/s",
                        gigabytes(progress.bytes_done),
                        gigabytes(progress.bytes_total),
                        progress.files_done,
                        progress.files_total,
                        gigabytes(progress.bytes_per_second)
                    ));
                }
                (None, None) => {}
            }
            if failed_attempts > 0 {
                let last = last_failure(&job_pods).unwrap_or_default();
                message.push_str(&format!(
                    "; attempt {failed_attempts} failed ({last}), resuming"
                ));
            }
            (Verdict::new(false, "Downloading", message), false)
        }
        None => (
            Verdict::new(
                false,
                "Downloading",
                format!("creating Job {wanted} to download {model}"),
            ),
            false,
        ),
    };

    let templates = stateful_sets
        .iter()
        .filter_map(|s| s.spec.as_ref()?.template.spec.as_ref());
    let groups_mount: Vec<&str> = cache_claims(&deployment, templates).collect();
    // A pod of an old revision, terminating or not, still reads its claim.
    let workers = pods
        .iter()
        .filter(|p| {
            p.labels()
                .get("app.kubernetes.io/component")
                .map(String::as_str)
                == Some(COMPONENT_WORKER)
        })
        .filter_map(|p| p.spec.as_ref());
    let mounted: BTreeSet<&str> = groups_mount
        .iter()
        .copied()
        .chain(cache_claims(&deployment, workers))
        .collect();
    let mount = if ready.status {
        ModelMount::Wanted
    } else {
        // The claim most groups mount; an earlier revision's cache keeps serving.
        let mut by_groups: BTreeMap<&str, usize> = BTreeMap::new();
        for claim in &groups_mount {
            *by_groups.entry(claim).or_default() += 1;
        }
        match by_groups.into_iter().max_by_key(|(_, groups)| *groups) {
            Some((claim, _)) if claim != wanted => ModelMount::Previous(claim.to_string()),
            _ => ModelMount::NotYet,
        }
    };
    // Those on their way out already are not deleted again.
    let mut stale: Vec<String> = caches
        .jobs
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
        .map(|j| j.name_any())
        .chain(
            caches
                .claims
                .iter()
                .filter(|c| c.metadata.deletion_timestamp.is_none())
                .map(|c| c.name_any()),
        )
        .filter(|name| *name != wanted && !mounted.contains(name.as_str()))
        .collect();
    stale.sort();
    stale.dedup();
    Some(ModelState {
        mount,
        ready,
        failed,
        status,
        stale,
    })
}

/// The last progress line in a download's log.
pub fn last_progress(log: &str) -> Option<DownloadProgress> {
    log.lines()
        .rev()
        .find_map(|line| serde_json::from_str(line.trim()).ok())
}

/// The spec revision's cache (its claim's and Job's name), for a `huggingFace` source.
fn wanted_cache(dsd: &DeepSeekDeployment) -> Option<String> {
    let hf = dsd.spec.model.source.hugging_face.as_ref()?;
    Some(model_cache_name(&dsd.name_any(), &hf.repo, &hf.revision))
}

/// The wanted Job's pod to read progress from: the one running.
pub fn running_download_pod<'a>(dsd: &DeepSeekDeployment, pods: &'a [Pod]) -> Option<&'a Pod> {
    let wanted = wanted_cache(dsd)?;
    pods.iter().find(|p| {
        p.labels().get(JOB_NAME_LABEL) == Some(&wanted)
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
}

enum JobOutcome {
    Succeeded,
    Failed(String),
    Running { failed_attempts: i32 },
}

fn job_outcome(job: &Job) -> JobOutcome {
    let status = job.status.clone().unwrap_or_default();
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    if condition("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        JobOutcome::Succeeded
    } else if let Some(failed) = condition("Failed") {
        JobOutcome::Failed(failed.message.clone().unwrap_or_default())
    } else {
        JobOutcome::Running {
            failed_attempts: status.failed.unwrap_or(0),
        }
    }
}

/// What a succeeded download pod said it fetched.
fn downloaded(pod: &Pod) -> Option<Downloaded> {
    let message = terminated_message(pod)?;
    serde_json::from_str(message.trim()).ok()
}

fn terminated_message(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.as_deref())
}

/// Why the newest failed attempt failed, from its termination message.
fn last_failure(pods: &[&Pod]) -> Option<String> {
    pods.iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .max_by_key(|p| p.metadata.creation_timestamp.clone())
        .and_then(|p| terminated_message(p))
        .map(|m| m.trim().to_string())
}

/// Why the current attempt's pod is not running yet: a scheduling failure (an unbound
/// claim) or a container that cannot start (an image pull).
fn waiting(pods: &[&Pod]) -> Option<String> {
    let pod = pods
        .iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"))?;
    let status = pod.status.as_ref()?;
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.message.is_some());
    if let Some(condition) = unscheduled {
        return Some(format!(
            "pod {} is not scheduled: {}",
            pod.name_any(),
            condition.message.as_deref().unwrap_or_default()
        ));
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref())
        .filter(|w| w.reason.as_deref() != Some("ContainerCreating"))
        .map(|w| {
            format!(
                "pod {}: {}: {}",
                pod.name_any(),
                w.reason.as_deref().unwrap_or_default(),
                w.message.as_deref().unwrap_or_default()
            )
        })
}

/// The deployment's model caches these pods (or pod templates) mount.
fn cache_claims<'a>(
    deployment: &'a str,
    specs: impl Iterator<Item = &'a PodSpec>,
) -> impl Iterator<Item = &'a str> {
    specs
        .filter_map(model_claim)
        .filter(move |claim| is_model_cache_of(deployment, claim))
}

/// The claim a worker pod's `model` volume names.
fn model_claim(spec: &PodSpec) -> Option<&str> {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == "model")?
        .persistent_volume_claim
        .as_ref()
        .map(|c| c.claim_name.as_str())
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}
