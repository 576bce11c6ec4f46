//! The CRD checked into deploy/ and the chart is the one the Rust types generate.

use deepseek_operator::api::DeepSeekDeployment;
use kube::CustomResourceExt;

use crate::fixtures::read;

const REGENERATE: &str = "cargo run -q -p deepseek-operator -- crd > deploy/crd/deepseekdeployments.yaml \
     && cp deploy/crd/deepseekdeployments.yaml charts/deepseek-operator/crds/";

fn generated() -> String {
    serde_yaml::to_string(&DeepSeekDeployment::crd()).unwrap()
}

#[test]
fn deploy_crd_is_current() {
    assert!(
        read("deploy/crd/deepseekdeployments.yaml") == generated(),
        "deploy/crd is stale; run: {REGENERATE}"
    );
}

#[test]
fn chart_crd_is_current() {
    let chart = read("charts/deepseek-operator/crds/deepseekdeployments.yaml");
    assert!(
        chart == generated(),
        "the chart's CRD is stale; run: {REGENERATE}"
    );
}

#[test]
fn crd_names_subresources_and_columns() {
    let crd = DeepSeekDeployment::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("deepseekdeployments.serving.deepseek-operator.io")
    );
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["dsd".to_string()][..])
    );
    let version = &crd.spec.versions[0];
    let subresources = version.subresources.as_ref().unwrap();
    assert!(subresources.status.is_some());
    let scale = subresources.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Ready", "Pools", "Replicas", "Endpoint", "Age"]);
}

#[test]
fn every_spec_field_is_documented_for_kubectl_explain() {
    let crd = serde_json::to_value(DeepSeekDeployment::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut undocumented = Vec::new();
    walk(spec, "spec", &mut undocumented);
    assert!(
        undocumented.is_empty(),
        "fields without a description: {undocumented:?}"
    );
}

/// Our own fields must have descriptions; Kubernetes core types (tolerations, affinity, ...)
/// bring theirs.
fn walk(schema: &serde_json::Value, path: &str, undocumented: &mut Vec<String>) {
    let Some(properties) = schema["properties"]
        .as_object()
        .or_else(|| schema["items"]["properties"].as_object())
    else {
        return;
    };
    for (name, field) in properties {
        let path = format!("{path}.{name}");
        if field.get("description").is_none() {
            undocumented.push(path.clone());
        }
        let core = [
            "tolerations",
            "affinity",
            "resources",
            "env",
            "nodeSelector",
            "cacheSize",
            "shmSize",
        ];
        if !core.contains(&name.as_str()) {
            walk(field, &path, undocumented);
        }
    }
}

#[test]
fn pool_names_are_list_map_keys_so_duplicates_are_refused() {
    let crd = serde_json::to_value(DeepSeekDeployment::crd()).unwrap();
    let pools = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["pools"];
    assert_eq!(pools["x-kubernetes-list-type"], "map");
    assert_eq!(
        pools["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert_eq!(
        (pools["minItems"].as_f64(), pools["maxItems"].as_f64()),
        (Some(1.0), Some(16.0))
    );
}

#[test]
fn every_format_is_one_the_api_server_knows() {
    // The API server warns on every apply of a CRD with a format it does not know (e.g.
    // schemars' uint32); these are the integer and number ones it does.
    fn formats(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(format) = map.get("format").and_then(|f| f.as_str()) {
                    found.push(format.to_string());
                }
                map.values().for_each(|v| formats(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| formats(v, found)),
            _ => {}
        }
    }
    let crd = serde_json::to_value(DeepSeekDeployment::crd()).unwrap();
    let mut found = Vec::new();
    formats(&crd["spec"]["versions"][0]["schema"], &mut found);
    let unknown: Vec<&String> = found
        .iter()
        .filter(|f| {
            ![
                "int32",
                "int64",
                "double",
                "float",
                "int-or-string",
                "date-time",
            ]
            .contains(&f.as_str())
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "formats the API server does not know: {unknown:?}"
    );
}
