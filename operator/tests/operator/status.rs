//! Status and rollout: what was observed in, conditions and actions out.

use deepseek_operator::api::{DeepSeekDeployment, DeepSeekDeploymentStatus};
use deepseek_operator::status::{self, Blocked, Observed};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::SignedDuration;

use crate::fixtures::*;

fn groups(count: usize) -> Vec<StatefulSet> {
    (0..count)
        .map(|i| StatefulSet {
            metadata: ObjectMeta {
                name: Some(format!("g{i}")),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect()
}

fn compute(dsd: &DeepSeekDeployment, pods: Vec<Pod>) -> DeepSeekDeploymentStatus {
    let desired = dsd.desired().unwrap();
    let existing = desired.stateful_sets.len();
    let observed = Observed {
        stateful_sets: groups(existing),
        full_pools: status::full_pools(dsd, &pods, &now()),
        pods,
        router: Some(available_router()),
        ..Default::default()
    };
    status::compute(dsd, Ok(&desired), &observed, &now())
}

fn condition<'a>(status: &'a DeepSeekDeploymentStatus, type_: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

fn state(status: &DeepSeekDeploymentStatus, type_: &str) -> (String, String) {
    let c = condition(status, type_);
    (c.status.clone(), c.reason.clone())
}

fn revision(dsd: &DeepSeekDeployment, pool: usize) -> String {
    dsd.desired().unwrap().pools[pool].1.clone()
}

#[test]
fn golden_status_of_a_ready_deployment() {
    let dsd = v3();
    let status = compute(&dsd, all_ready_pods(&dsd));
    assert_golden(
        "operator/tests/golden/status-ready.yaml",
        &serde_yaml::to_string(&status).unwrap(),
    );
    assert_eq!(
        state(&status, "Ready"),
        ("True".into(), "AllGroupsReady".into())
    );
    assert_eq!(
        state(&status, "Progressing"),
        ("False".into(), "Complete".into())
    );
    assert_eq!(
        state(&status, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(status.pool_summary, "h100:2/2 a100:1/1");
    assert_eq!((status.replicas, status.ready_replicas), (3, 3));
    assert_eq!(
        status.selector,
        "app.kubernetes.io/component=worker,serving.deepseek-operator.io/deployment=deepseek-v3"
    );
}

#[test]
fn golden_status_of_the_tiny_sample_starting() {
    let dsd = tiny();
    let status = compute(&dsd, vec![]);
    assert_golden(
        "operator/tests/golden/status-starting.yaml",
        &serde_yaml::to_string(&status).unwrap(),
    );
}

#[test]
fn a_group_with_one_rank_missing_is_not_ready() {
    let dsd = v3();
    let mut pods = all_ready_pods(&dsd);
    pods.retain(|p| p.metadata.name.as_deref() != Some("deepseek-v3-a100-g0-3"));
    let status = compute(&dsd, pods);
    assert_eq!(
        state(&status, "Ready"),
        ("False".into(), "GroupsNotReady".into())
    );
    assert!(
        condition(&status, "Ready")
            .message
            .starts_with("a100: 0/1 groups ready on revision")
    );
    assert_eq!(status.pools[1].ready_replicas, 0);
    assert_eq!(
        state(&status, "Progressing"),
        ("True".into(), "GroupsStarting".into())
    );
}

#[test]
fn a_group_half_updated_is_not_ready_even_if_every_pod_is() {
    let dsd = v3();
    let mut pods = all_ready_pods(&dsd);
    // rank pod 1 of h100 group 0 still runs the old revision, and is Ready
    pods[1] = worker_pod(&dsd, "h100", 0, 1, "0ld0ld0ld0").ready().build();
    let status = compute(&dsd, pods);
    assert_eq!(
        state(&status, "Ready"),
        ("False".into(), "GroupsNotReady".into())
    );
    assert_eq!(
        state(&status, "Progressing"),
        ("True".into(), "RollingOut".into())
    );
    let h100 = &status.pools[0];
    assert_eq!((h100.ready_replicas, h100.updated_replicas), (1, 1));
}

#[test]
fn status_reports_the_new_revision_not_the_old_one() {
    // pods of the previous model revision are ready, but the spec moved on
    let old = v3();
    let old_pods = all_ready_pods(&old);
    let dsd = v3_at_revision("v3.1");
    let status = compute(&dsd, old_pods);
    assert_eq!(status.observed_generation, 2);
    assert_eq!(status.ready_replicas, 0);
    assert_eq!(status.pools[0].revision, revision(&dsd, 0));
    assert_eq!(state(&status, "Ready").0, "False");
    assert_eq!(
        state(&status, "Progressing"),
        ("True".into(), "RollingOut".into())
    );
}

#[test]
fn a_crash_looping_rank_degrades_the_deployment() {
    let dsd = tiny();
    let pod = worker_pod(&dsd, "cpu", 0, 0, &revision(&dsd, 0))
        .crash_looping()
        .build();
    let status = compute(&dsd, vec![pod]);
    assert_eq!(
        state(&status, "Degraded"),
        ("True".into(), "CrashLoopBackOff".into())
    );
    let message = &condition(&status, "Degraded").message;
    assert!(
        message.starts_with("pod tiny-cpu-g0-0: CrashLoopBackOff: container worker: back-off"),
        "{message}"
    );
}

#[test]
fn a_ranks_last_words_reach_the_status() {
    let dsd = tiny();
    let said = "loading the model: this pod's pool runs on NVIDIA-H100-80GB-HBM3 but its GPU is \
                \"NVIDIA A100-SXM4-80GB\"\n";
    let pod = worker_pod(&dsd, "cpu", 0, 0, &revision(&dsd, 0))
        .crash_looping_after(said)
        .build();
    let status = compute(&dsd, vec![pod]);
    let message = &condition(&status, "Degraded").message;
    assert!(
        message.ends_with(&format!("; last exit: {}", said.trim())),
        "{message}"
    );
}

#[test]
fn unschedulable_ranks_are_reported() {
    let dsd = v3();
    let pod = worker_pod(&dsd, "h100", 0, 0, &revision(&dsd, 0))
        .unschedulable()
        .build();
    let status = compute(&dsd, vec![pod]);
    assert_eq!(
        state(&status, "Degraded"),
        ("True".into(), "Unschedulable".into())
    );
    assert!(
        condition(&status, "Degraded")
            .message
            .contains("Insufficient nvidia.com/gpu")
    );
}

#[test]
fn a_pool_whose_pods_stay_unschedulable_is_full_at_the_groups_its_placed_pods_make() {
    let mut dsd = v3(); // h100 (weight 3): groups of 4 pods, min 1 max 8; a100 (weight 1)
    dsd.spec.replicas = Some(3);
    let h100 = revision(&dsd, 0);
    let template = dsd.clone();
    // Eight nodes for three groups started at once: the scheduler placed some of each.
    let pods = |waited: i64| -> Vec<Pod> {
        let pod = |group, index| worker_pod(&template, "h100", group, index, &h100);
        let mut pods: Vec<Pod> = (0..4).map(|i| pod(0, i).on_node("h").build()).collect();
        for group in [1, 2] {
            pods.extend((0..2).map(|i| pod(group, i).on_node("h").build()));
            pods.extend((2..4).map(|i| pod(group, i).unschedulable_for(waited).build()));
        }
        pods
    };
    let full = |pods: &[Pod], dsd: &DeepSeekDeployment| status::full_pools(dsd, pods, &now());
    // Within spillAfterSeconds (120) a cluster autoscaler may still add nodes.
    assert!(full(&pods(60), &dsd).is_empty());
    // A pod the scheduler has not tried yet may still be placed.
    let mut untried = pods(130);
    untried.push(worker_pod(&template, "h100", 3, 0, &h100).build());
    assert!(full(&untried, &dsd).is_empty());
    assert_eq!(full(&pods(130), &dsd)["h100"].groups, 2);
    // Full, its third group goes to the next pool, and the status remembers it.
    let status = compute(&dsd, pods(130));
    assert_eq!(status.pools[0].full_at, Some(2));
    dsd.status = Some(status);
    let spilled: Vec<i32> = dsd
        .desired_in(&deepseek_operator::desired::Surroundings {
            full_pools: [("h100".to_string(), 2)].into(),
            ..Default::default()
        })
        .unwrap()
        .pools
        .iter()
        .map(|(p, _)| p.replicas)
        .collect();
    assert_eq!(spilled, [2, 1]);
    // While the third group's pods terminate, a reconcile that reads a status from before
    // fullAt was written finds the same two groups.
    let mut removing: Vec<Pod> = pods(130).into_iter().take(8).collect();
    let third_group = |index| worker_pod(&template, "h100", 2, index, &h100);
    removing.extend((0..2).map(|i| third_group(i).on_node("h").terminating().build()));
    removing.extend((2..4).map(|i| third_group(i).terminating().build()));
    assert_eq!(full(&removing, &template)["h100"].groups, 2);
    // A pod stuck terminating long past its grace period (a lost node) holds no node.
    let lost_node = |pod: Pod| {
        let mut pod = pod;
        pod.metadata.deletion_timestamp = Some(Time(now().0 - SignedDuration::from_secs(600)));
        pod
    };
    let mut lost: Vec<Pod> = pods(130).into_iter().skip(4).collect();
    lost.extend(pods(130).into_iter().take(4).map(lost_node));
    assert_eq!(full(&lost, &template)["h100"].groups, 1);
    // Once the third group is gone it stays full for ten minutes, then is tried again.
    let placed: Vec<Pod> = pods(130).into_iter().take(4).collect();
    assert_eq!(full(&placed, &dsd)["h100"].groups, 2);
    let pools = &mut dsd.status.as_mut().unwrap().pools[0];
    pools.full_since = Some(Time(now().0 - SignedDuration::from_secs(601)));
    assert!(full(&placed, &dsd).is_empty());
    // Pools with their own counts (no spec.replicas) never spill.
    dsd.spec.replicas = None;
    dsd.status = None;
    assert!(full(&pods(130), &dsd).is_empty());
}

#[test]
fn at_zero_groups_an_autoscaled_deployment_is_ready_when_its_router_holds_requests() {
    let dsd = sample("tiny-autoscaling.yaml");
    let status = compute(&dsd, Vec::new());
    assert_eq!(
        state(&status, "Ready"),
        ("True".into(), "ScaledToZero".into())
    );
    let mut without_zero = dsd.clone();
    without_zero
        .spec
        .autoscaling
        .as_mut()
        .unwrap()
        .scale_to_zero_after_seconds = None;
    assert_eq!(
        state(&compute(&without_zero, Vec::new()), "Ready"),
        ("False".into(), "ScaledToZero".into())
    );
}

#[test]
fn blocked_specs_are_not_ready_with_the_reason() {
    let dsd = tiny();
    let blocked = Blocked {
        reason: "ModelVolumeMissing",
        message: "spec.model.source.pvc.claimName: missing".into(),
    };
    let status = status::compute(&dsd, Err(&blocked), &Observed::default(), &now());
    assert_eq!(
        state(&status, "Ready"),
        ("False".into(), "ModelVolumeMissing".into())
    );
    assert_eq!(
        state(&status, "Degraded"),
        ("True".into(), "ModelVolumeMissing".into())
    );
    assert_eq!(condition(&status, "Ready").message, blocked.message);
}

#[test]
fn transition_times_only_move_when_a_condition_flips() {
    let mut dsd = v3();
    let first = compute(&dsd, all_ready_pods(&dsd));
    dsd.status = Some(first.clone());
    let later = Time("2026-11-29T13:00:00Z".parse().unwrap());
    let desired = dsd.desired().unwrap();
    let observed = Observed {
        stateful_sets: groups(3),
        pods: all_ready_pods(&dsd),
        router: Some(available_router()),
        ..Default::default()
    };
    let again = status::compute(&dsd, Ok(&desired), &observed, &later);
    assert_eq!(
        again, first,
        "an unchanged world must give an identical status (no write, no event)"
    );
    assert!(status::events(Some(&first), &again).is_empty());
    let observed = Observed {
        pods: vec![],
        ..observed
    };
    let flipped = status::compute(&dsd, Ok(&desired), &observed, &later);
    assert_eq!(condition(&flipped, "Ready").last_transition_time, later);
    assert_eq!(condition(&flipped, "Degraded").last_transition_time, now());
    let events: Vec<(&str, usize)> = status::events(Some(&first), &flipped)
        .iter()
        .map(|(r, cs)| (*r, cs.len()))
        .collect();
    assert_eq!(events, [("GroupsNotReady", 1), ("GroupsStarting", 1)]);
}

#[test]
fn rollout_replaces_one_serving_group_per_pool_at_a_time() {
    let old = v3();
    let old_pods = all_ready_pods(&old);
    let mut dsd = v3();
    dsd.spec.worker.max_batch_tokens = Some(2048);
    let desired = dsd.desired().unwrap();
    let mut replace = status::pods_to_replace(&desired, &old_pods);
    replace.sort();
    // h100 g0 (all four pods) and a100 g0 (all eight): one group per pool
    let pods_of =
        |group: &'static str, n: usize| (0..n).map(move |i| format!("deepseek-v3-{group}-{i}"));
    let expected: Vec<String> = pods_of("a100-g0", 8).chain(pods_of("h100-g0", 4)).collect();
    assert_eq!(replace, expected);
    // while h100 g0 restarts (terminating, then new pods not yet ready), g1 waits
    let mut pods: Vec<Pod> = old_pods
        .iter()
        .filter(|p| p.metadata.name.as_deref().unwrap().contains("h100-g1"))
        .cloned()
        .collect();
    pods.push(
        worker_pod(&dsd, "h100", 0, 0, "0ld0ld0ld0")
            .terminating()
            .build(),
    );
    pods.push(worker_pod(&dsd, "h100", 0, 1, &desired.pools[0].1).build());
    assert!(status::pods_to_replace(&desired, &pods).is_empty());
    // once g0 serves on the new revision, g1 goes
    let mut pods: Vec<Pod> = old_pods
        .iter()
        .filter(|p| p.metadata.name.as_deref().unwrap().contains("h100-g1"))
        .cloned()
        .collect();
    pods.extend((0..4).map(|i| {
        worker_pod(&dsd, "h100", 0, i, &desired.pools[0].1)
            .ready()
            .build()
    }));
    assert_eq!(
        status::pods_to_replace(&desired, &pods),
        pods_of("h100-g1", 4).collect::<Vec<_>>()
    );
}

#[test]
fn a_rollout_keeps_a_serving_group_in_the_deployment() {
    use status::{GroupState, groups_to_replace};
    let old = |serving| GroupState {
        serving,
        outdated: true,
    };
    let new = |serving| GroupState {
        serving,
        outdated: false,
    };
    // Two pools of one group: one pool's group at a time, the other keeps serving.
    assert_eq!(
        groups_to_replace(&[vec![old(true)], vec![old(true)]]),
        [(0, 0)]
    );
    assert!(groups_to_replace(&[vec![new(false)], vec![old(true)]]).is_empty());
    assert_eq!(
        groups_to_replace(&[vec![new(true)], vec![old(true)]]),
        [(1, 0)]
    );
    // A deployment of one group has nothing to wait for.
    assert_eq!(groups_to_replace(&[vec![old(true)]]), [(0, 0)]);
    // A broken group goes at once, and does not count as serving.
    assert_eq!(
        groups_to_replace(&[vec![old(false)], vec![old(true)]]),
        [(0, 0)]
    );
    // Per pool, one serving group at a time, only while the others serve.
    assert_eq!(
        groups_to_replace(&[vec![old(true), old(true)], vec![old(true), old(true)]]),
        [(0, 0), (1, 0)]
    );
}

#[test]
fn broken_old_groups_are_replaced_at_once() {
    let old = v3();
    let mut old_pods = all_ready_pods(&old);
    // both h100 groups have a rank down: neither serves, so both may restart now
    old_pods.retain(|p| {
        !p.metadata.name.as_deref().unwrap().ends_with("h100-g0-1")
            && !p.metadata.name.as_deref().unwrap().ends_with("h100-g1-1")
    });
    let mut dsd = v3();
    dsd.spec.worker.max_batch_tokens = Some(2048);
    let replace = status::pods_to_replace(&dsd.desired().unwrap(), &old_pods);
    assert!(replace.contains(&"deepseek-v3-h100-g0-0".to_string()));
    assert!(replace.contains(&"deepseek-v3-h100-g1-0".to_string()));
}
