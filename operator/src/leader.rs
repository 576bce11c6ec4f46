//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas can run and
//! only one reconciles. The decision is a pure function; the loop around it is thin I/O with
//! optimistic concurrency (a replace carries the resourceVersion it read).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::error::Error;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a follower retries).
    pub retry: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the lease (it is free or expired); `transitions` is the new transition count.
    Acquire { transitions: i32 },
    /// We hold it: renew.
    Renew,
    /// Someone else holds a valid lease.
    Follow { holder: String },
}

/// What to do with the lease as it stands at `now`.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire { transitions: 0 };
    };
    let transitions = spec.lease_transitions.unwrap_or(0);
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    let expires = spec
        .renew_time
        .as_ref()
        .map(|t| t.0 + SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).into()));
    match expires {
        Some(expires) if !holder.is_empty() && expires > now => Decision::Follow {
            holder: holder.into(),
        },
        _ => Decision::Acquire {
            transitions: transitions + 1,
        },
    }
}

/// Runs forever: acquires the lease, keeps renewing it, and publishes `true` on `leading`
/// while this replica holds it. Returns an error when a held lease could not be renewed
/// before it expired; the caller must stop reconciling (exit) then.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
) -> Result<(), Error> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match try_once(&api, &config).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(lease = %config.name, identity = %config.identity, "became leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    return Err(Error::LostLease(config.name.clone()));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, lease = %config.name, "lease update failed");
                if last_renewed.is_some_and(|t| t.elapsed() >= config.duration) {
                    return Err(Error::LeaseExpired {
                        lease: config.name.clone(),
                        within: config.duration,
                    });
                }
            }
        }
        tokio::time::sleep(config.retry).await;
    }
}

/// One round: read, decide, write. `Ok(true)` when we hold the lease afterwards.
async fn try_once(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let mut next = spec.cloned().unwrap_or_default();
    match decide(spec, &config.identity, now) {
        Decision::Follow { .. } => return Ok(false),
        Decision::Renew => {}
        Decision::Acquire { transitions } => {
            next.holder_identity = Some(config.identity.clone());
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(transitions);
        }
    }
    next.renew_time = Some(MicroTime(now));
    next.lease_duration_seconds = Some(config.duration.as_secs() as i32);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            resource_version: current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..Default::default()
        },
        spec: Some(next),
    };
    let written = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => {
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(_) => Ok(true),
        // Another replica wrote first; it wins this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(
                now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(4),
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_missing_lease_is_acquired() {
        assert_eq!(
            decide(None, "a", now()),
            Decision::Acquire { transitions: 0 }
        );
    }

    #[test]
    fn the_holder_renews_even_when_late() {
        assert_eq!(
            decide(Some(&lease("a", 100, 15)), "a", now()),
            Decision::Renew
        );
    }

    #[test]
    fn a_valid_lease_of_another_replica_is_respected() {
        let decision = decide(Some(&lease("b", 5, 15)), "a", now());
        assert_eq!(decision, Decision::Follow { holder: "b".into() });
    }

    #[test]
    fn an_expired_or_released_lease_is_taken_over() {
        assert_eq!(
            decide(Some(&lease("b", 16, 15)), "a", now()),
            Decision::Acquire { transitions: 5 }
        );
        assert_eq!(
            decide(Some(&lease("", 1, 15)), "a", now()),
            Decision::Acquire { transitions: 5 }
        );
    }
}
