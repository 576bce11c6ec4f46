//! The CRD's validation rules, evaluated as the API server evaluates them.

use deepseek_operator::api::DeepSeekDeployment;
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};

use crate::fixtures::*;

fn schema() -> Value {
    let crd = serde_json::to_value(DeepSeekDeployment::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The messages of the rules the object breaks.
fn violations(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => vec![],
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn with(dsd: &DeepSeekDeployment, edit: impl FnOnce(&mut Value)) -> Value {
    let mut value = serde_json::to_value(dsd).unwrap();
    edit(&mut value);
    value
}

#[test]
fn samples_are_valid() {
    assert_eq!(
        violations(&serde_json::to_value(tiny()).unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        violations(&serde_json::to_value(v3()).unwrap()),
        Vec::<String>::new()
    );
}

#[test]
fn replicas_outside_min_and_max_are_refused_naming_the_field() {
    let object = with(&v3(), |v| v["spec"]["pools"][0]["minReplicas"] = json!(3));
    let errors = violations(&object);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("minReplicas must be ≤ replicas"),
        "{errors:?}"
    );
    assert!(errors[0].contains("pools[0].minReplicas"), "{errors:?}");
    let object = with(&v3(), |v| v["spec"]["pools"][1]["maxReplicas"] = json!(0));
    assert!(violations(&object)[0].contains("replicas must be ≤ maxReplicas"));
}

#[test]
fn ranks_must_divide_by_gpus_per_pod() {
    let object = with(&v3(), |v| {
        v["spec"]["parallelism"]["expertParallelRanks"] = json!(12);
        v["spec"]["pools"][0]
            .as_object_mut()
            .unwrap()
            .remove("podsPerGroup");
        v["spec"]["pools"][1]
            .as_object_mut()
            .unwrap()
            .remove("podsPerGroup");
    });
    let errors = violations(&object);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("must be divisible by every pool's gpusPerPod")),
        "{errors:?}"
    );
    let object = with(&v3(), |v| {
        v["spec"]["parallelism"]["expertParallelRanks"] = json!(16)
    });
    let errors = violations(&object);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("podsPerGroup × gpusPerPod must equal")),
        "{errors:?}"
    );
}

#[test]
fn exactly_one_model_source() {
    let object = with(&tiny(), |v| {
        v["spec"]["model"]["source"]["huggingFace"] = json!({"repo": "deepseek-ai/DeepSeek-V3"})
    });
    assert!(violations(&object)[0].contains("exactly one of huggingFace or pvc"));
    let object = with(&tiny(), |v| v["spec"]["model"]["source"] = json!({}));
    assert!(violations(&object)[0].contains("exactly one of huggingFace or pvc"));
}

#[test]
fn the_expert_count_must_be_known() {
    let object = with(&tiny(), |v| {
        let model = v["spec"]["model"].as_object_mut().unwrap();
        model.remove("architecture");
        model.remove("routedExperts");
    });
    assert!(violations(&object)[0].contains("set model.architecture or model.routedExperts"));
}
