//! No Docker engine runs here, so check the Dockerfile against the workspace statically: what
//! it copies exists, what it runs is built, and the images deploy/ and the chart name are its
//! targets.

use std::collections::BTreeSet;

use deepseek_operator::names::{IMAGE_REGISTRY, default_image};

use crate::fixtures::{read, repo_root};

/// Package names of the workspace members, which are also their binary names.
fn workspace_binaries() -> BTreeSet<String> {
    ["operator", "worker", "router", "proto"]
        .iter()
        .filter_map(|member| {
            let manifest = read(&format!("{member}/Cargo.toml"));
            let line = manifest.lines().find(|l| l.starts_with("name = "))?;
            Some(
                line.trim_start_matches("name = ")
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .filter(|name| name != "deepseek-proto")
        .collect()
}

fn dockerfile_targets(dockerfile: &str) -> BTreeSet<String> {
    dockerfile
        .lines()
        .filter(|l| l.trim_start().to_uppercase().starts_with("FROM "))
        .filter_map(|l| {
            l.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case("AS"))
                .map(|w| w[1].to_string())
        })
        .collect()
}

#[test]
fn dockerfile_copies_only_what_exists_and_runs_only_what_is_built() {
    let dockerfile = read("Dockerfile");
    let binaries = workspace_binaries();
    assert_eq!(binaries.len(), 3, "{binaries:?}");
    for line in dockerfile.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.contains("--from") {
            continue;
        }
        let parts: Vec<&str> = args
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                repo_root().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
        }
    }
    for binary in dockerfile.split("/usr/local/bin/").skip(1) {
        let name: String = binary
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '-')
            .collect();
        assert!(
            binaries.contains(&name),
            "Dockerfile names /usr/local/bin/{name}, not a workspace binary"
        );
    }
}

#[test]
fn every_image_deployed_is_a_dockerfile_target() {
    let targets = dockerfile_targets(&read("Dockerfile"));
    for binary in workspace_binaries() {
        let target = binary.trim_start_matches("deepseek-");
        assert!(
            targets.contains(target),
            "no Dockerfile target {target} for {binary}: {targets:?}"
        );
        assert!(default_image(&binary).starts_with(&format!("{IMAGE_REGISTRY}/{binary}:")));
    }
    let operator_image = default_image("deepseek-operator");
    assert!(
        read("deploy/operator.yaml").contains(&operator_image),
        "deploy/operator.yaml must run {operator_image}"
    );
    let values = read("charts/deepseek-operator/values.yaml");
    assert!(
        values.contains(&format!("{IMAGE_REGISTRY}/deepseek-operator")),
        "chart values must name the operator image"
    );
    let chart = read("charts/deepseek-operator/Chart.yaml");
    assert!(
        chart.contains(&format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"))),
        "chart appVersion must match the crate version"
    );
}

#[test]
fn the_worker_image_ships_kernels_for_a100_and_hopper_where_it_says() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("kernels --arch sm_80 --arch sm_90a --cache /out/kernels"));
    let shipped = "/usr/local/share/deepseek-worker/kernels";
    assert!(dockerfile.contains(&format!("COPY --from=kernels /out/kernels {shipped}")));
    assert!(dockerfile.contains(&format!("DSD_SHIPPED_KERNELS={shipped}")));
    // NVRTC and the headers the image compiles with are the ones CI tests the kernels with.
    let ci = read(".ci/run");
    for pin in ["nvidia-cuda-nvrtc-cu12==", "nvidia-cuda-runtime-cu12=="] {
        let version = |text: &str| {
            let at = text.find(pin).unwrap_or_else(|| panic!("{pin} not pinned")) + pin.len();
            text[at..].split('"').next().unwrap().to_string()
        };
        assert_eq!(version(&dockerfile), version(&ci), "{pin}");
    }
}
