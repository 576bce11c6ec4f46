//! The model cache of a `huggingFace` source: from the Jobs, claims, groups and pods the
//! controller reads, which claim the workers mount, the `ModelReady` condition and the caches
//! that can go.

use deepseek_operator::api::{DeepSeekDeployment, ModelStatus};
use deepseek_operator::desired::ModelMount;
use deepseek_operator::model_cache::{self, Caches, DownloadProgress, ModelState};
use deepseek_operator::status::{self, Observed};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use serde_json::{Value, json};

use crate::fixtures::*;

fn cache_name(dsd: &DeepSeekDeployment) -> String {
    dsd.desired()
        .unwrap()
        .model_cache
        .unwrap()
        .claim
        .metadata
        .name
        .unwrap()
}

/// A download Job with this status.
fn job(name: &str, status: Value) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "inference"},
        "status": status,
    }))
    .unwrap()
}

fn claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "inference"}})).unwrap()
}

/// A pod of the Job `job`: its phase, and its status beyond that.
fn download_pod(job: &str, name: &str, phase: &str, status: Value) -> Pod {
    let mut status = status;
    status["phase"] = json!(phase);
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "inference",
            "creationTimestamp": format!("2026-11-29T11:0{}:00Z", name.len() % 10),
            "labels": {"batch.kubernetes.io/job-name": job, "app.kubernetes.io/component": "model-cache"},
        },
        "status": status,
    }))
    .unwrap()
}

fn terminated(message: &str) -> Value {
    json!({"containerStatuses": [{
        "name": "download", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "message": message}},
    }]})
}

/// A group (or a worker pod) whose model volume is `claim`.
fn mounting(claim: &str) -> Value {
    json!({"containers": [{"name": "worker"}], "volumes": [
        {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}},
    ]})
}

fn group(claim: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": "deepseek-v3-h100-g0"},
        "spec": {"selector": {}, "serviceName": "s", "template": {"spec": mounting(claim)}},
    }))
    .unwrap()
}

fn worker_reading(claim: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "deepseek-v3-h100-g0-0", "labels": {"app.kubernetes.io/component": "worker"}},
        "spec": mounting(claim),
    }))
    .unwrap()
}

fn state(
    dsd: &DeepSeekDeployment,
    caches: &Caches,
    groups: &[StatefulSet],
    pods: &[Pod],
) -> ModelState {
    model_cache::state(dsd, caches, groups, pods).unwrap()
}

#[test]
fn a_pvc_source_has_no_model_cache() {
    assert!(model_cache::state(&tiny(), &Caches::default(), &[], &[]).is_none());
}

#[test]
fn the_first_download_holds_the_groups_back_and_says_why() {
    let dsd = v3();
    let name = cache_name(&dsd);
    let none_yet = state(&dsd, &Caches::default(), &[], &[]);
    assert_eq!(none_yet.mount, ModelMount::NotYet);
    assert_eq!(none_yet.ready.reason, "Downloading");
    assert!(
        none_yet
            .ready
            .message
            .contains(&format!("creating Job {name}"))
    );

    // The claim is not bound yet: the scheduler's word is the message.
    let caches = Caches {
        jobs: vec![job(&name, json!({"active": 1}))],
        claims: vec![claim(&name)],
        progress: None,
    };
    let pending = download_pod(
        &name,
        "dl-a",
        "Pending",
        json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/16 nodes are available: pod has unbound immediate PersistentVolumeClaims"}]}),
    );
    let waiting = state(&dsd, &caches, &[], &[pending]);
    assert_eq!(waiting.mount, ModelMount::NotYet);
    assert!(
        waiting.ready.message.ends_with(
            "pod dl-a is not scheduled: 0/16 nodes are available: pod has unbound immediate PersistentVolumeClaims"
        ),
        "{}",
        waiting.ready.message
    );

    // Running: bytes and files from the log's last progress line.
    let log = "starting\n{\"bytes_done\":1,\"bytes_total\":2,\"files_done\":0,\"files_total\":2,\"bytes_per_second\":1}\n\
               {\"bytes_done\":250000000000,\"bytes_total\":688000000000,\"files_done\":40,\"files_total\":163,\"bytes_per_second\":900000000}\n";
    let progress = model_cache::last_progress(log).unwrap();
    assert_eq!(
        progress,
        DownloadProgress {
            bytes_done: 250_000_000_000,
            bytes_total: 688_000_000_000,
            files_done: 40,
            files_total: 163,
            bytes_per_second: 900_000_000,
        }
    );
    let running = download_pod(&name, "dl-a", "Running", json!({}));
    let caches = Caches {
        progress: Some(progress),
        ..caches
    };
    let downloading = state(&dsd, &caches, &[], std::slice::from_ref(&running));
    assert_eq!(
        model_cache::running_download_pod(&dsd, std::slice::from_ref(&running))
            .map(|p| p.metadata.name.clone()),
        Some(Some("dl-a".to_string()))
    );
    assert_eq!(
        (
            downloading.status.bytes_done,
            downloading.status.bytes_total
        ),
        (Some(250_000_000_000), Some(688_000_000_000))
    );
    assert!(
        downloading
            .ready
            .message
            .ends_with("250.0 GB of 688.0 GB, 40 of 163 files, 0.9 GB/s"),
        "{}",
        downloading.ready.message
    );

    // The status: not Ready, for that reason; Progressing; ModelReady False.
    let status = status_with(&dsd, downloading);
    let condition = |type_: &str| {
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.clone(), c.reason.clone())
    };
    assert_eq!(condition("Ready"), ("False".into(), "Downloading".into()));
    assert_eq!(
        condition("Progressing"),
        ("True".into(), "Downloading".into())
    );
    assert_eq!(condition("Degraded"), ("False".into(), "AsExpected".into()));
    assert_eq!(
        condition("ModelReady"),
        ("False".into(), "Downloading".into())
    );
    assert_eq!(status.model.unwrap().claim_name, name);
}

fn status_with(
    dsd: &DeepSeekDeployment,
    model: ModelState,
) -> deepseek_operator::api::DeepSeekDeploymentStatus {
    let desired = dsd
        .desired_in(&deepseek_operator::desired::Surroundings {
            model_mount: model.mount.clone(),
            ..Default::default()
        })
        .unwrap();
    let observed = Observed {
        model: Some(model),
        router: Some(available_router()),
        ..Default::default()
    };
    status::compute(dsd, Ok(&desired), &observed, &now())
}

#[test]
fn a_failed_attempt_resumes_and_a_job_that_gives_up_degrades_the_deployment() {
    let dsd = v3();
    let name = cache_name(&dsd);
    let failed_pod = download_pod(
        &name,
        "dl-a",
        "Failed",
        terminated("model-00007-of-00163.safetensors: connection reset"),
    );
    let retrying = state(
        &dsd,
        &Caches {
            jobs: vec![job(&name, json!({"active": 1, "failed": 1}))],
            ..Default::default()
        },
        &[],
        std::slice::from_ref(&failed_pod),
    );
    assert_eq!(retrying.ready.reason, "Downloading");
    assert!(!retrying.failed);
    assert!(
        retrying.ready.message.ends_with(
            "attempt 1 failed (model-00007-of-00163.safetensors: connection reset), resuming"
        ),
        "{}",
        retrying.ready.message
    );
    // A failed attempt's pod is the Job's to retry, not a failing deployment.
    let status = status_with(&dsd, retrying);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "False");

    let gave_up = state(
        &dsd,
        &Caches {
            jobs: vec![job(
                &name,
                json!({"failed": 6, "conditions": [{"type": "Failed", "status": "True",
                    "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}),
            )],
            ..Default::default()
        },
        &[],
        &[failed_pod],
    );
    assert!(gave_up.failed);
    assert_eq!(gave_up.ready.reason, "DownloadFailed");
    assert_eq!(
        gave_up.ready.message,
        format!(
            "the download of deepseek-ai/DeepSeek-V3@main gave up: \
             model-00007-of-00163.safetensors: connection reset; delete Job {name} to try again"
        )
    );
    let status = status_with(&dsd, gave_up);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "DownloadFailed")
    );
}

#[test]
fn a_finished_download_gives_the_commit_and_the_groups_mount_it() {
    let dsd = v3();
    let name = cache_name(&dsd);
    let caches = Caches {
        jobs: vec![job(
            &name,
            json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
        )],
        claims: vec![claim(&name)],
        progress: None,
    };
    let said = r#"{"repo":"deepseek-ai/DeepSeek-V3","revision":"main","commit":"e815299b0bcbac849fa540c768ef21845365c9eb","files":165,"bytes":688586727753,"fetched_bytes":5}"#;
    let pod = download_pod(&name, "dl-b", "Succeeded", terminated(said));
    let done = state(&dsd, &caches, &[], &[pod]);
    assert_eq!(done.mount, ModelMount::Wanted);
    assert_eq!(
        done.status,
        ModelStatus {
            claim_name: name.clone(),
            commit: Some("e815299b0bcbac849fa540c768ef21845365c9eb".into()),
            bytes_done: Some(688_586_727_753),
            bytes_total: Some(688_586_727_753),
        }
    );
    assert_eq!(
        done.ready.message,
        format!(
            "deepseek-ai/DeepSeek-V3@main (commit e815299b0bcbac849fa540c768ef21845365c9eb) \
             is in claim {name}: 688.6 GB in 165 files"
        )
    );

    // The Job's pods may go; the commit stays as status remembers it.
    let mut later = dsd.clone();
    later.status = Some(status_with(&dsd, done));
    let remembered = state(&later, &caches, &[], &[]);
    assert_eq!(
        remembered.status.commit.as_deref(),
        Some("e815299b0bcbac849fa540c768ef21845365c9eb")
    );
    assert!(remembered.ready.status);
}

#[test]
fn a_new_revision_downloads_beside_the_old_which_goes_after_the_rollout() {
    let old = v3();
    let old_cache = cache_name(&old);
    let new = v3_at_revision("v3.1");
    let new_cache = cache_name(&new);
    let complete = json!({"succeeded": 1});
    let caches = |new_job: Value| Caches {
        jobs: vec![job(&old_cache, complete.clone()), job(&new_cache, new_job)],
        claims: vec![claim(&old_cache), claim(&new_cache)],
        progress: None,
    };

    // Downloading: the groups keep the old claim, and it stays.
    let groups = [group(&old_cache)];
    let pods = [worker_reading(&old_cache)];
    let downloading = state(&new, &caches(json!({"active": 1})), &groups, &pods);
    assert_eq!(downloading.mount, ModelMount::Previous(old_cache.clone()));
    assert!(downloading.stale.is_empty());

    // Downloaded: the groups move to the new claim; the old stays while a pod reads it.
    let done = state(&new, &caches(complete.clone()), &[group(&new_cache)], &pods);
    assert_eq!(done.mount, ModelMount::Wanted);
    assert!(done.stale.is_empty());

    // The rollout is over: the old claim and its Job go.
    let after = state(
        &new,
        &caches(complete.clone()),
        &[group(&new_cache)],
        &[worker_reading(&new_cache)],
    );
    assert_eq!(after.stale, vec![old_cache.clone()]);

    // A revision replaced before it ever served goes at once, and the groups never wait
    // for it: they keep what they mount.
    let third = v3_at_revision("v3.2");
    let abandoned = state(&third, &caches(json!({"active": 1})), &groups, &pods);
    assert_eq!(abandoned.mount, ModelMount::Previous(old_cache.clone()));
    assert_eq!(abandoned.stale, vec![new_cache]);
}
