//! The operator's worker CA (`worker_ca`): its steps, its Secrets, and years of rotations
//! in simulated time, every certificate checked by the verifiers the router and the workers
//! use (`deepseek_proto::tls::Identity`, read from files as from a mounted Secret).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deepseek_operator::worker_ca::{self, Authority, LIFETIMES, Plan, Published};
use deepseek_proto::tls::{Identity, TlsFiles};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;

const DAY: i64 = 24 * 3600;
/// 2027-01-15.
const START: i64 = 1_800_000_000;
const PROPAGATION: i64 = LIFETIMES.propagation.as_secs() as i64;

fn plan(kept: Option<&Authority>, published: Option<(&Published, i64)>, now: i64) -> Plan {
    worker_ca::plan("tiny", kept, published, now, LIFETIMES).unwrap()
}

fn kept(plan: Plan) -> Authority {
    match plan {
        Plan::Keep(authority) => *authority,
        other => panic!("expected Keep, got {other:?}"),
    }
}

/// One version of the pods' Secret, as the files a pod mounts.
struct Version {
    published: Published,
    at: i64,
    identity: Arc<Identity>,
    leaf: CertificateDer<'static>,
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsd-worker-ca-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mount(published: Published, at: i64, dir: &Path) -> Version {
    let dir = dir.join(at.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: Some(dir.join("ca.crt")),
        flags: ["--tls-cert", "--tls-key", "--tls-client-ca"],
    };
    std::fs::write(&files.cert, &published.cert).unwrap();
    std::fs::write(&files.key, &published.key).unwrap();
    std::fs::write(files.ca.as_ref().unwrap(), &published.ca_bundle).unwrap();
    let leaf = CertificateDer::from_pem_slice(published.cert.as_bytes()).unwrap();
    Version {
        identity: Arc::new(Identity::load(files).unwrap()),
        published,
        at,
        leaf,
    }
}

/// Whether a process holding `holder` accepts one holding `peer` at `now`: as a worker
/// checks the router's client certificate, and as the router checks a worker's.
fn accepts(holder: &Version, peer: &Version, now: i64) -> Result<(), rustls::Error> {
    let now = UnixTime::since_unix_epoch(Duration::from_secs(now as u64));
    holder.identity.verify_client_cert(&peer.leaf, &[], now)?;
    let name = ServerName::try_from("10.0.0.7").unwrap();
    holder
        .identity
        .verify_server_cert(&peer.leaf, &[], &name, &[], now)?;
    Ok(())
}

fn trusted_cas(published: &Published) -> usize {
    published.ca_bundle.matches("BEGIN CERTIFICATE").count()
}

/// Versions a pod may still hold at `now`: the last one published a propagation ago or
/// more, and every one since.
fn held_at(versions: &[Version], now: i64) -> &[Version] {
    let published = versions.partition_point(|v| v.at <= now);
    let settled = versions[..published].partition_point(|v| v.at <= now - PROPAGATION);
    &versions[settled.saturating_sub(1)..published]
}

#[test]
fn years_of_rotations_never_leave_two_pods_that_refuse_each_other() {
    let dir = scratch_dir("years");
    let mut authority: Option<Authority> = None;
    let mut versions: Vec<Version> = Vec::new();
    let mut now = START;
    let (mut cas, mut leaves, mut checks, mut mixed) = (0, 0, 0, 0);
    while now < START + 800 * DAY {
        let published = versions.last().map(|v| (&v.published, v.at));
        match plan(authority.as_ref(), published, now) {
            Plan::Keep(next) => {
                let old = authority.replace(*next);
                let new = authority.as_ref().unwrap();
                cas += usize::from(old.as_ref().map(|a| &a.ca) != Some(&new.ca));
                leaves += usize::from(old.as_ref().map(|a| &a.leaf) != Some(&new.leaf));
            }
            Plan::Publish(published) => versions.push(mount(published, now, &dir)),
            Plan::WaitFor(wait) => {
                let wait = wait.as_secs() as i64;
                assert!(wait > 0);
                for t in [now, now + wait / 2, now + wait - 1] {
                    let held = held_at(&versions, t);
                    assert!(held.len() <= 2, "{} versions in pods at {t}", held.len());
                    mixed += usize::from(held.len() == 2);
                    for holder in held {
                        for peer in held {
                            accepts(holder, peer, t).unwrap_or_else(|e| {
                                panic!(
                                    "at day {}: a pod with the version of day {} refuses one with \
                                     the version of day {}: {e}",
                                    (t - START) / DAY,
                                    (holder.at - START) / DAY,
                                    (peer.at - START) / DAY
                                )
                            });
                            checks += 1;
                        }
                    }
                }
                if wait > DAY {
                    let at_rest = &versions.last().unwrap().published;
                    assert_eq!(
                        trusted_cas(at_rest),
                        1,
                        "only the signing CA is trusted at rest"
                    );
                }
                now += wait;
            }
        }
    }
    // 800 days: the first CA, then one every 8 months; a certificate every 20 days, and one
    // from each new CA.
    assert_eq!(cas, 4, "CAs made");
    assert!((40..=45).contains(&leaves), "{leaves} certificates made");
    assert!(
        checks > 500 && mixed > 40,
        "{checks} checks, {mixed} with two versions"
    );
    assert!(versions.iter().all(|v| trusted_cas(&v.published) <= 2));

    // The checks can fail: once the old CA is dropped, a certificate it signed (still within
    // its dates) is refused.
    let dropped = (2..versions.len())
        .find(|&i| {
            trusted_cas(&versions[i - 1].published) == 2 && trusted_cas(&versions[i].published) == 1
        })
        .unwrap();
    let (before_switch, after_drop) = (&versions[dropped - 2], &versions[dropped]);
    let (_, leaf_end) = worker_ca::validity(&before_switch.published.cert, "leaf").unwrap();
    assert!(after_drop.at < leaf_end);
    assert!(accepts(after_drop, before_switch, after_drop.at).is_err());
    assert!(accepts(before_switch, before_switch, after_drop.at).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_first_ca_is_kept_then_published_then_left_until_renewal() {
    let first = kept(plan(None, None, START));
    assert_eq!((first.next.as_ref(), first.previous.as_ref()), (None, None));
    let (ca_start, ca_end) = worker_ca::validity(&first.ca.cert, "ca").unwrap();
    let (leaf_start, leaf_end) = worker_ca::validity(&first.leaf.cert, "leaf").unwrap();
    // Dated an hour back for slow clocks; the certificate ends 30 days on, the CA a year.
    assert_eq!((ca_start, leaf_start), (START - 3600, START - 3600));
    assert_eq!((ca_end - START, leaf_end - START), (365 * DAY, 30 * DAY));

    let Plan::Publish(published) = plan(Some(&first), None, START) else {
        panic!("a new CA is published")
    };
    assert_eq!(published, first.published());
    assert_eq!(trusted_cas(&published), 1);
    let Plan::WaitFor(wait) = plan(Some(&first), Some((&published, START)), START + 60) else {
        panic!("waits for the pods")
    };
    assert_eq!(wait.as_secs() as i64, PROPAGATION - 60);
    // Settled: nothing until the certificate is two thirds through its life.
    let settled = START + PROPAGATION;
    let Plan::WaitFor(wait) = plan(Some(&first), Some((&published, START)), settled) else {
        panic!("waits for the renewal")
    };
    assert_eq!(
        settled + wait.as_secs() as i64,
        leaf_start + (leaf_end - leaf_start) * 2 / 3
    );

    // A Secret edited by hand is published again; one the pods were not given yet, too.
    let mut edited = published.clone();
    edited.ca_bundle.push_str(&first.ca.cert);
    assert!(
        matches!(plan(Some(&first), Some((&edited, START)), settled), Plan::Publish(p) if p == published)
    );

    // A CA that has ended (the operator was away) is replaced outright.
    let later = kept(plan(Some(&first), Some((&published, START)), ca_end));
    assert_ne!(later.ca, first.ca);
    assert_eq!(later.previous, None);
}

#[test]
fn the_secrets_hold_the_state_and_what_pods_mount() {
    let authority = kept(plan(None, None, START));
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "serving.deepseek-operator.io/v1alpha1".into(),
        kind: "DeepSeekDeployment".into(),
        name: "tiny".into(),
        uid: "u1".into(),
        controller: Some(true),
        ..Default::default()
    };
    let kept_secret = worker_ca::authority_secret("tiny", Some(owner.clone()), &authority);
    assert_eq!(kept_secret.metadata.name.as_deref(), Some("tiny-worker-ca"));
    assert_eq!(
        kept_secret.metadata.owner_references,
        Some(vec![owner.clone()])
    );
    assert_eq!(
        worker_ca::authority_from(&kept_secret),
        Some(authority.clone())
    );
    let mut incomplete = kept_secret.clone();
    incomplete.data.as_mut().unwrap().remove("ca.key");
    assert_eq!(worker_ca::authority_from(&incomplete), None);

    let published = authority.published();
    let shown = worker_ca::published_secret("tiny", Some(owner), &published, START);
    assert_eq!(shown.metadata.name.as_deref(), Some("tiny-worker-tls"));
    assert_eq!(shown.type_.as_deref(), Some("kubernetes.io/tls"));
    let entries: Vec<&String> = shown.data.as_ref().unwrap().keys().collect();
    assert_eq!(
        entries,
        ["ca.crt", "tls.crt", "tls.key"],
        "no CA key for the pods"
    );
    assert_eq!(
        shown.metadata.annotations.as_ref().unwrap()["serving.deepseek-operator.io/published-at"],
        "2027-01-15T08:00:00Z"
    );
    assert_eq!(worker_ca::published_from(&shown), Some((published, START)));

    let mut garbled = authority.clone();
    garbled.ca.cert = "not a certificate".into();
    let err = worker_ca::plan("tiny", Some(&garbled), None, START, LIFETIMES).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the CA: not a PEM certificate (delete that Secret to make a new CA)"
    );
}
