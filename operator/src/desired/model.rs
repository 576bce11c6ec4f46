//! Where a worker finds the checkpoint: a PersistentVolumeClaim mounted read-only, or an
//! emptyDir an init container fills from the Hugging Face Hub.

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PersistentVolumeClaimVolumeSource, SecretKeySelector, Volume,
};

use super::Ctx;
use super::k8s::{empty_dir, env_var, join_path, requests, restricted, volume_mount};
use crate::api::HuggingFaceSource;
use crate::names::MODEL_MOUNT;

pub(super) struct ModelVolume {
    pub(super) volume: Volume,
    pub(super) init_container: Option<Container>,
    /// Directory of the checkpoint inside the worker container.
    pub(super) path: String,
}

impl Ctx<'_> {
    pub(super) fn model_volume(&self) -> ModelVolume {
        let source = &self.dsd.spec.model.source;
        match (&source.pvc, &source.hugging_face) {
            (Some(pvc), _) => ModelVolume {
                volume: Volume {
                    name: "model".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: pvc.claim_name.clone(),
                        read_only: Some(true),
                    }),
                    ..Default::default()
                },
                init_container: None,
                path: join_path(MODEL_MOUNT, pvc.path.as_deref().unwrap_or("")),
            },
            (None, hf) => {
                let init = hf.as_ref().map(hf_download_container);
                ModelVolume {
                    volume: empty_dir(
                        "model",
                        None,
                        hf.as_ref().and_then(|hf| hf.cache_size.clone()),
                    ),
                    init_container: init,
                    path: format!("{MODEL_MOUNT}/model"),
                }
            }
        }
    }
}

/// Downloads the checkpoint into the pod's model volume before the worker starts. A stock
/// Python image plus `huggingface_hub` from PyPI keeps the worker image free of a Hub client.
fn hf_download_container(hf: &HuggingFaceSource) -> Container {
    const SCRIPT: &str = "\
import os, subprocess, sys
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-cache-dir',
                       '--target', '/tmp/pip', 'huggingface_hub>=0.30'])
sys.path.insert(0, '/tmp/pip')
from huggingface_hub import snapshot_download
snapshot_download(repo_id=os.environ['HF_REPO'], revision=os.environ['HF_REVISION'],
                  local_dir='/models/model')
";
    let mut env = vec![
        env_var("HF_REPO", &hf.repo),
        env_var("HF_REVISION", &hf.revision),
        env_var("HOME", "/tmp"),
        env_var("HF_HOME", "/tmp/hf"),
    ];
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
        name: "model-download".into(),
        image: Some(hf.downloader_image.clone()),
        command: Some(vec!["python3".into(), "-c".into(), SCRIPT.into()]),
        env: Some(env),
        resources: Some(requests(&[("cpu", "1"), ("memory", "2Gi")])),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![
            volume_mount("model", MODEL_MOUNT),
            volume_mount("tmp", "/tmp"),
        ]),
        ..Default::default()
    }
}
