//! Pure builders: a `DeepSeekDeployment` in, the Kubernetes objects that realise it out.
//!
//! Per pool × group: a StatefulSet of ranks and its PodDisruptionBudget (`workers`), its
//! headless Service (peer discovery) and NetworkPolicy (`network`). Per pool: the placement
//! ConfigMap (`placement`). Per deployment: the router Deployment, Service and its discovery
//! RBAC (`router`), and for a `huggingFace` source the model cache claim and the Job that
//! downloads into it (`model`). Nothing here does I/O.

mod k8s;
pub mod model;
mod network;
mod placement;
mod router;
mod workers;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PodTemplateSpec, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::{DeepSeekDeployment, Dtype, Endpoints};
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
    /// The model cache of a `huggingFace` source (created once, never updated).
    pub model_cache: Option<ModelCache>,
    /// No group objects: the first download has not finished. The groups that exist (from
    /// before the operator managed a cache) are left as they are.
    pub groups_wait_for_model: bool,
}

/// The spec revision's model cache claim and the Job that fills it.
#[derive(Clone, Debug)]
pub struct ModelCache {
    pub claim: PersistentVolumeClaim,
    pub job: Job,
}

/// Which claim the workers of a `huggingFace` source mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ModelMount {
    /// The spec revision's cache: its download succeeded (or, offline, is assumed to).
    #[default]
    Wanted,
    /// This earlier revision's cache, which the groups keep while the spec's downloads.
    Previous(String),
    /// None yet: groups wait for the first download.
    NotYet,
}

/// Tokens routed to each expert: layer → count per expert.
pub type ExpertLoad = BTreeMap<u32, Vec<u64>>;

/// What the builders take from the running operator rather than from the spec.
#[derive(Clone, Debug, Default)]
pub struct Surroundings {
    /// Measured tokens per layer and expert: each pool's placement is balanced by it
    /// (layers without data stay round-robin).
    pub expert_load: ExpertLoad,
    /// Whose pods may scrape worker metrics when the spec does not say
    /// (`spec.metricsFrom`).
    pub metrics_namespace: Option<String>,
    /// Pools found full, by name: the groups each holds (`status::full_pools`).
    pub full_pools: BTreeMap<String, i32>,
    /// Which model cache the workers mount (`model_cache::state`).
    pub model_mount: ModelMount,
}

impl DeepSeekDeployment {
    /// The objects that realise this deployment, or why it cannot be realised, with
    /// round-robin expert placement.
    pub fn desired(&self) -> Result<Desired, SpecError> {
        self.desired_in(&Surroundings::default())
    }

    /// Like `desired`, with what the running operator knows.
    pub fn desired_in(&self, surroundings: &Surroundings) -> Result<Desired, SpecError> {
        let load = &surroundings.expert_load;
        let pools = resolve::resolve(self, &surroundings.full_pools)?;
        let mut ctx = Ctx::new(self);
        ctx.metrics_namespace = surroundings.metrics_namespace.clone();
        ctx.model_mount = surroundings.model_mount.clone();
        let mut out = Desired {
            model_cache: ctx.model_cache(),
            groups_wait_for_model: ctx.model_mount == ModelMount::NotYet,
            ..Default::default()
        };
        for pool in pools {
            let plan_json = ctx.placement_plan_json(&pool, load);
            let revision = revision_hash(&ctx.pod_template(&pool, 0, None), &plan_json);
            out.config_maps
                .push(ctx.placement_config_map(&pool, plan_json));
            let groups = if out.groups_wait_for_model {
                0
            } else {
                pool.replicas
            };
            for group in 0..groups {
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
            http: format!(
                "{}://{router}.{ns}.svc:{}",
                if self.spec.router.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                self.spec.router.http_port
            ),
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
        if let Some(cache) = &self.model_cache {
            docs(&mut out, std::slice::from_ref(&cache.claim));
            docs(&mut out, std::slice::from_ref(&cache.job));
        }
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

/// What every builder needs from the deployment. The builders are `Ctx` methods, one
/// submodule per kind of object.
struct Ctx<'a> {
    dsd: &'a DeepSeekDeployment,
    name: String,
    namespace: String,
    owner: Option<OwnerReference>,
    metrics_namespace: Option<String>,
    model_mount: ModelMount,
}

impl<'a> Ctx<'a> {
    fn new(dsd: &'a DeepSeekDeployment) -> Self {
        Ctx {
            dsd,
            name: dsd.name_any(),
            namespace: dsd.namespace().unwrap_or_else(|| "default".into()),
            // Without a uid (rendering offline) there is nothing to own the objects yet.
            owner: dsd.controller_owner_ref(&()),
            metrics_namespace: None,
            model_mount: ModelMount::default(),
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

    fn served_name(&self) -> String {
        self.dsd
            .spec
            .model
            .served_name
            .clone()
            .unwrap_or_else(|| self.name.clone())
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

/// The name of a rank's expert-parallel port, on the Service and the container alike.
fn ep_port_name(local_rank: i32) -> String {
    format!("ep-{local_rank}")
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Auto => "auto",
        Dtype::Fp8 => "fp8",
        Dtype::Bf16 => "bf16",
    }
}
