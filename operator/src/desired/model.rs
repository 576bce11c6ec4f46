//! Where a worker finds the checkpoint: a PersistentVolumeClaim mounted read-only, either
//! the user's (`pvc`) or the model cache the operator fills from the Hugging Face Hub
//! (`huggingFace`): one claim per repository revision, and one Job that downloads into it.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, SecretKeySelector, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::k8s::{
    empty_dir, env_var, join_path, locked_down_pod, requests, restricted, volume_mount,
};
use super::{Ctx, ModelCache, ModelMount};
use crate::api::HuggingFaceSource;
use crate::names::*;
use deepseek_proto::pod::CHECKPOINT_FILES;

/// Directory of the checkpoint inside a model cache claim (the claim's root may hold a
/// filesystem's `lost+found`).
pub const CACHE_DIR: &str = "checkpoint";

/// Annotation on the cache claim and Job: the repository and revision they hold.
pub const ANNOTATION_MODEL: &str = "serving.deepseek-operator.io/model";

/// Download attempts before the Job fails (each resumes what the last one fetched).
const DOWNLOAD_ATTEMPTS: i32 = 6;

pub(super) struct ModelVolume {
    pub(super) volume: Volume,
    /// Directory of the checkpoint inside the worker container.
    pub(super) path: String,
}

impl Ctx<'_> {
    /// The claim the workers mount read-only, and the checkpoint's directory in it.
    pub(super) fn model_volume(&self) -> ModelVolume {
        let source = &self.dsd.spec.model.source;
        let (claim_name, sub_path) = match (&source.pvc, &source.hugging_face, &self.model_mount) {
            (Some(pvc), _, _) => (pvc.claim_name.clone(), pvc.path.as_deref().unwrap_or("")),
            (None, _, ModelMount::Previous(claim)) => (claim.clone(), CACHE_DIR),
            // resolve() refuses a spec with neither source.
            (None, hf, _) => (
                hf.as_ref()
                    .map(|hf| self.model_cache_name(hf))
                    .unwrap_or_default(),
                CACHE_DIR,
            ),
        };
        ModelVolume {
            volume: Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name,
                    read_only: Some(true),
                }),
                ..Default::default()
            },
            path: join_path(MODEL_MOUNT, sub_path),
        }
    }

    fn model_cache_name(&self, hf: &HuggingFaceSource) -> String {
        model_cache_name(&self.name, &hf.repo, &hf.revision)
    }

    /// The spec revision's cache claim and download Job, for a `huggingFace` source.
    pub(super) fn model_cache(&self) -> Option<ModelCache> {
        let hf = self.dsd.spec.model.source.hugging_face.as_ref()?;
        let name = self.model_cache_name(hf);
        let labels = common_labels(&self.name, COMPONENT_MODEL_CACHE);
        let meta = ObjectMeta {
            annotations: Some(BTreeMap::from([(
                ANNOTATION_MODEL.to_string(),
                format!("{}@{}", hf.repo, hf.revision),
            )])),
            ..self.meta(name.clone(), labels.clone())
        };
        let claim = PersistentVolumeClaim {
            metadata: meta.clone(),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![hf.access_mode.as_str().into()]),
                storage_class_name: hf.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        hf.cache_size
                            .clone()
                            .unwrap_or_else(|| Quantity("1Ti".into())),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = Job {
            metadata: meta,
            spec: Some(JobSpec {
                backoff_limit: Some(DOWNLOAD_ATTEMPTS - 1),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        // A failed attempt stays as a pod, with its termination message.
                        restart_policy: Some("Never".into()),
                        containers: vec![self.download_container(hf)],
                        volumes: Some(vec![
                            Volume {
                                name: "model".into(),
                                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                    claim_name: name,
                                    read_only: Some(false),
                                }),
                                ..Default::default()
                            },
                            empty_dir("tmp", None, None),
                        ]),
                        ..locked_down_pod()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        Some(ModelCache { claim, job })
    }

    /// `deepseek-worker download` from the worker image: its progress goes to the log as
    /// JSON lines, its result (the commit) or its failure to the termination message.
    fn download_container(&self, hf: &HuggingFaceSource) -> Container {
        let mut args: Vec<String> = [
            "download",
            "--repo",
            &hf.repo,
            "--revision",
            &hf.revision,
            "--dir",
            &join_path(MODEL_MOUNT, CACHE_DIR),
        ]
        .map(String::from)
        .into();
        for glob in CHECKPOINT_FILES {
            args.extend(["--include".to_string(), glob.to_string()]);
        }
        let mut env = vec![env_var("HOME", "/tmp")];
        if let Some(endpoint) = &hf.endpoint {
            env.push(env_var("HF_ENDPOINT", endpoint));
        }
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
            name: "download".into(),
            image: Some(self.worker_image()),
            args: Some(args),
            env: Some(env),
            resources: Some(requests(&[("cpu", "1"), ("memory", "1Gi")])),
            security_context: Some(restricted()),
            volume_mounts: Some(vec![
                volume_mount("model", MODEL_MOUNT),
                volume_mount("tmp", "/tmp"),
            ]),
            ..Default::default()
        }
    }
}
