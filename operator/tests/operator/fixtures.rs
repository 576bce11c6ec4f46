//! Readable builders for the objects the tests feed the pure functions and the fake API.

use std::path::PathBuf;

use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::names::*;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn read(path: &str) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A sample manifest as the API server would return it: with a uid and a generation.
pub fn sample(file: &str) -> DeepSeekDeployment {
    let mut dsd: DeepSeekDeployment =
        serde_yaml::from_str(&read(&format!("deploy/samples/{file}"))).unwrap();
    dsd.metadata.uid = Some("0f6c3a4e-1d2b-4c5d-8e9f-a0b1c2d3e4f5".into());
    dsd.metadata.generation = Some(1);
    dsd
}

pub fn tiny() -> DeepSeekDeployment {
    sample("tiny.yaml")
}

pub fn v3() -> DeepSeekDeployment {
    sample("deepseek-v3-h100-a100.yaml")
}

/// The v3 sample pointed at another checkpoint revision, as a user's edit would (generation 2).
pub fn v3_at_revision(revision: &str) -> DeepSeekDeployment {
    let mut dsd = v3();
    dsd.spec
        .model
        .source
        .hugging_face
        .as_mut()
        .unwrap()
        .revision = revision.into();
    dsd.metadata.generation = Some(2);
    dsd
}

pub fn now() -> Time {
    Time("2026-11-29T12:00:00Z".parse().unwrap())
}

/// Compares `actual` with a checked-in file; `UPDATE_GOLDEN=1` rewrites the file instead.
pub fn assert_golden(path: &str, actual: &str) {
    let file = repo_root().join(path);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&file, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        expected == actual,
        "{path} is stale; rerun with UPDATE_GOLDEN=1 and review the diff.\n--- actual ---\n{actual}"
    );
}

/// A worker pod of one rank set, as the StatefulSet controller creates it.
pub struct PodBuilder {
    pod: Pod,
}

pub fn worker_pod(
    dsd: &DeepSeekDeployment,
    pool: &str,
    group: i32,
    index: i32,
    revision: &str,
) -> PodBuilder {
    let deployment = dsd.metadata.name.clone().unwrap();
    let mut labels = group_selector(&deployment, pool, group);
    labels.insert(LABEL_REVISION.into(), revision.into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    PodBuilder {
        pod: Pod {
            metadata: ObjectMeta {
                name: Some(format!("{}-{index}", group_name(&deployment, pool, group))),
                namespace: dsd.metadata.namespace.clone(),
                labels: Some(labels),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        },
    }
}

impl PodBuilder {
    pub fn ready(mut self) -> Self {
        self.condition("Ready", "True", None);
        self.on_node("node-0")
    }

    /// Placed by the scheduler.
    pub fn on_node(mut self, node: &str) -> Self {
        self.pod.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        self
    }

    pub fn unschedulable(mut self) -> Self {
        self.pod.status.as_mut().unwrap().phase = Some("Pending".into());
        self.condition("PodScheduled", "False", Some("Unschedulable"));
        self
    }

    /// Unschedulable, since `seconds` before `now()`.
    pub fn unschedulable_for(self, seconds: i64) -> Self {
        let mut built = self.unschedulable();
        let since = now().0 - k8s_openapi::jiff::SignedDuration::from_secs(seconds);
        let conditions = built.pod.status.as_mut().unwrap().conditions.as_mut();
        conditions.unwrap().last_mut().unwrap().last_transition_time = Some(Time(since));
        built
    }

    pub fn crash_looping(mut self) -> Self {
        let status = self.pod.status.as_mut().unwrap();
        status.container_statuses = Some(vec![ContainerStatus {
            name: "worker".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: Some("back-off 5m0s restarting failed container".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        self
    }

    /// Crash-looping after a run that ended saying `said` (its termination message).
    pub fn crash_looping_after(self, said: &str) -> Self {
        let mut pod = self.crash_looping();
        let status = pod.pod.status.as_mut().unwrap();
        status.container_statuses.as_mut().unwrap()[0].last_state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                message: Some(said.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        pod
    }

    pub fn terminating(mut self) -> Self {
        self.pod.metadata.deletion_timestamp = Some(now());
        self
    }

    pub fn build(self) -> Pod {
        self.pod
    }

    fn condition(&mut self, type_: &str, status: &str, reason: Option<&str>) {
        let conditions = self
            .pod
            .status
            .as_mut()
            .unwrap()
            .conditions
            .get_or_insert_with(Vec::new);
        conditions.push(PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.map(str::to_string),
            message: reason
                .map(|_| "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.".into()),
            ..Default::default()
        });
    }
}

/// Every rank of every desired group, on the current revision, ready.
pub fn all_ready_pods(dsd: &DeepSeekDeployment) -> Vec<Pod> {
    let desired = dsd.desired().unwrap();
    let mut pods = Vec::new();
    for (pool, revision) in &desired.pools {
        for group in 0..pool.replicas {
            for index in 0..pool.pods_per_group {
                pods.push(
                    worker_pod(dsd, &pool.name, group, index, revision)
                        .ready()
                        .build(),
                );
            }
        }
    }
    pods
}

pub fn available_router() -> Deployment {
    Deployment {
        status: Some(DeploymentStatus {
            available_replicas: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}
