//! The pod contract end to end: a worker pod rendered by the operator's builders, its
//! arguments and environment handed to the real `deepseek-worker serve --dry-run`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::names::*;
use deepseek_proto::placement::PLAN_FILE;
use deepseek_proto::pod::env;
use kube::ResourceExt;
use serde_json::Value;

use crate::fixtures::*;

/// `target/<profile>/deepseek-worker`, which `cargo test --workspace` builds with this test.
fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/operator-<hash>
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("deepseek-worker");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p deepseek-worker` (or `cargo test --workspace`)",
        binary.display()
    );
    binary
}

/// Runs the worker as pod `pod_index` of the deployment's first group of `pool` would: the
/// container's arguments and environment, the downward-API pod index filled in, and the
/// placement ConfigMap's plan at a local path in place of its mount. Returns the worker's
/// report, or its error.
fn dry_run(dsd: &DeepSeekDeployment, pool: &str, pod_index: u32) -> Result<Value, String> {
    let desired = dsd.desired().unwrap();
    let group = group_name(&dsd.name_any(), pool, 0);
    let sts = desired
        .stateful_sets
        .iter()
        .find(|s| s.name_any() == group)
        .unwrap();
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let mounted = |path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == path)
    };
    assert!(mounted(PLACEMENT_MOUNT) && mounted(MODEL_MOUNT));
    let plan = desired
        .config_maps
        .iter()
        .find(|c| c.name_any() == placement_name(&dsd.name_any(), pool))
        .and_then(|c| c.data.as_ref()?.get(PLAN_FILE).cloned())
        .unwrap();
    // Tests run in parallel, several on the same deployment: a file per call.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let plan_file = std::env::temp_dir().join(format!(
        "dsd-contract-{}-{}.json",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&plan_file, plan).unwrap();

    let mut worker = Command::new(worker_binary());
    worker
        .env_clear()
        .args(container.args.iter().flatten())
        .arg("--dry-run");
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) if var.name == env::PLACEMENT => {
                assert_eq!(value, &format!("{PLACEMENT_MOUNT}/{PLAN_FILE}"));
                plan_file.display().to_string()
            }
            (Some(value), None) => value.clone(),
            (None, Some(source)) => {
                let field = &source.field_ref.as_ref().unwrap().field_path;
                assert_eq!(var.name, env::POD_INDEX);
                assert_eq!(field, &format!("metadata.labels['{LABEL_POD_INDEX}']"));
                pod_index.to_string()
            }
            other => panic!("{}: unexpected source {other:?}", var.name),
        };
        worker.env(&var.name, value);
    }
    let output = worker.output().unwrap();
    std::fs::remove_file(&plan_file).unwrap();
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn a_cpu_pod_serves_as_the_operator_meant() {
    let report = dry_run(&tiny(), "cpu", 0).unwrap();
    assert_eq!(report["served_name"], "tiny-deepseek");
    assert_eq!(report["model"], "/models/demo-v3");
    assert_eq!(report["pool"], "cpu");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["listen"], format!("0.0.0.0:{WORKER_GRPC_PORT}"));
    assert_eq!(report["metrics_listen"], format!("0.0.0.0:{METRICS_PORT}"));
    assert_eq!(report["max_batch_tokens"], 2048);
    assert_eq!(
        [
            &report["first_rank"],
            &report["ranks"],
            &report["group_size"]
        ],
        [0, 1, 1]
    );
}

#[test]
fn a_gpu_pod_finds_its_rank_and_its_peers() {
    let mut dsd = v3();
    // Two GPUs cannot hold DeepSeek-V3; a model of unknown shape has no memory plan.
    dsd.spec.model.architecture = None;
    dsd.spec.model.routed_experts = Some(256);
    for pool in &mut dsd.spec.pools {
        pool.gpus_per_pod = 1;
        pool.pods_per_group = Some(2);
    }
    let report = dry_run(&dsd, "h100", 1).unwrap();
    assert_eq!(report["device"], "cuda:0");
    assert_eq!(report["dtype"], "fp8");
    assert_eq!(report["pool"], "h100");
    assert_eq!(
        [
            &report["first_rank"],
            &report["ranks"],
            &report["group_size"]
        ],
        [1, 1, 2]
    );
    let own = format!("deepseek-v3-h100-g0-1.deepseek-v3-h100-g0.inference.svc:{WORKER_EP_PORT}");
    assert_eq!(report["expert_parallel_listen"], serde_json::json!([own]));
    assert_eq!(report["peers"][1], own.as_str());
    assert_eq!(dry_run(&dsd, "a100", 0).unwrap()["dtype"], "fp8");
}

#[test]
fn a_pod_of_eight_gpus_runs_eight_ranks_from_its_index() {
    let report = dry_run(&v3(), "h100", 1).unwrap();
    assert_eq!(
        [
            &report["first_rank"],
            &report["ranks"],
            &report["group_size"]
        ],
        [8, 8, 32]
    );
    assert_eq!(report["device"], "cuda:0");
    let own = |port: u16| format!("deepseek-v3-h100-g0-1.deepseek-v3-h100-g0.inference.svc:{port}");
    let listen: Vec<String> = (0..8).map(|i| own(WORKER_EP_PORT as u16 + i)).collect();
    assert_eq!(report["expert_parallel_listen"], serde_json::json!(listen));
}
