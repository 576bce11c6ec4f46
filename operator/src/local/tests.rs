use super::*;
use crate::api::DeepSeekDeployment;

const TWO_POOLS: &str = include_str!("../../../deploy/samples/tiny-ep.yaml");
const V3: &str = include_str!("../../../deploy/samples/deepseek-v3-h100-a100.yaml");

fn parse(yaml: &str) -> DeepSeekDeployment {
    serde_yaml::from_str(yaml).unwrap()
}

fn volumes() -> LocalVolumes {
    LocalVolumes {
        claims: BTreeMap::from([("tiny-model".to_string(), PathBuf::from("/m"))]),
        ..Default::default()
    }
}

/// Ports 40000, 40001, … in the order asked for.
fn counter() -> impl FnMut() -> Result<u16, LocalError> {
    let mut next = 40_000;
    move || {
        next += 1;
        Ok(next - 1)
    }
}

fn group(
    dsd: &DeepSeekDeployment,
    pool: usize,
    gpus: &mut Vec<u32>,
) -> Result<LocalGroup, LocalError> {
    let desired = dsd.desired()?;
    let (pool, revision) = desired.pools[pool].clone();
    let target = PoolTarget { pool, revision };
    let name = dsd.metadata.name.clone().unwrap();
    let mut host = Host {
        volumes: &volumes(),
        run_dir: Path::new("/run"),
        ports: &mut counter(),
        free_gpus: gpus,
    };
    worker_group(&desired, &name, &target, 0, &mut host)
}

fn env_of(process: &Process) -> BTreeMap<&str, &str> {
    process
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[test]
fn each_pod_runs_with_its_template_environment_made_local() {
    let dsd = parse(TWO_POOLS);
    let a = group(&dsd, 0, &mut Vec::new()).unwrap();
    let labels: Vec<&str> = a.pods.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["a/0/0", "a/0/1"]);
    // Two ranks' expert-parallel ports first, then each pod's gRPC and metrics ports.
    let peers = "127.0.0.1:40000,127.0.0.1:40001";
    for (index, pod) in a.pods.iter().enumerate() {
        let env = env_of(pod);
        assert_eq!(env["DSD_POD_INDEX"], index.to_string());
        assert_eq!(env["DSD_PEERS"], peers);
        assert_eq!(env["DSD_GROUP_SIZE"], "2");
        assert_eq!(env["DSD_RANKS_PER_POD"], "1");
        assert_eq!(env["DSD_MODEL"], "/m/tiny-v3-bf16");
        assert_eq!(
            env["DSD_PLACEMENT"],
            format!("/run/a/{}/plan.json", a.revision)
        );
        assert_eq!(env["DSD_LISTEN"], pod.grpc.to_string());
        assert_eq!(env["DSD_SERVED_NAME"], "tiny-deepseek");
        assert_eq!(env["DSD_MAX_BATCH_TOKENS"], "2048");
        assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"));
        assert_eq!(pod.args, ["serve"]);
        assert_eq!(pod.grace, Duration::from_secs(60));
    }
    assert_eq!(a.pods[0].grpc.port(), 40002);
    assert_eq!(env_of(&a.pods[0])["DSD_METRICS_LISTEN"], "127.0.0.1:40003");
    assert_eq!(a.pods[1].grpc.port(), 40004);

    let b = group(&dsd, 1, &mut Vec::new()).unwrap();
    assert_eq!(b.pods.len(), 1);
    assert_eq!(b.pods[0].label, "b/0/0-1");
    let env = env_of(&b.pods[0]);
    assert_eq!((env["DSD_RANKS_PER_POD"], env["DSD_POD_INDEX"]), ("2", "0"));
    assert_eq!(env["DSD_PEERS"], peers);
}

#[test]
fn gpu_pods_get_their_own_gpus_as_the_device_plugin_would() {
    let mut dsd = parse(V3);
    dsd.spec.model.source = parse(TWO_POOLS).spec.model.source;
    let mut gpus: Vec<u32> = (0..40).collect();
    let h100 = group(&dsd, 0, &mut gpus).unwrap();
    assert_eq!(h100.pods.len(), 4);
    let visible: Vec<&str> = h100
        .pods
        .iter()
        .map(|p| {
            let env = env_of(p);
            assert_eq!(env["DSD_DEVICE"], "cuda:0");
            assert_eq!(env["DSD_KERNEL_CACHE"], "/run/kernels");
            p.env
                .iter()
                .find(|(k, _)| k == "CUDA_VISIBLE_DEVICES")
                .unwrap()
                .1
                .as_str()
        })
        .collect();
    assert_eq!(visible[1], "8,9,10,11,12,13,14,15");
    assert_eq!(h100.pods[3].gpus, (24..32).collect::<Vec<_>>());
    assert_eq!(gpus, (32..40).collect::<Vec<_>>());
    let err = group(&dsd, 0, &mut gpus).unwrap_err().to_string();
    assert!(
        err.contains("spec.pools[h100]: a group needs 32 GPUs, 8"),
        "{err}"
    );
}

#[test]
fn what_needs_a_cluster_is_refused_by_name() {
    let mut dsd = parse(TWO_POOLS);
    dsd.spec.worker.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
        name: "TOKEN".into(),
        value_from: Some(Default::default()),
        ..Default::default()
    }]);
    let err = group(&dsd, 0, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("spec.worker.env[TOKEN]: valueFrom"), "{err}");

    let v3 = parse(V3);
    let err = group(&v3, 0, &mut (0..64).collect())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--pvc deepseek-v3-model-"), "{err}");

    let mut other_claim = parse(TWO_POOLS);
    other_claim
        .spec
        .model
        .source
        .pvc
        .as_mut()
        .unwrap()
        .claim_name = "models".into();
    let err = group(&other_claim, 0, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("give --pvc models=DIR"), "{err}");
}

#[test]
fn the_router_reads_a_backends_file_on_local_ports() {
    let dsd = parse(TWO_POOLS);
    let desired = dsd.desired().unwrap();
    let (router, endpoints) = router_process(
        &desired,
        &volumes(),
        Path::new("/run/backends"),
        &mut counter(),
    )
    .unwrap();
    assert_eq!(endpoints.grpc.to_string(), "127.0.0.1:40000");
    assert_eq!(endpoints.http.to_string(), "127.0.0.1:40001");
    let args = router.args.join(" ");
    assert!(!args.contains("--discover"), "{args}");
    for wanted in [
        "--grpc-listen 127.0.0.1:40000",
        "--http-listen 127.0.0.1:40001",
        "--metrics-listen 127.0.0.1:40002",
        "--backends-file /run/backends",
        "--pool a=1 --pool b=1",
        "--served-name tiny-deepseek",
    ] {
        assert!(args.contains(wanted), "{wanted:?} not in {args}");
    }

    let mut keyed = dsd.clone();
    keyed.spec.router.api_keys_secret = Some("keys".into());
    let desired = keyed.desired().unwrap();
    let err = router_process(&desired, &volumes(), Path::new("/b"), &mut counter()).unwrap_err();
    assert!(
        err.to_string().starts_with("spec.router.apiKeysSecret"),
        "{err}"
    );
    let with_file = LocalVolumes {
        api_keys_file: Some("/keys".into()),
        ..volumes()
    };
    let (router, _) =
        router_process(&desired, &with_file, Path::new("/b"), &mut counter()).unwrap();
    assert!(router.args.join(" ").contains("--api-keys-file /keys"));

    let mut tls = dsd.clone();
    tls.spec.router.tls = Some(crate::api::RouterTls {
        secret_name: "cert".into(),
    });
    let desired = tls.desired().unwrap();
    let err = router_process(&desired, &volumes(), Path::new("/b"), &mut counter()).unwrap_err();
    assert!(err.to_string().starts_with("spec.router.tls"), "{err}");

    let mut mutual = dsd.clone();
    mutual.spec.worker_tls = Some(crate::api::WorkerTls {
        secret_name: Some("mtls".into()),
    });
    let err = group(&mutual, 0, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.starts_with("spec.workerTls"), "{err}");
}

#[test]
fn the_backends_file_lists_every_pod_of_the_groups_in_service() {
    let dsd = parse(TWO_POOLS);
    let (a, b) = (
        group(&dsd, 0, &mut Vec::new()).unwrap(),
        group(&dsd, 1, &mut Vec::new()).unwrap(),
    );
    let text = backends_file(&[(&a, None), (&b, Some("NVIDIA-H100-80GB-HBM3"))]);
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "pool=a,addr=127.0.0.1:40002",
            "pool=a,addr=127.0.0.1:40004",
            "pool=b,addr=127.0.0.1:40002,gpu=NVIDIA-H100-80GB-HBM3",
        ]
    );
}

#[test]
fn prometheus_finds_the_router_and_every_worker_with_the_podmonitors_labels() {
    let dsd = parse(TWO_POOLS);
    let desired = dsd.desired().unwrap();
    let (router, _) =
        router_process(&desired, &volumes(), Path::new("/b"), &mut counter()).unwrap();
    let b = group(&dsd, 1, &mut Vec::new()).unwrap();
    let targets = std::iter::once(ScrapeTarget {
        deployment: "tiny-ep",
        pool: None,
        process: &router,
    })
    .chain(b.pods.iter().map(|pod| ScrapeTarget {
        deployment: "tiny-ep",
        pool: Some("b"),
        process: pod,
    }));
    let file: serde_json::Value = serde_json::from_str(&prometheus_targets(targets)).unwrap();
    assert_eq!(
        file,
        serde_json::json!([
            {"targets": ["127.0.0.1:40002"],
             "labels": {"deployment": "tiny-ep", "component": "router", "pod": "router"}},
            {"targets": ["127.0.0.1:40003"],
             "labels": {"deployment": "tiny-ep", "component": "worker", "pool": "b",
                        "pod": "b/0/0-1"}},
        ])
    );
    assert_eq!(prometheus_targets([]), "[]\n");
}

fn view(index: i32, revision: &str, ready: bool) -> GroupView {
    GroupView {
        index,
        revision: revision.into(),
        ready,
        leaving: false,
    }
}

fn pool(replicas: i32, revision: &str, groups: &[GroupView]) -> PoolView {
    PoolView {
        replicas,
        revision: revision.into(),
        groups: groups.to_vec(),
    }
}

#[test]
fn a_rollout_replaces_one_group_at_a_time_once_the_others_are_ready() {
    use Step::*;
    // Scaling: extra groups retire, missing ones start, together.
    assert_eq!(
        rollout(&[pool(2, "r1", &[])]),
        [(0, Start(0)), (0, Start(1))]
    );
    let three = [
        view(0, "r1", true),
        view(1, "r1", true),
        view(2, "r1", false),
    ];
    assert_eq!(
        rollout(&[pool(1, "r1", &three)]),
        [(0, Retire(1)), (0, Retire(2))]
    );
    // A new revision: the lowest old group first.
    let groups = [view(0, "r1", true), view(1, "r1", true)];
    assert_eq!(rollout(&[pool(2, "r2", &groups)]), [(0, Retire(0))]);
    // Group 0 is leaving: nothing else until it is gone…
    let leaving = [
        GroupView {
            leaving: true,
            ..view(0, "r1", true)
        },
        view(1, "r1", true),
    ];
    assert!(rollout(&[pool(2, "r2", &leaving)]).is_empty());
    // …then it starts on the new revision, and group 1 waits until group 0 is ready.
    assert_eq!(
        rollout(&[pool(2, "r2", &[view(1, "r1", true)])]),
        [(0, Start(0))]
    );
    let starting = [view(0, "r2", false), view(1, "r1", true)];
    assert!(rollout(&[pool(2, "r2", &starting)]).is_empty());
    let started = [view(0, "r2", true), view(1, "r1", true)];
    assert_eq!(rollout(&[pool(2, "r2", &started)]), [(0, Retire(1))]);
    assert!(rollout(&[pool(2, "r2", &[view(0, "r2", true), view(1, "r2", true)])]).is_empty());
    // Two pools of one group each: one pool at a time, so the deployment keeps serving.
    let a = pool(1, "a2", &[view(0, "a1", true)]);
    let b = pool(1, "b2", &[view(0, "b1", true)]);
    assert_eq!(rollout(&[a.clone(), b.clone()]), [(0, Retire(0))]);
    let a_back = pool(1, "a2", &[view(0, "a2", true)]);
    assert_eq!(rollout(&[a_back, b]), [(1, Retire(0))]);
}

#[test]
fn restarts_back_off_from_one_second_to_thirty() {
    let delays: Vec<u64> = (1..=8).map(|n| restart_delay(n).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
}

#[test]
fn status_names_each_pools_ready_groups() {
    let pool = |pool: &str, ready, desired, ready_outdated| PoolStatus {
        pool: pool.into(),
        ready,
        desired,
        ready_outdated,
    };
    assert_eq!(
        status_line("tiny-ep", &[pool("a", 1, 1, 0), pool("b", 0, 2, 1)]),
        "tiny-ep: pool a 1/1 groups ready, pool b 0/2 groups ready (+1 serving on an old revision)"
    );
}

#[test]
fn listeners_take_ports_below_the_ephemeral_range() {
    assert_eq!(listen_port_range("32768\t60999\n"), Some(16384..32768));
    assert_eq!(listen_port_range("1024 65535"), None);
    assert_eq!(listen_port_range(""), None);
    assert_eq!(listen_port_range("many ports"), None);
}
