//! A group's ranks: the StatefulSet, its pod template and worker container, and the
//! PodDisruptionBudget that limits evictions.

use std::collections::BTreeMap;

use deepseek_proto::placement::PLAN_FILE;
use deepseek_proto::pod::env;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ObjectFieldSelector, PodAffinity, PodAffinityTerm, PodSpec, PodTemplateSpec,
    ResourceRequirements, Toleration, TopologySpreadConstraint, Volume, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::k8s::{
    container_port, empty_dir, env_var, grpc_probe, label_selector, locked_down_pod,
    read_only_mount, requests, restricted, volume_mount,
};
use super::router::worker_tls_volume;
use super::{Ctx, dtype_name, ep_port_name};
use crate::names::*;
use crate::resolve::{DEFAULT_GPU_MEMORY_FRACTION, ResolvedPool};

impl Ctx<'_> {
    pub(super) fn group_stateful_set(
        &self,
        pool: &ResolvedPool,
        group: i32,
        revision: &str,
    ) -> StatefulSet {
        let name = group_name(&self.name, &pool.name, group);
        StatefulSet {
            metadata: self.meta(name.clone(), self.group_labels(pool, group)),
            spec: Some(StatefulSetSpec {
                replicas: Some(pool.pods_per_group),
                service_name: Some(name),
                selector: label_selector(group_selector(&self.name, &pool.name, group)),
                // Ranks of a group wait for each other, so start them all at once.
                pod_management_policy: Some("Parallel".into()),
                // The controller replaces whole groups, one per pool at a time: a group with
                // ranks on two revisions cannot serve, and rolling every group at once would
                // take the whole pool down.
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("OnDelete".into()),
                    ..Default::default()
                }),
                template: self.pod_template(pool, group, Some(revision)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub(super) fn group_pdb(&self, pool: &ResolvedPool, group: i32) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(
                group_name(&self.name, &pool.name, group),
                self.group_labels(pool, group),
            ),
            spec: Some(PodDisruptionBudgetSpec {
                // One rank down already stops the group; evicting more at once only slows
                // its return.
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(label_selector(group_selector(
                    &self.name, &pool.name, group,
                ))),
                unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The pod template of one group. `revision: None` gives the template the revision hash
    /// is computed from (group 0, no revision label).
    pub(super) fn pod_template(
        &self,
        pool: &ResolvedPool,
        group: i32,
        revision: Option<&str>,
    ) -> PodTemplateSpec {
        let mut labels = self.group_labels(pool, group);
        if let Some(revision) = revision {
            labels.insert(LABEL_REVISION.into(), revision.into());
        }
        let model = self.model_volume();
        let node_selector = node_selector(pool);
        let affinity =
            pool.spec.affinity.clone().unwrap_or_else(|| {
                same_zone_affinity(group_selector(&self.name, &pool.name, group))
            });
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![self.worker_container(pool, group, &model.path)],
                node_selector: (!node_selector.is_empty()).then_some(node_selector),
                tolerations: tolerations(pool),
                affinity: Some(affinity),
                topology_spread_constraints: Some(vec![self.rank_spread(pool, group)]),
                termination_grace_period_seconds: Some(60),
                volumes: Some(self.worker_volumes(pool, model.volume)),
                ..locked_down_pod()
            }),
        }
    }

    /// The model, the placement plan, shared memory and a writable /tmp, sorted by name.
    fn worker_volumes(&self, pool: &ResolvedPool, model: Volume) -> Vec<Volume> {
        let shm_size = self.dsd.spec.worker.shm_size.clone().unwrap_or_else(|| {
            Quantity(
                if pool.gpu_product.is_some() {
                    "16Gi"
                } else {
                    "1Gi"
                }
                .into(),
            )
        });
        let mut volumes = vec![
            model,
            Volume {
                name: "placement".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: placement_name(&self.name, &pool.name),
                    ..Default::default()
                }),
                ..Default::default()
            },
            empty_dir("shm", Some("Memory"), Some(shm_size)),
            empty_dir("tmp", None, None),
        ];
        if let Some(tls) = &self.dsd.spec.worker_tls {
            volumes.push(worker_tls_volume(&tls.secret(&self.name)).0);
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        volumes
    }

    /// Spreads a group's pods over nodes.
    fn rank_spread(&self, pool: &ResolvedPool, group: i32) -> TopologySpreadConstraint {
        TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            // GPU ranks need a node each; CPU test pools may share one node.
            when_unsatisfiable: if pool.gpu_product.is_some() {
                "DoNotSchedule".into()
            } else {
                "ScheduleAnyway".into()
            },
            label_selector: Some(label_selector(group_selector(
                &self.name, &pool.name, group,
            ))),
            // Count only pods of the same revision, so a rollout keeps the spread.
            match_label_keys: Some(vec![LABEL_REVISION.into()]),
            ..Default::default()
        }
    }

    pub(super) fn worker_image(&self) -> String {
        (self.dsd.spec.worker.image.clone()).unwrap_or_else(|| default_image("deepseek-worker"))
    }

    fn worker_container(&self, pool: &ResolvedPool, group: i32, model_path: &str) -> Container {
        let mut mounts = vec![
            read_only_mount("model", MODEL_MOUNT),
            read_only_mount("placement", PLACEMENT_MOUNT),
            volume_mount("shm", "/dev/shm"),
            volume_mount("tmp", "/tmp"),
        ];
        // With mutual TLS on the gRPC port the kubelet's probes, which speak no TLS, ask the
        // plaintext health port.
        let probe_port = match &self.dsd.spec.worker_tls {
            Some(tls) => {
                mounts.push(worker_tls_volume(&tls.secret(&self.name)).1);
                WORKER_HEALTH_PORT
            }
            None => WORKER_GRPC_PORT,
        };
        Container {
            name: "worker".into(),
            image: Some(self.worker_image()),
            args: Some(vec!["serve".into()]),
            env: Some(self.worker_env(pool, group, model_path)),
            ports: Some(worker_ports(pool)),
            resources: Some(self.worker_resources(pool)),
            // Answers as soon as the process is up; weight loading is covered by readiness.
            startup_probe: Some(grpc_probe(probe_port, Some(LIVENESS_SERVICE), 10, 30)),
            liveness_probe: Some(grpc_probe(probe_port, Some(LIVENESS_SERVICE), 10, 3)),
            // SERVING only with weights loaded and the group formed.
            readiness_probe: Some(grpc_probe(probe_port, None, 5, 2)),
            security_context: Some(restricted()),
            // The worker writes why it stopped there; failing that, the log's tail.
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            volume_mounts: Some(mounts),
            ..Default::default()
        }
    }

    /// The worker's configuration (see `deepseek_proto::pod::env`), then the user's `env`.
    fn worker_env(&self, pool: &ResolvedPool, group: i32, model_path: &str) -> Vec<EnvVar> {
        let worker = &self.dsd.spec.worker;
        let mut env = vec![
            env_var(env::SERVED_NAME, &self.served_name()),
            env_var(env::MODEL, model_path),
            env_var(env::DTYPE, dtype_name(pool.dtype)),
            env_var(env::POOL, &pool.name),
            env_var(env::GROUP_SIZE, &pool.group_size.to_string()),
            env_var(env::RANKS_PER_POD, &pool.ranks_per_pod.to_string()),
            EnvVar {
                name: env::POD_INDEX.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.labels['{LABEL_POD_INDEX}']"),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            env_var(env::PEERS, &self.peers(pool, group).join(",")),
            env_var(env::PLACEMENT, &format!("{PLACEMENT_MOUNT}/{PLAN_FILE}")),
            env_var(env::LISTEN, &format!("0.0.0.0:{WORKER_GRPC_PORT}")),
            env_var(env::METRICS_LISTEN, &format!("0.0.0.0:{METRICS_PORT}")),
        ];
        if let Some(product) = &pool.gpu_product {
            // The device plugin shows a pod its own GPUs only, numbered from 0.
            env.push(env_var(env::DEVICE, "cuda:0"));
            // A rank on another GPU refuses to start, saying so.
            env.push(env_var(env::GPU_PRODUCT, product));
            // Kernels the image does not ship (other GPUs) compile at start into /tmp.
            env.push(env_var(env::KERNEL_CACHE, KERNEL_CACHE_DIR));
        }
        if let Some(tokens) = worker.max_batch_tokens {
            env.push(env_var(env::MAX_BATCH_TOKENS, &tokens.to_string()));
        }
        // On a GPU the fraction is always set, so the worker sizes its cache as the memory
        // plan did.
        let fraction = match (worker.kv_cache_fraction, &pool.gpu_product) {
            (Some(fraction), _) => Some(fraction),
            (None, Some(_)) => Some(DEFAULT_GPU_MEMORY_FRACTION),
            (None, None) => None,
        };
        if let Some(fraction) = fraction {
            env.push(env_var(env::KV_CACHE_FRACTION, &fraction.to_string()));
        }
        if let Some(tracing) = &self.dsd.spec.tracing {
            env.push(env_var(env::OTLP_ENDPOINT, &tracing.otlp_endpoint));
        }
        if self.dsd.spec.worker_tls.is_some() {
            env.extend([
                env_var(env::TLS_CERT, &format!("{WORKER_TLS_DIR}/{TLS_CERT_ENTRY}")),
                env_var(env::TLS_KEY, &format!("{WORKER_TLS_DIR}/{TLS_KEY_ENTRY}")),
                env_var(
                    env::TLS_CLIENT_CA,
                    &format!("{WORKER_TLS_DIR}/{TLS_CA_ENTRY}"),
                ),
                env_var(env::HEALTH_LISTEN, &format!("0.0.0.0:{WORKER_HEALTH_PORT}")),
            ]);
        }
        env.extend(worker.env.clone().unwrap_or_default());
        env
    }

    /// Every rank's expert-parallel address in the group, by rank: the pod's stable DNS name
    /// under the headless Service, and the port of its local rank.
    fn peers(&self, pool: &ResolvedPool, group: i32) -> Vec<String> {
        let group_name = group_name(&self.name, &pool.name, group);
        (0..pool.group_size)
            .map(|rank| {
                let pod = rank / pool.ranks_per_pod;
                let port = WORKER_EP_PORT + rank % pool.ranks_per_pod;
                format!(
                    "{group_name}-{pod}.{group_name}.{}.svc:{port}",
                    self.namespace
                )
            })
            .collect()
    }

    /// The pool's resources, else the worker's, else a default; GPU pools add a GPU per rank.
    fn worker_resources(&self, pool: &ResolvedPool) -> ResourceRequirements {
        let mut resources = pool
            .spec
            .resources
            .clone()
            .or_else(|| self.dsd.spec.worker.resources.clone())
            .unwrap_or_else(|| {
                requests(&[
                    ("cpu", "2"),
                    (
                        "memory",
                        if pool.gpu_product.is_some() {
                            "64Gi"
                        } else {
                            "2Gi"
                        },
                    ),
                ])
            });
        if pool.gpu_product.is_some() {
            let gpus = Quantity(pool.ranks_per_pod.to_string());
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.into(), gpus.clone());
            resources
                .requests
                .get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.into(), gpus);
        }
        resources
    }
}

fn worker_ports(pool: &ResolvedPool) -> Vec<ContainerPort> {
    let mut ports = vec![container_port("grpc", WORKER_GRPC_PORT)];
    ports.extend(
        (0..pool.ranks_per_pod).map(|i| container_port(&ep_port_name(i), WORKER_EP_PORT + i)),
    );
    ports.push(container_port("metrics", METRICS_PORT));
    ports
}

/// GPU pools go to nodes with their GPU product; the pool's own selector adds to that.
fn node_selector(pool: &ResolvedPool) -> BTreeMap<String, String> {
    let gpu_node_selector = pool
        .gpu_product
        .iter()
        .map(|p| (NODE_LABEL_GPU_PRODUCT.to_string(), p.clone()));
    gpu_node_selector
        .chain(pool.spec.node_selector.clone().unwrap_or_default())
        .collect()
}

/// The pool's tolerations, else (on GPU pools) the GPU taint's.
fn tolerations(pool: &ResolvedPool) -> Option<Vec<Toleration>> {
    pool.spec.tolerations.clone().or_else(|| {
        pool.gpu_product.as_ref().map(|_| {
            vec![Toleration {
                key: Some(GPU_RESOURCE.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }]
        })
    })
}

/// Prefer keeping a group's ranks in one zone: dispatch/combine crosses between them on every
/// MoE layer.
fn same_zone_affinity(group: BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_affinity: Some(PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(label_selector(group)),
                        topology_key: "topology.kubernetes.io/zone".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
