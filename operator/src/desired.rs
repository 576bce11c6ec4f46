//! Pure builders: a `DeepSeekDeployment` in, the Kubernetes objects that realise it out.
//!
//! Per pool × group: a StatefulSet of ranks, its headless Service (peer discovery), a
//! PodDisruptionBudget and a NetworkPolicy. Per pool: the placement ConfigMap. Per deployment:
//! the router Deployment, Service and its discovery RBAC. Nothing here does I/O.

use std::collections::BTreeMap;

use deepseek_proto::placement::{PLAN_FILE, PlacementPlan};
use deepseek_proto::pod::env;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, GRPCAction, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodAffinity, PodAffinityTerm, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    Toleration, TopologySpreadConstraint, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::{
    DeepSeekDeployment, Dtype, Endpoints, HuggingFaceSource, PoolSpec, RoutingPolicy,
};
use crate::names::*;
use crate::resolve::{self, ResolvedPool, SpecError};

/// Everything the operator applies for one deployment.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Resolved pools with the revision hash of their pod template.
    pub pools: Vec<(ResolvedPool, String)>,
    pub service_accounts: Vec<ServiceAccount>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub config_maps: Vec<ConfigMap>,
    pub services: Vec<Service>,
    pub stateful_sets: Vec<StatefulSet>,
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
    pub network_policies: Vec<NetworkPolicy>,
    pub deployments: Vec<Deployment>,
}

/// Tokens routed to each expert: layer → count per expert.
pub type ExpertLoad = BTreeMap<u32, Vec<u64>>;

impl DeepSeekDeployment {
    /// The objects that realise this deployment, or why it cannot be realised, with
    /// round-robin expert placement.
    pub fn desired(&self) -> Result<Desired, SpecError> {
        self.desired_with_load(&ExpertLoad::new())
    }

    /// Like `desired`, with each pool's placement balanced by measured expert load
    /// (tokens routed per layer and expert; layers without data stay round-robin).
    pub fn desired_with_load(&self, load: &ExpertLoad) -> Result<Desired, SpecError> {
        let pools = resolve::resolve(self)?;
        let experts = resolve::routed_experts(self)?;
        let ctx = Ctx::new(self);
        let mut out = Desired::default();
        for pool in pools {
            let plan = PlacementPlan::balanced(
                pool.group_size as u32,
                experts,
                self.spec.parallelism.redundant_experts.max(0) as u32,
                load,
            );
            let plan_json = serde_json::to_string(&plan).expect("plan serialises");
            let revision = revision_hash(&ctx.pod_template(&pool, 0, None), &plan_json);
            out.config_maps
                .push(ctx.placement_config_map(&pool, plan_json));
            for group in 0..pool.replicas {
                out.services.push(ctx.group_service(&pool, group));
                out.stateful_sets
                    .push(ctx.group_stateful_set(&pool, group, &revision));
                out.pod_disruption_budgets.push(ctx.group_pdb(&pool, group));
                out.network_policies
                    .push(ctx.group_network_policy(&pool, group));
            }
            out.pools.push((pool, revision));
        }
        ctx.router(&mut out);
        Ok(out)
    }

    pub fn endpoints(&self) -> Endpoints {
        let router = router_name(&self.name_any());
        let ns = self.namespace().unwrap_or_else(|| "default".into());
        Endpoints {
            grpc: format!("{router}.{ns}.svc:{}", self.spec.router.grpc_port),
            http: format!("http://{router}.{ns}.svc:{}", self.spec.router.http_port),
        }
    }
}

impl Desired {
    /// All objects as one multi-document YAML stream, in apply order.
    pub fn to_yaml(&self) -> String {
        fn docs<T: Serialize>(out: &mut String, objects: &[T]) {
            for object in objects {
                out.push_str("---\n");
                out.push_str(&serde_yaml::to_string(object).expect("objects serialise"));
            }
        }
        let mut out = String::new();
        docs(&mut out, &self.service_accounts);
        docs(&mut out, &self.roles);
        docs(&mut out, &self.role_bindings);
        docs(&mut out, &self.config_maps);
        docs(&mut out, &self.services);
        docs(&mut out, &self.stateful_sets);
        docs(&mut out, &self.pod_disruption_budgets);
        docs(&mut out, &self.network_policies);
        docs(&mut out, &self.deployments);
        out
    }
}

/// What every builder needs from the deployment.
struct Ctx<'a> {
    dsd: &'a DeepSeekDeployment,
    name: String,
    namespace: String,
    owner: Option<OwnerReference>,
}

impl<'a> Ctx<'a> {
    fn new(dsd: &'a DeepSeekDeployment) -> Self {
        Ctx {
            dsd,
            name: dsd.name_any(),
            namespace: dsd.namespace().unwrap_or_else(|| "default".into()),
            // Without a uid (rendering offline) there is nothing to own the objects yet.
            owner: dsd.controller_owner_ref(&()),
        }
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..Default::default()
        }
    }

    fn pool_labels(&self, pool: &ResolvedPool) -> BTreeMap<String, String> {
        let mut labels = common_labels(&self.name, COMPONENT_WORKER);
        labels.insert(LABEL_POOL.into(), pool.name.clone());
        if let Some(product) = &pool.gpu_product {
            labels.insert(LABEL_GPU_PRODUCT.into(), product.clone());
        }
        labels
    }

    fn group_labels(&self, pool: &ResolvedPool, group: i32) -> BTreeMap<String, String> {
        let mut labels = self.pool_labels(pool);
        labels.insert(LABEL_GROUP.into(), group.to_string());
        labels
    }

    fn placement_config_map(&self, pool: &ResolvedPool, plan_json: String) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(
                placement_name(&self.name, &pool.name),
                self.pool_labels(pool),
            ),
            data: Some(BTreeMap::from([(PLAN_FILE.to_string(), plan_json)])),
            ..Default::default()
        }
    }

    /// Headless: gives every rank a stable DNS name for the expert-parallel transport.
    /// Not-ready addresses are published because ranks become ready only after they have
    /// found each other.
    fn group_service(&self, pool: &ResolvedPool, group: i32) -> Service {
        let name = group_name(&self.name, &pool.name, group);
        let mut ports = vec![service_port("grpc", WORKER_GRPC_PORT)];
        ports.extend(
            (0..pool.ranks_per_pod).map(|i| service_port(&ep_port_name(i), WORKER_EP_PORT + i)),
        );
        Service {
            metadata: self.meta(name, self.group_labels(pool, group)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(group_selector(&self.name, &pool.name, group)),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn group_stateful_set(&self, pool: &ResolvedPool, group: i32, revision: &str) -> StatefulSet {
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

    fn group_pdb(&self, pool: &ResolvedPool, group: i32) -> PodDisruptionBudget {
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

    /// Only the group's own ranks reach its expert-parallel ports; gRPC and metrics stay open
    /// to the namespace's clients, the router and Prometheus.
    fn group_network_policy(&self, pool: &ResolvedPool, group: i32) -> NetworkPolicy {
        let selector = label_selector(group_selector(&self.name, &pool.name, group));
        let tcp = |port: i32, end_port: Option<i32>| NetworkPolicyPort {
            protocol: Some("TCP".into()),
            port: Some(IntOrString::Int(port)),
            end_port,
        };
        let last_ep_port = WORKER_EP_PORT + pool.ranks_per_pod - 1;
        NetworkPolicy {
            metadata: self.meta(
                group_name(&self.name, &pool.name, group),
                self.group_labels(pool, group),
            ),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector.clone()),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![
                    NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(selector),
                            ..Default::default()
                        }]),
                        ports: Some(vec![tcp(
                            WORKER_EP_PORT,
                            (last_ep_port > WORKER_EP_PORT).then_some(last_ep_port),
                        )]),
                    },
                    NetworkPolicyIngressRule {
                        from: None,
                        ports: Some(vec![tcp(WORKER_GRPC_PORT, None), tcp(METRICS_PORT, None)]),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    /// The pod template of one group. `revision: None` gives the template the revision hash
    /// is computed from (group 0, no revision label).
    fn pod_template(
        &self,
        pool: &ResolvedPool,
        group: i32,
        revision: Option<&str>,
    ) -> PodTemplateSpec {
        let spec = &self.dsd.spec;
        let mut labels = self.group_labels(pool, group);
        if let Some(revision) = revision {
            labels.insert(LABEL_REVISION.into(), revision.into());
        }
        let model = self.model_volume();
        let mut volumes = vec![
            model.volume,
            Volume {
                name: "placement".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: placement_name(&self.name, &pool.name),
                    ..Default::default()
                }),
                ..Default::default()
            },
            empty_dir(
                "shm",
                Some("Memory"),
                Some(spec.worker.shm_size.clone().unwrap_or_else(|| {
                    Quantity(
                        if pool.gpu_product.is_some() {
                            "16Gi"
                        } else {
                            "1Gi"
                        }
                        .into(),
                    )
                })),
            ),
            empty_dir("tmp", None, None),
        ];
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let gpu_node_selector = pool
            .gpu_product
            .iter()
            .map(|p| (NODE_LABEL_GPU_PRODUCT.to_string(), p.clone()));
        let pool_spec = self.pool_spec(pool);
        let node_selector: BTreeMap<String, String> = gpu_node_selector
            .chain(
                pool_spec
                    .and_then(|p| p.node_selector.clone())
                    .unwrap_or_default(),
            )
            .collect();
        let tolerations = pool_spec.and_then(|p| p.tolerations.clone()).or_else(|| {
            pool.gpu_product.as_ref().map(|_| {
                vec![Toleration {
                    key: Some(GPU_RESOURCE.into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoSchedule".into()),
                    ..Default::default()
                }]
            })
        });
        let affinity = pool_spec
            .and_then(|p| p.affinity.clone())
            .unwrap_or_else(|| same_zone_affinity(group_selector(&self.name, &pool.name, group)));
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                security_context: Some(restricted_pod()),
                init_containers: model.init_container.map(|c| vec![c]),
                containers: vec![self.worker_container(pool, group, &model.path)],
                node_selector: (!node_selector.is_empty()).then_some(node_selector),
                tolerations,
                affinity: Some(affinity),
                topology_spread_constraints: Some(vec![TopologySpreadConstraint {
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
                }]),
                termination_grace_period_seconds: Some(60),
                volumes: Some(volumes),
                ..Default::default()
            }),
        }
    }

    fn worker_container(&self, pool: &ResolvedPool, group: i32, model_path: &str) -> Container {
        let spec = &self.dsd.spec;
        let group_name = group_name(&self.name, &pool.name, group);
        let peers: Vec<String> = (0..pool.group_size)
            .map(|rank| {
                let pod = rank / pool.ranks_per_pod;
                let port = WORKER_EP_PORT + rank % pool.ranks_per_pod;
                format!(
                    "{group_name}-{pod}.{group_name}.{}.svc:{port}",
                    self.namespace
                )
            })
            .collect();
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
            env_var(env::PEERS, &peers.join(",")),
            env_var(env::PLACEMENT, &format!("{PLACEMENT_MOUNT}/{PLAN_FILE}")),
            env_var(env::LISTEN, &format!("0.0.0.0:{WORKER_GRPC_PORT}")),
            env_var(env::METRICS_LISTEN, &format!("0.0.0.0:{METRICS_PORT}")),
        ];
        if pool.gpu_product.is_some() {
            // The device plugin shows a pod its own GPUs only, numbered from 0.
            env.push(env_var(env::DEVICE, "cuda:0"));
        }
        if let Some(tokens) = spec.worker.max_batch_tokens {
            env.push(env_var(env::MAX_BATCH_TOKENS, &tokens.to_string()));
        }
        if let Some(fraction) = spec.worker.kv_cache_fraction {
            env.push(env_var(env::KV_CACHE_FRACTION, &fraction.to_string()));
        }
        env.extend(spec.worker.env.clone().unwrap_or_default());

        let mut ports = vec![container_port("grpc", WORKER_GRPC_PORT)];
        ports.extend(
            (0..pool.ranks_per_pod).map(|i| container_port(&ep_port_name(i), WORKER_EP_PORT + i)),
        );
        ports.push(container_port("metrics", METRICS_PORT));

        let pool_resources = self.pool_spec(pool).and_then(|p| p.resources.clone());
        let mut resources = pool_resources
            .or_else(|| spec.worker.resources.clone())
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

        Container {
            name: "worker".into(),
            image: Some(
                spec.worker
                    .image
                    .clone()
                    .unwrap_or_else(|| default_image("deepseek-worker")),
            ),
            args: Some(vec!["serve".into()]),
            env: Some(env),
            ports: Some(ports),
            resources: Some(resources),
            // Answers as soon as the process is up; weight loading is covered by readiness.
            startup_probe: Some(grpc_probe(Some(LIVENESS_SERVICE), 10, 30)),
            liveness_probe: Some(grpc_probe(Some(LIVENESS_SERVICE), 10, 3)),
            // SERVING only with weights loaded and the group formed.
            readiness_probe: Some(grpc_probe(None, 5, 2)),
            security_context: Some(restricted()),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "model".into(),
                    mount_path: MODEL_MOUNT.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "placement".into(),
                    mount_path: PLACEMENT_MOUNT.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                volume_mount("shm", "/dev/shm"),
                volume_mount("tmp", "/tmp"),
            ]),
            ..Default::default()
        }
    }

    /// The pool's own overrides (node selector, tolerations, affinity, resources).
    fn pool_spec(&self, pool: &ResolvedPool) -> Option<&'a PoolSpec> {
        self.dsd.spec.pools.iter().find(|p| p.name == pool.name)
    }

    fn served_name(&self) -> String {
        self.dsd
            .spec
            .model
            .served_name
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }

    fn model_volume(&self) -> ModelVolume {
        let source = &self.dsd.spec.model.source;
        match (&source.pvc, &source.hugging_face) {
            (Some(pvc), _) => ModelVolume {
                volume: Volume {
                    name: "model".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: pvc.claim_name.clone(),
                        read_only: Some(true),
                    }),
                    ..Default::default()
                },
                init_container: None,
                path: join_path(MODEL_MOUNT, pvc.path.as_deref().unwrap_or("")),
            },
            (None, hf) => {
                let init = hf.as_ref().map(hf_download_container);
                ModelVolume {
                    volume: empty_dir(
                        "model",
                        None,
                        hf.as_ref().and_then(|hf| hf.cache_size.clone()),
                    ),
                    init_container: init,
                    path: format!("{MODEL_MOUNT}/model"),
                }
            }
        }
    }

    fn router(&self, out: &mut Desired) {
        let router = &self.dsd.spec.router;
        let name = router_name(&self.name);
        let labels = common_labels(&self.name, COMPONENT_ROUTER);
        out.service_accounts.push(ServiceAccount {
            metadata: self.meta(name.clone(), labels.clone()),
            automount_service_account_token: Some(true),
            ..Default::default()
        });
        // The router watches the group Services' EndpointSlices to find ranks; nothing else.
        out.roles.push(Role {
            metadata: self.meta(name.clone(), labels.clone()),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".into()]),
                resources: Some(vec!["endpointslices".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            }]),
        });
        out.role_bindings.push(RoleBinding {
            metadata: self.meta(name.clone(), labels.clone()),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.clone(),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            }]),
        });
        out.services.push(Service {
            metadata: self.meta(name.clone(), labels.clone()),
            spec: Some(ServiceSpec {
                selector: Some(router_selector(&self.name)),
                ports: Some(vec![
                    service_port("grpc", router.grpc_port),
                    service_port("http", router.http_port),
                    service_port("metrics", METRICS_PORT),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut args: Vec<String> = [
            ("--grpc-listen", format!("0.0.0.0:{}", router.grpc_port)),
            ("--http-listen", format!("0.0.0.0:{}", router.http_port)),
            ("--metrics-listen", format!("0.0.0.0:{METRICS_PORT}")),
            ("--served-name", self.served_name()),
            ("--policy", policy_name(router.policy).into()),
            ("--discover-namespace", self.namespace.clone()),
            (
                "--discover-selector",
                selector_string(&workers_selector(&self.name)),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        // Pools in preference order, with their weights.
        for pool in &self.dsd.spec.pools {
            args.extend([
                "--pool".to_string(),
                format!("{}={}", pool.name, pool.weight),
            ]);
        }
        // API keys from a Secret, mounted read-only as a file the router reads at start.
        let api_keys = router.api_keys_secret.as_ref().map(|secret| {
            args.extend([
                "--api-keys-file".to_string(),
                format!("{ROUTER_KEYS_DIR}/{ROUTER_KEYS_ENTRY}"),
            ]);
            (
                Volume {
                    name: "api-keys".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.clone()),
                        items: Some(vec![KeyToPath {
                            key: ROUTER_KEYS_ENTRY.into(),
                            path: ROUTER_KEYS_ENTRY.into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeMount {
                    name: "api-keys".into(),
                    mount_path: ROUTER_KEYS_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
            )
        });
        let container = Container {
            name: "router".into(),
            image: Some(
                router
                    .image
                    .clone()
                    .unwrap_or_else(|| default_image("deepseek-router")),
            ),
            args: Some(args),
            ports: Some(vec![
                container_port("grpc", router.grpc_port),
                container_port("http", router.http_port),
                container_port("metrics", METRICS_PORT),
            ]),
            resources: Some(
                router
                    .resources
                    .clone()
                    .unwrap_or_else(|| requests(&[("cpu", "500m"), ("memory", "256Mi")])),
            ),
            liveness_probe: Some(Probe {
                grpc: Some(GRPCAction {
                    port: router.grpc_port,
                    service: Some(LIVENESS_SERVICE.into()),
                }),
                period_seconds: Some(10),
                failure_threshold: Some(3),
                ..Default::default()
            }),
            readiness_probe: Some(Probe {
                grpc: Some(GRPCAction {
                    port: router.grpc_port,
                    service: None,
                }),
                period_seconds: Some(5),
                failure_threshold: Some(2),
                ..Default::default()
            }),
            security_context: Some(restricted()),
            volume_mounts: api_keys.as_ref().map(|(_, mount)| vec![mount.clone()]),
            ..Default::default()
        };
        let mut pod_labels = labels.clone();
        pod_labels.extend(router_selector(&self.name));
        out.deployments.push(Deployment {
            metadata: self.meta(name.clone(), labels),
            spec: Some(DeploymentSpec {
                replicas: Some(router.replicas),
                selector: label_selector(router_selector(&self.name)),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(name),
                        enable_service_links: Some(false),
                        security_context: Some(restricted_pod()),
                        containers: vec![container],
                        volumes: api_keys.map(|(volume, _)| vec![volume]),
                        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                            max_skew: 1,
                            topology_key: "kubernetes.io/hostname".into(),
                            when_unsatisfiable: "ScheduleAnyway".into(),
                            label_selector: Some(label_selector(router_selector(&self.name))),
                            match_label_keys: Some(vec!["pod-template-hash".into()]),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        });
    }
}

struct ModelVolume {
    volume: Volume,
    init_container: Option<Container>,
    /// Directory of the checkpoint inside the worker container.
    path: String,
}

/// Downloads the checkpoint into the pod's model volume before the worker starts. A stock
/// Python image plus `huggingface_hub` from PyPI keeps the worker image free of a Hub client.
fn hf_download_container(hf: &HuggingFaceSource) -> Container {
    const SCRIPT: &str = "\
import os, subprocess, sys
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-cache-dir',
                       '--target', '/tmp/pip', 'huggingface_hub>=0.30'])
sys.path.insert(0, '/tmp/pip')
from huggingface_hub import snapshot_download
snapshot_download(repo_id=os.environ['HF_REPO'], revision=os.environ['HF_REVISION'],
                  local_dir='/models/model')
";
    let mut env = vec![
        env_var("HF_REPO", &hf.repo),
        env_var("HF_REVISION", &hf.revision),
        env_var("HOME", "/tmp"),
        env_var("HF_HOME", "/tmp/hf"),
    ];
    if let Some(secret) = &hf.token_secret {
        env.push(EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    Container {
        name: "model-download".into(),
        image: Some(hf.downloader_image.clone()),
        command: Some(vec!["python3".into(), "-c".into(), SCRIPT.into()]),
        env: Some(env),
        resources: Some(requests(&[("cpu", "1"), ("memory", "2Gi")])),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![
            volume_mount("model", MODEL_MOUNT),
            volume_mount("tmp", "/tmp"),
        ]),
        ..Default::default()
    }
}

/// FNV-1a over the pod template and the placement plan: any change to what a rank runs
/// gives a new revision; scaling does not.
fn revision_hash(template: &PodTemplateSpec, plan_json: &str) -> String {
    let template_json = serde_json::to_string(template).expect("template serialises");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in template_json.bytes().chain([0]).chain(plan_json.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")[..10].to_string()
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

/// The Pod Security "restricted" pod profile; `fsGroup` makes mounted volumes writable.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Pod Security "restricted" container profile.
fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn grpc_probe(service: Option<&str>, period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: WORKER_GRPC_PORT,
            service: service.map(str::to_string),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn label_selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn ep_port_name(local_rank: i32) -> String {
    format!("ep-{local_rank}")
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn volume_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

fn empty_dir(name: &str, medium: Option<&str>, size_limit: Option<Quantity>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_string),
            size_limit,
        }),
        ..Default::default()
    }
}

fn requests(pairs: &[(&str, &str)]) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn join_path(base: &str, sub: &str) -> String {
    let sub = sub.trim_matches('/');
    if sub.is_empty() {
        base.to_string()
    } else {
        format!("{base}/{sub}")
    }
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Auto => "auto",
        Dtype::Fp8 => "fp8",
        Dtype::Bf16 => "bf16",
    }
}

fn policy_name(policy: RoutingPolicy) -> &'static str {
    match policy {
        RoutingPolicy::LeastLoad => "least-load",
        RoutingPolicy::PrefixAffinity => "prefix-affinity",
        RoutingPolicy::Weighted => "weighted",
    }
}
