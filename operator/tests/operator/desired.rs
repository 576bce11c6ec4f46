//! The pure builders: spec in, objects out.

use std::collections::BTreeMap;

use deepseek_operator::api::{DeepSeekDeployment, Dtype};
use deepseek_operator::desired::{Desired, ModelMount, Surroundings};
use deepseek_operator::names::*;
use deepseek_operator::resolve::pool_replicas;
use deepseek_proto::placement::{PLAN_FILE, PlacementPlan};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::ResourceExt;

use crate::fixtures::*;

fn desired(dsd: &DeepSeekDeployment) -> Desired {
    dsd.desired().expect("sample is realisable")
}

fn pod_spec(sts: &StatefulSet) -> &PodSpec {
    sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

/// The router Deployment's pod.
fn router_pod(d: &Desired) -> &PodSpec {
    let router = d.deployments[0].spec.as_ref().unwrap();
    router.template.spec.as_ref().unwrap()
}

fn worker(sts: &StatefulSet) -> &Container {
    &pod_spec(sts).containers[0]
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

fn sts<'a>(desired: &'a Desired, name: &str) -> &'a StatefulSet {
    desired
        .stateful_sets
        .iter()
        .find(|s| s.name_any() == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn golden_tiny() {
    assert_golden(
        "operator/tests/golden/tiny.yaml",
        &desired(&tiny()).to_yaml(),
    );
}

#[test]
fn golden_deepseek_v3_two_pools() {
    assert_golden(
        "operator/tests/golden/deepseek-v3-h100-a100.yaml",
        &desired(&v3()).to_yaml(),
    );
}

#[test]
fn one_statefulset_per_pool_and_group_with_ranks_as_pods() {
    let d = desired(&v3());
    let names: Vec<String> = d.stateful_sets.iter().map(|s| s.name_any()).collect();
    assert_eq!(
        names,
        [
            "deepseek-v3-h100-g0",
            "deepseek-v3-h100-g1",
            "deepseek-v3-a100-g0"
        ]
    );
    let h100 = sts(&d, "deepseek-v3-h100-g1");
    let spec = h100.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(4));
    assert_eq!(spec.service_name.as_deref(), Some("deepseek-v3-h100-g1"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    assert_eq!(
        sts(&d, "deepseek-v3-a100-g0")
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(8)
    );
    // each group has its headless Service, PDB and NetworkPolicy of the same name
    for name in &names {
        assert!(d.services.iter().any(|s| &s.name_any() == name));
        assert!(
            d.pod_disruption_budgets
                .iter()
                .any(|p| &p.name_any() == name)
        );
        assert!(d.network_policies.iter().any(|p| &p.name_any() == name));
    }
}

#[test]
fn gpu_pods_request_their_gpus_on_the_right_nodes() {
    let d = desired(&v3());
    let h100 = sts(&d, "deepseek-v3-h100-g0");
    let spec = pod_spec(h100);
    assert_eq!(
        spec.node_selector.as_ref().unwrap()[NODE_LABEL_GPU_PRODUCT],
        "NVIDIA-H100-80GB-HBM3"
    );
    let resources = worker(h100).resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()[GPU_RESOURCE].0, "8");
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "512Gi");
    assert_eq!(
        spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some(GPU_RESOURCE)
    );
    // the a100 pool brings its own tolerations
    let a100 = pod_spec(sts(&d, "deepseek-v3-a100-g0"));
    assert_eq!(a100.tolerations.as_ref().unwrap().len(), 2);
    let spread = &spec.topology_spread_constraints.as_ref().unwrap()[0];
    assert_eq!(spread.topology_key, "kubernetes.io/hostname");
    assert_eq!(spread.when_unsatisfiable, "DoNotSchedule");
    assert_eq!(
        spread.match_label_keys.as_deref(),
        Some(&[LABEL_REVISION.to_string()][..])
    );
}

#[test]
fn auto_dtype_is_fp8_weights_on_hopper_and_on_ampere() {
    let d = desired(&v3());
    for group in ["deepseek-v3-h100-g0", "deepseek-v3-a100-g0"] {
        assert_eq!(env(worker(sts(&d, group)), "DSD_DTYPE"), Some("fp8"));
    }
    let pools: Vec<Dtype> = d.pools.iter().map(|(p, _)| p.dtype).collect();
    assert_eq!(pools, [Dtype::Fp8, Dtype::Fp8]);
}

#[test]
fn ranks_find_their_peers_through_the_headless_service() {
    let d = desired(&v3());
    let w = worker(sts(&d, "deepseek-v3-h100-g1"));
    assert_eq!(env(w, "DSD_GROUP_SIZE"), Some("32"));
    assert_eq!(env(w, "DSD_RANKS_PER_POD"), Some("8"));
    let peers: Vec<&str> = env(w, "DSD_PEERS").unwrap().split(',').collect();
    assert_eq!(peers.len(), 32);
    assert_eq!(
        peers[0],
        "deepseek-v3-h100-g1-0.deepseek-v3-h100-g1.inference.svc:50061"
    );
    assert_eq!(
        peers[9],
        "deepseek-v3-h100-g1-1.deepseek-v3-h100-g1.inference.svc:50062"
    );
    let pod_index = w
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "DSD_POD_INDEX")
        .unwrap();
    let field = &pod_index
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap()
        .field_path;
    assert_eq!(field, "metadata.labels['apps.kubernetes.io/pod-index']");
    let service = d
        .services
        .iter()
        .find(|s| s.name_any() == "deepseek-v3-h100-g1")
        .unwrap();
    let spec = service.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.ports.as_ref().unwrap().len(), 9);
}

#[test]
fn pods_run_restricted_with_grpc_probes_and_shared_memory() {
    let d = desired(&v3());
    let group = sts(&d, "deepseek-v3-h100-g0");
    let spec = pod_spec(group);
    let pod_security = spec.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for container in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{}",
            container.name
        );
        assert_eq!(
            security.read_only_root_filesystem,
            Some(true),
            "{}",
            container.name
        );
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
    }
    let w = worker(group);
    let readiness = w.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
    assert_eq!(
        (readiness.port, readiness.service.as_deref()),
        (WORKER_GRPC_PORT, None)
    );
    let liveness = w.liveness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
    assert_eq!(liveness.service.as_deref(), Some(LIVENESS_SERVICE));
    let shm = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "shm")
        .unwrap();
    let shm = shm.empty_dir.as_ref().unwrap();
    assert_eq!(
        (
            shm.medium.as_deref(),
            shm.size_limit.as_ref().map(|q| q.0.as_str())
        ),
        (Some("Memory"), Some("32Gi"))
    );
    assert!(
        w.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/dev/shm")
    );
}

#[test]
fn hugging_face_models_download_once_per_revision_into_a_claim_the_workers_mount() {
    let dsd = v3();
    let d = desired(&dsd);
    let cache = d.model_cache.as_ref().unwrap();
    let name = cache.claim.metadata.name.clone().unwrap();
    assert!(name.starts_with("deepseek-v3-model-"), "{name}");
    assert_eq!(cache.job.metadata.name.as_deref(), Some(name.as_str()));
    let claim = cache.claim.spec.as_ref().unwrap();
    assert_eq!(claim.access_modes, Some(vec!["ReadWriteMany".to_string()]));
    assert_eq!(
        claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "800Gi"
    );

    // The Job runs the worker image's downloader into the claim, with the token secret.
    let job = cache.job.spec.as_ref().unwrap();
    let pod = job.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let download = &pod.containers[0];
    assert_eq!(
        download.image,
        pod_spec(sts(&d, "deepseek-v3-h100-g0")).containers[0].image
    );
    assert_eq!(
        download.args.as_ref().unwrap()[..7].join(" "),
        "download --repo deepseek-ai/DeepSeek-V3 --revision main --dir /models/checkpoint"
    );
    let token = download
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .unwrap();
    let secret = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("hf-token", "token")
    );

    // The workers mount it read-only, with no download of their own.
    let spec = pod_spec(sts(&d, "deepseek-v3-h100-g0"));
    assert!(spec.init_containers.is_none());
    assert_eq!(model_claim(spec), (name.as_str(), true));
    assert_eq!(
        env(&spec.containers[0], "DSD_MODEL"),
        Some("/models/checkpoint")
    );

    // Another revision is another cache.
    let mut next = dsd.clone();
    next.spec
        .model
        .source
        .hugging_face
        .as_mut()
        .unwrap()
        .revision = "v3.1".into();
    let next_name = desired(&next)
        .model_cache
        .unwrap()
        .claim
        .metadata
        .name
        .unwrap();
    assert_ne!(next_name, name);

    // While it downloads, the groups keep the claim they mount.
    let keep = next
        .desired_in(&Surroundings {
            model_mount: ModelMount::Previous(name.clone()),
            ..Default::default()
        })
        .unwrap();
    let spec = pod_spec(sts(&keep, "deepseek-v3-h100-g0"));
    assert_eq!(model_claim(spec), (name.as_str(), true));

    // At the first download there are no groups yet, but the pools and the router are there.
    let waiting = dsd
        .desired_in(&Surroundings {
            model_mount: ModelMount::NotYet,
            ..Default::default()
        })
        .unwrap();
    assert!(waiting.groups_wait_for_model && waiting.stateful_sets.is_empty());
    assert_eq!(waiting.pools.len(), 2);
    assert!(waiting.model_cache.is_some() && !waiting.deployments.is_empty());
}

fn model_claim(spec: &PodSpec) -> (&str, bool) {
    let claim = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "model")
        .unwrap()
        .persistent_volume_claim
        .as_ref()
        .unwrap();
    (claim.claim_name.as_str(), claim.read_only == Some(true))
}

#[test]
fn pvc_models_mount_read_only_at_their_path() {
    let d = desired(&tiny());
    let spec = pod_spec(sts(&d, "tiny-cpu-g0"));
    assert!(spec.init_containers.is_none());
    let model = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "model")
        .unwrap();
    let claim = model.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("tiny-model", Some(true))
    );
    assert_eq!(
        env(&spec.containers[0], "DSD_MODEL"),
        Some("/models/demo-v3")
    );
    // a CPU pool asks for no GPUs and may share nodes
    let resources = spec.containers[0].resources.as_ref().unwrap();
    assert!(
        resources
            .limits
            .as_ref()
            .unwrap()
            .get(GPU_RESOURCE)
            .is_none()
    );
    assert!(spec.node_selector.is_none());
    assert_eq!(
        spec.topology_spread_constraints.as_ref().unwrap()[0].when_unsatisfiable,
        "ScheduleAnyway"
    );
}

#[test]
fn only_group_members_reach_the_expert_parallel_ports_and_only_the_router_grpc() {
    let d = desired(&v3());
    let policy = d
        .network_policies
        .iter()
        .find(|p| p.name_any() == "deepseek-v3-h100-g0")
        .unwrap();
    let spec = policy.spec.as_ref().unwrap();
    let group = group_selector("deepseek-v3", "h100", 0);
    assert_eq!(
        spec.pod_selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&group)
    );
    let rules = spec.ingress.as_ref().unwrap();
    let ep = &rules[0];
    assert_eq!(
        ep.from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref(),
        Some(&group)
    );
    let port = &ep.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.port.clone(), port.end_port),
        (
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50061)),
            Some(50068)
        )
    );
    // gRPC only from this deployment's router; metrics from anywhere
    let only = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        let ports: Vec<_> = rule
            .ports
            .iter()
            .flatten()
            .map(|p| p.port.clone())
            .collect();
        let from = rule.from.as_ref().map(|peers| {
            peers[0]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .clone()
                .unwrap()
        });
        (ports, from)
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int;
    assert_eq!(
        only(&rules[1]),
        (vec![Some(Int(50051))], Some(router_selector("deepseek-v3")))
    );
    assert_eq!(rules[2].ports.as_ref().unwrap()[0].port, Some(Int(9090)));
    assert_eq!(rules.len(), 3);
}

#[test]
fn metrics_come_from_the_spec_else_the_operators_namespace_else_this_one() {
    use deepseek_operator::desired::Surroundings;
    use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
    let metrics_peers = |dsd: &DeepSeekDeployment, surroundings: &Surroundings| {
        let d = dsd.desired_in(surroundings).unwrap();
        let spec = d.network_policies[0].spec.clone().unwrap();
        serde_json::to_value(&spec.ingress.unwrap()[2].from).unwrap()
    };
    let offline = metrics_peers(&v3(), &Surroundings::default());
    assert_eq!(offline, serde_json::json!([{"podSelector": {}}]));
    let in_cluster = Surroundings {
        metrics_namespace: Some("monitoring".into()),
        ..Default::default()
    };
    assert_eq!(
        metrics_peers(&v3(), &in_cluster),
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
    let mut chosen = v3();
    let prometheus: NetworkPolicyPeer = serde_json::from_value(serde_json::json!({
        "namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "prometheus"}}
    }))
    .unwrap();
    chosen.spec.metrics_from = Some(vec![prometheus]);
    assert_eq!(
        metrics_peers(&chosen, &in_cluster),
        serde_json::json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "prometheus"}}}])
    );
}

#[test]
fn every_object_is_owned_and_labelled() {
    let d = desired(&v3());
    let yaml = d.to_yaml();
    let docs: Vec<serde_yaml::Value> = yaml
        .split("---\n")
        .filter(|s| !s.trim().is_empty())
        .map(|s| serde_yaml::from_str(s).unwrap())
        .collect();
    assert_eq!(docs.len(), 2 + 3 + 2 + 3 * 4 + 1 + 1);
    for doc in &docs {
        let meta = &doc["metadata"];
        let owner = &meta["ownerReferences"][0];
        assert_eq!(
            owner["kind"],
            "DeepSeekDeployment",
            "{}",
            meta["name"].as_str().unwrap()
        );
        assert_eq!(owner["controller"], true);
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(meta["labels"][LABEL_DEPLOYMENT], "deepseek-v3");
        assert_eq!(meta["namespace"], "inference");
    }
}

#[test]
fn placement_plans_match_the_group_with_redundant_experts() {
    let d = desired(&v3());
    let cm = d
        .config_maps
        .iter()
        .find(|c| c.name_any() == "deepseek-v3-a100-placement")
        .unwrap();
    let plan = PlacementPlan::from_json(&cm.data.as_ref().unwrap()[PLAN_FILE]).unwrap();
    assert_eq!((plan.group_size, plan.routed_experts), (64, 256));
    let copies: usize = plan.default.iter().map(Vec::len).sum();
    assert_eq!(copies, 256 + 32);
    // 288 copies over 64 ranks: four or five each
    assert!((0..64).all(|rank| (4..=5).contains(&plan.experts_on_rank(0, rank).len())));
}

#[test]
fn scaling_a_pool_adds_groups_without_a_new_revision() {
    let before = desired(&v3());
    let mut dsd = v3();
    dsd.spec.pools[0].replicas = 3;
    let after = desired(&dsd);
    assert_eq!(after.stateful_sets.len(), before.stateful_sets.len() + 1);
    assert!(
        after
            .stateful_sets
            .iter()
            .any(|s| s.name_any() == "deepseek-v3-h100-g2")
    );
    assert_eq!(after.pools[0].1, before.pools[0].1);
}

#[test]
fn changing_the_model_rolls_a_new_revision() {
    let before = desired(&v3());
    let dsd = v3_at_revision("9f3c1d2");
    let after = desired(&dsd);
    for ((_, old), (_, new)) in before.pools.iter().zip(&after.pools) {
        assert_ne!(old, new);
    }
    let template = after.stateful_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    assert_eq!(
        template.labels.as_ref().unwrap()[LABEL_REVISION],
        after.pools[0].1
    );
    // a change to one pool leaves the other's revision alone
    let mut dsd = v3();
    dsd.spec.pools[1].resources = Some(Default::default());
    let changed = desired(&dsd);
    assert_eq!(changed.pools[0].1, before.pools[0].1);
    assert_ne!(changed.pools[1].1, before.pools[1].1);
}

#[test]
fn total_replicas_fill_pools_by_weight_within_bounds_and_spill_from_full_pools() {
    let pools = v3().spec.pools; // h100 min 1 max 8, a100 min 0 max 4
    let none = BTreeMap::new();
    assert_eq!(pool_replicas(None, &pools, &none), [2, 1]);
    assert_eq!(pool_replicas(Some(0), &pools, &none), [1, 0]);
    assert_eq!(pool_replicas(Some(5), &pools, &none), [5, 0]);
    assert_eq!(pool_replicas(Some(10), &pools, &none), [8, 2]);
    assert_eq!(pool_replicas(Some(99), &pools, &none), [8, 4]);
    // The highest weight fills first, whatever the list order.
    let reversed: Vec<_> = pools.iter().rev().cloned().collect();
    assert_eq!(pool_replicas(Some(10), &reversed, &none), [2, 8]);
    // A full pool holds what it holds; the rest spills to the next.
    let h100_full = BTreeMap::from([("h100".to_string(), 3)]);
    assert_eq!(pool_replicas(Some(5), &pools, &h100_full), [3, 2]);
    assert_eq!(pool_replicas(Some(99), &pools, &h100_full), [3, 4]);
    // Never below a pool's minimum.
    let h100_empty = BTreeMap::from([("h100".to_string(), 0)]);
    assert_eq!(pool_replicas(Some(3), &pools, &h100_empty), [1, 2]);
    let mut dsd = v3();
    dsd.spec.replicas = Some(10);
    let counts: Vec<i32> = desired(&dsd)
        .pools
        .iter()
        .map(|(p, _)| p.replicas)
        .collect();
    assert_eq!(counts, [8, 2]);
}

#[test]
fn unrealisable_specs_name_the_field() {
    let mut dsd = v3();
    dsd.spec.pools[1].gpu_product = Some("NVIDIA-V100-SXM2-16GB".into());
    let err = dsd.desired().unwrap_err();
    assert_eq!(err.reason(), "UnknownGpuProduct");
    assert!(
        err.to_string().starts_with(
            "spec.pools[a100].gpuProduct: unknown GPU product \"NVIDIA-V100-SXM2-16GB\""
        )
    );

    let mut dsd = v3();
    dsd.spec.parallelism.expert_parallel_ranks = Some(12);
    dsd.spec.pools[0].pods_per_group = None;
    let err = dsd.desired().unwrap_err().to_string();
    assert!(
        err.contains("expertParallelRanks = 12 is not divisible by gpusPerPod = 8"),
        "{err}"
    );

    let mut dsd = v3();
    dsd.spec.parallelism.expert_parallel_ranks = Some(16);
    assert!(
        dsd.desired()
            .unwrap_err()
            .to_string()
            .contains("podsPerGroup × gpusPerPod = 4 × 8 differs")
    );

    let mut dsd = tiny();
    dsd.spec.model.architecture = None;
    dsd.spec.model.routed_experts = None;
    assert_eq!(dsd.desired().unwrap_err().reason(), "UnknownExpertCount");

    let mut dsd = tiny();
    dsd.spec.pools.push(dsd.spec.pools[0].clone());
    assert!(
        dsd.desired()
            .unwrap_err()
            .to_string()
            .contains("\"cpu\" is used twice")
    );
}

#[test]
fn measured_expert_load_balances_each_pools_plan_and_rolls_the_groups() {
    let mut dsd = v3();
    // 288 copies: nine on each of the h100 pool's 32 ranks.
    dsd.spec.parallelism.redundant_experts = 32;
    let plan_of = |d: &deepseek_operator::desired::Desired| {
        let data = d.config_maps[0].data.as_ref().unwrap();
        deepseek_proto::placement::PlacementPlan::from_json(data.values().next().unwrap()).unwrap()
    };
    let round_robin = desired(&dsd);
    // Layer 3: expert 7 takes a fifth of all tokens.
    let mut counts = vec![100u64; 256];
    counts[7] = 6400;
    let load = std::collections::BTreeMap::from([(3u32, counts.clone())]);
    let balanced = dsd
        .desired_in(&deepseek_operator::desired::Surroundings {
            expert_load: load.clone(),
            ..Default::default()
        })
        .unwrap();
    let plan = plan_of(&balanced);
    assert!(plan.layer(3)[7].len() > 1, "the hot expert has copies");
    let per_rank = plan.rank_loads(3, &counts);
    let mean = per_rank.iter().sum::<f64>() / per_rank.len() as f64;
    assert!(per_rank.iter().all(|&l| l < 1.1 * mean), "{per_rank:?}");
    assert_eq!(plan_of(&round_robin).layers.len(), 0);
    // A new plan is a new revision: the groups roll.
    assert_ne!(balanced.pools[0].1, round_robin.pools[0].1);
}

#[test]
fn an_api_keys_secret_is_mounted_and_passed_to_the_router() {
    let mut dsd = v3();
    dsd.spec.router.api_keys_secret = Some("deepseek-api-keys".into());
    let d = desired(&dsd);
    let pod = router_pod(&d);
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap().join(" ");
    assert!(
        args.contains("--api-keys-file /etc/deepseek-router/api-keys"),
        "{args}"
    );
    let mount = &container.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/deepseek-router", Some(true))
    );
    let secret = pod.volumes.as_ref().unwrap()[0].secret.clone().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("deepseek-api-keys"));
    assert_eq!(secret.items.unwrap()[0].key, "api-keys");
    // Without the field the router takes no keys and mounts nothing.
    assert!(router_pod(&desired(&v3())).volumes.is_none());
}

#[test]
fn a_tls_secret_makes_the_router_serve_tls_beside_its_keys_with_http_probes() {
    let mut dsd = v3();
    dsd.spec.router.api_keys_secret = Some("deepseek-api-keys".into());
    dsd.spec.router.tls = Some(deepseek_operator::api::RouterTls {
        secret_name: "deepseek-router-cert".into(),
    });
    let d = desired(&dsd);
    let pod = router_pod(&d);
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap().join(" ");
    assert!(
        args.contains(
            "--tls-cert /etc/deepseek-router-tls/tls.crt --tls-key /etc/deepseek-router-tls/tls.key"
        ),
        "{args}"
    );
    let mounts: Vec<(&str, &str)> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("api-keys", "/etc/deepseek-router"),
            ("tls", "/etc/deepseek-router-tls")
        ]
    );
    let tls = pod.volumes.as_ref().unwrap()[1].secret.clone().unwrap();
    assert_eq!(tls.secret_name.as_deref(), Some("deepseek-router-cert"));
    let entries: Vec<String> = tls.items.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(entries, ["tls.crt", "tls.key"]);
    // The kubelet's gRPC probes speak no TLS: the probes use the plaintext metrics port.
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.clone().unwrap();
        (get.path.unwrap(), get.port)
    };
    let metrics = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9090);
    assert_eq!(
        probe(&container.readiness_probe),
        ("/ready".into(), metrics.clone())
    );
    assert_eq!(
        probe(&container.liveness_probe),
        ("/health".into(), metrics)
    );
    assert_eq!(
        dsd.endpoints().http,
        "https://deepseek-v3-router.inference.svc:8000"
    );
}

#[test]
fn worker_tls_mounts_one_secret_in_router_and_workers_and_probes_the_plaintext_health_port() {
    let mut dsd = v3();
    dsd.spec.worker_tls = Some(deepseek_operator::api::WorkerTls {
        secret_name: Some("deepseek-v3-mtls".into()),
    });
    let d = desired(&dsd);
    let dir = "/etc/deepseek-worker-tls";
    let router = &router_pod(&d).containers[0];
    let args = router.args.clone().unwrap().join(" ");
    assert!(
        args.contains(&format!(
            "--worker-tls-ca {dir}/ca.crt --worker-tls-cert {dir}/tls.crt --worker-tls-key {dir}/tls.key"
        )),
        "{args}"
    );
    let spec = pod_spec(sts(&d, "deepseek-v3-h100-g0"));
    let worker = &spec.containers[0];
    assert_eq!(
        env(worker, "DSD_TLS_CERT"),
        Some("/etc/deepseek-worker-tls/tls.crt")
    );
    assert_eq!(
        env(worker, "DSD_TLS_CLIENT_CA"),
        Some("/etc/deepseek-worker-tls/ca.crt")
    );
    assert_eq!(env(worker, "DSD_HEALTH_LISTEN"), Some("0.0.0.0:50052"));
    for pod in [spec, router_pod(&d)] {
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "worker-tls")
            .and_then(|v| v.secret.clone())
            .unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("deepseek-v3-mtls"));
    }
    for probe in [
        &worker.startup_probe,
        &worker.liveness_probe,
        &worker.readiness_probe,
    ] {
        assert_eq!(probe.as_ref().unwrap().grpc.as_ref().unwrap().port, 50052);
    }
    // `workerTls: {}`: the Secret the operator keeps, the same in the router and the workers.
    dsd.spec.worker_tls = Some(Default::default());
    let d = desired(&dsd);
    for pod in [pod_spec(sts(&d, "deepseek-v3-h100-g0")), router_pod(&d)] {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "worker-tls");
        let secret = volume.and_then(|v| v.secret.clone()).unwrap();
        assert_eq!(
            secret.secret_name.as_deref(),
            Some("deepseek-v3-worker-tls")
        );
    }
    // Without it: plaintext, probes on the gRPC port.
    let plain = desired(&v3());
    let worker = &pod_spec(sts(&plain, "deepseek-v3-h100-g0")).containers[0];
    assert_eq!(env(worker, "DSD_TLS_CERT"), None);
    assert_eq!(
        worker
            .readiness_probe
            .as_ref()
            .unwrap()
            .grpc
            .as_ref()
            .unwrap()
            .port,
        50051
    );
}

#[test]
fn the_router_discovers_this_deployments_workers_with_pool_weights() {
    let d = desired(&v3());
    let joined = router_pod(&d).containers[0].args.clone().unwrap().join(" ");
    assert!(joined.contains("--policy prefix-affinity"));
    assert!(joined.contains("--discover-namespace inference"));
    assert!(joined.contains("--discover-selector app.kubernetes.io/component=worker,serving.deepseek-operator.io/deployment=deepseek-v3"));
    assert!(joined.contains("--pool h100=3 --pool a100=1"));
    let role = &d.roles[0].rules.as_ref().unwrap()[0];
    assert_eq!(
        role.resources.as_deref(),
        Some(&["endpointslices".to_string()][..])
    );
    assert_eq!(role.verbs, ["get", "list", "watch"]);
    assert_eq!(
        v3().endpoints().grpc,
        "deepseek-v3-router.inference.svc:50051"
    );
}

#[test]
fn with_autoscaling_the_router_holds_requests_while_no_group_serves() {
    let dsd = sample("tiny-autoscaling.yaml");
    let joined = router_pod(&desired(&dsd)).containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(
        joined.contains("--hold-for-backend-seconds 120"),
        "{joined}"
    );
    // At zero groups the router stays.
    assert_eq!(desired(&dsd).stateful_sets.len(), 0);
    assert_eq!(desired(&dsd).deployments.len(), 1);
    // Without autoscaling it answers at once.
    let plain = router_pod(&desired(&v3())).containers[0]
        .args
        .clone()
        .unwrap();
    assert!(!plain.contains(&"--hold-for-backend-seconds".to_string()));
}

#[test]
fn spec_tracing_sends_the_router_and_every_worker_to_the_collector() {
    let endpoint = "http://otel-collector.observability:4317";
    let mut dsd = v3();
    let router_args = |d: &Desired| router_pod(d).containers[0].args.clone().unwrap();
    assert!(!router_args(&desired(&dsd)).contains(&"--otlp-endpoint".to_string()));
    dsd.spec.tracing = Some(deepseek_operator::api::TracingSpec {
        otlp_endpoint: endpoint.into(),
    });
    let d = desired(&dsd);
    assert!(
        router_args(&d)
            .join(" ")
            .contains(&format!("--otlp-endpoint {endpoint}"))
    );
    for sts in &d.stateful_sets {
        assert_eq!(
            env(worker(sts), "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some(endpoint)
        );
    }
    assert!(!d.stateful_sets.is_empty());
}
