//! A group's network objects: the headless Service its ranks find each other through, and
//! the NetworkPolicy that keeps the expert-parallel ports to the group and gRPC to the
//! router.

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::k8s::{label_selector, service_port};
use super::{Ctx, ep_port_name};
use crate::names::*;
use crate::resolve::ResolvedPool;

impl Ctx<'_> {
    /// Headless: gives every rank a stable DNS name for the expert-parallel transport.
    /// Not-ready addresses are published because ranks become ready only after they have
    /// found each other.
    pub(super) fn group_service(&self, pool: &ResolvedPool, group: i32) -> Service {
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

    /// Only the group's own ranks reach its expert-parallel ports, and only this deployment's
    /// router its gRPC port, so no client skips the router's API keys and admission limit
    /// (the kubelet's probes come from the node, which policies do not govern); metrics only
    /// from `spec.metricsFrom`, else the operator's namespace (where the chart puts its
    /// monitors), else this deployment's.
    pub(super) fn group_network_policy(&self, pool: &ResolvedPool, group: i32) -> NetworkPolicy {
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
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(label_selector(router_selector(&self.name))),
                            ..Default::default()
                        }]),
                        ports: Some(vec![tcp(WORKER_GRPC_PORT, None)]),
                    },
                    NetworkPolicyIngressRule {
                        from: Some(self.metrics_peers()),
                        ports: Some(vec![tcp(METRICS_PORT, None)]),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn metrics_peers(&self) -> Vec<NetworkPolicyPeer> {
        if let Some(peers) = &self.dsd.spec.metrics_from {
            return peers.clone();
        }
        let peer = match &self.metrics_namespace {
            Some(namespace) => NetworkPolicyPeer {
                namespace_selector: Some(label_selector(labels(&[(
                    NAMESPACE_NAME_LABEL,
                    namespace,
                )]))),
                ..Default::default()
            },
            // Every pod of this namespace.
            None => NetworkPolicyPeer {
                pod_selector: Some(Default::default()),
                ..Default::default()
            },
        };
        vec![peer]
    }
}
