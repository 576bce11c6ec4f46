//! The router: a Deployment behind a Service, with just enough RBAC to discover the
//! workers' EndpointSlices.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, KeyToPath, PodSpec, PodTemplateSpec, SecretVolumeSource, Service, ServiceAccount,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::k8s::{
    container_port, http_probe, label_selector, read_only_mount, requests, restricted,
    restricted_pod, service_port,
};
use super::{Ctx, Desired};
use crate::api::RoutingPolicy;
use crate::names::*;

impl Ctx<'_> {
    pub(super) fn router(&self, out: &mut Desired) {
        let name = router_name(&self.name);
        let labels = common_labels(&self.name, COMPONENT_ROUTER);
        out.service_accounts.push(ServiceAccount {
            metadata: self.meta(name.clone(), labels.clone()),
            automount_service_account_token: Some(true),
            ..Default::default()
        });
        out.roles.push(self.router_role(&name, &labels));
        out.role_bindings
            .push(self.router_role_binding(&name, &labels));
        out.services.push(self.router_service(&name, &labels));
        out.deployments.push(self.router_deployment(name, labels));
    }

    /// The router watches the group Services' EndpointSlices to find ranks; nothing else.
    fn router_role(&self, name: &str, labels: &BTreeMap<String, String>) -> Role {
        Role {
            metadata: self.meta(name.into(), labels.clone()),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".into()]),
                resources: Some(vec!["endpointslices".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            }]),
        }
    }

    fn router_role_binding(&self, name: &str, labels: &BTreeMap<String, String>) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(name.into(), labels.clone()),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.into(),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            }]),
        }
    }

    fn router_service(&self, name: &str, labels: &BTreeMap<String, String>) -> Service {
        let router = &self.dsd.spec.router;
        Service {
            metadata: self.meta(name.into(), labels.clone()),
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
        }
    }

    fn router_deployment(&self, name: String, labels: BTreeMap<String, String>) -> Deployment {
        let router = &self.dsd.spec.router;
        let secrets: Vec<(Volume, VolumeMount)> = [
            router.api_keys_secret.as_deref().map(|secret| {
                secret_volume("api-keys", secret, &[ROUTER_KEYS_ENTRY], ROUTER_KEYS_DIR)
            }),
            router.tls.as_ref().map(|tls| {
                let entries = [TLS_CERT_ENTRY, TLS_KEY_ENTRY];
                secret_volume("tls", &tls.secret_name, &entries, ROUTER_TLS_DIR)
            }),
            self.dsd
                .spec
                .worker_tls
                .as_ref()
                .map(|tls| worker_tls_volume(&tls.secret(&self.name))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let container = self.router_container(secrets.iter().map(|(_, m)| m.clone()).collect());
        let volumes: Vec<Volume> = secrets.into_iter().map(|(volume, _)| volume).collect();
        let mut pod_labels = labels.clone();
        pod_labels.extend(router_selector(&self.name));
        Deployment {
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
                        volumes: (!volumes.is_empty()).then_some(volumes),
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
        }
    }

    /// `mounts`: the Secrets it reads (API keys, its certificate).
    fn router_container(&self, mounts: Vec<VolumeMount>) -> Container {
        let router = &self.dsd.spec.router;
        let mut args = self.router_args();
        if router.api_keys_secret.is_some() {
            args.extend([
                "--api-keys-file".to_string(),
                format!("{ROUTER_KEYS_DIR}/{ROUTER_KEYS_ENTRY}"),
            ]);
        }
        if self.dsd.spec.worker_tls.is_some() {
            for (flag, entry) in [
                ("--worker-tls-ca", TLS_CA_ENTRY),
                ("--worker-tls-cert", TLS_CERT_ENTRY),
                ("--worker-tls-key", TLS_KEY_ENTRY),
            ] {
                args.extend([flag.to_string(), format!("{WORKER_TLS_DIR}/{entry}")]);
            }
        }
        if router.tls.is_some() {
            args.extend([
                "--tls-cert".to_string(),
                format!("{ROUTER_TLS_DIR}/{TLS_CERT_ENTRY}"),
                "--tls-key".to_string(),
                format!("{ROUTER_TLS_DIR}/{TLS_KEY_ENTRY}"),
            ]);
        }
        Container {
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
            // On the plaintext metrics port: the kubelet's gRPC probes speak no TLS.
            liveness_probe: Some(http_probe(METRICS_PORT, "/health", 10, 3)),
            readiness_probe: Some(http_probe(METRICS_PORT, "/ready", 5, 2)),
            security_context: Some(restricted()),
            volume_mounts: (!mounts.is_empty()).then_some(mounts),
            ..Default::default()
        }
    }

    /// Listen addresses, what to serve and how to route, where to discover workers, and the
    /// pools in preference order with their weights; with autoscaling, how long to hold a
    /// request while no group serves.
    fn router_args(&self) -> Vec<String> {
        let router = &self.dsd.spec.router;
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
        for pool in &self.dsd.spec.pools {
            args.extend([
                "--pool".to_string(),
                format!("{}={}", pool.name, pool.weight),
            ]);
        }
        if let Some(autoscaling) = &self.dsd.spec.autoscaling {
            args.extend([
                "--hold-for-backend-seconds".to_string(),
                autoscaling.hold_requests_seconds.to_string(),
            ]);
        }
        if let Some(tracing) = &self.dsd.spec.tracing {
            args.extend(["--otlp-endpoint".to_string(), tracing.otlp_endpoint.clone()]);
        }
        args
    }
}

/// API keys from a Secret, mounted read-only as a file the router reads at start.
/// `spec.workerTls`'s Secret, as the router and the workers mount it.
pub(super) fn worker_tls_volume(secret: &str) -> (Volume, VolumeMount) {
    let entries = [TLS_CA_ENTRY, TLS_CERT_ENTRY, TLS_KEY_ENTRY];
    secret_volume("worker-tls", secret, &entries, WORKER_TLS_DIR)
}

/// The Secret's `entries`, mounted read-only at `dir` (so a renewed Secret shows there).
fn secret_volume(volume: &str, secret: &str, entries: &[&str], dir: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(
                    entries
                        .iter()
                        .map(|entry| KeyToPath {
                            key: entry.to_string(),
                            path: entry.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        },
        read_only_mount(volume, dir),
    )
}

fn policy_name(policy: RoutingPolicy) -> &'static str {
    match policy {
        RoutingPolicy::LeastLoad => "least-load",
        RoutingPolicy::PrefixAffinity => "prefix-affinity",
        RoutingPolicy::CacheAware => "cache-aware",
        RoutingPolicy::Weighted => "weighted",
    }
}
