//! The CA the operator keeps for a deployment whose `spec.workerTls` names no Secret: it
//! signs the one certificate the router and the workers show each other, and is rotated
//! without a failed handshake.
//!
//! Two Secrets hold it. `{name}-worker-ca` is the operator's own (pods never mount it): the
//! CA that signs now, with its key; the next CA while trust in it spreads, or the previous
//! one while the certificate it no longer signs is replaced; and that certificate and key.
//! `{name}-worker-tls` is what the pods mount, derived from it: `ca.crt` (every CA trusted
//! now), `tls.crt`, `tls.key`, and when it last changed.
//!
//! Pods see a change of a mounted Secret up to a minute or two later, each at its own time,
//! so for a while some run the last version and some the new one. Each step therefore waits
//! until the last one has reached every pod (`Lifetimes::propagation`), and any two
//! consecutive versions trust each other's certificate:
//! 1. a CA nears its end: the next one is added to the trust;
//! 2. the next one signs a new certificate; the old CA stays trusted;
//! 3. the old CA is dropped.
//!
//! A certificate nearing its end is renewed by the same CA. `plan` decides (pure, but for
//! the keys it draws); the controller reads and writes the Secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::names::{
    ANNOTATION_TLS_PUBLISHED, COMPONENT_WORKER_TLS, TLS_CA_ENTRY, TLS_CERT_ENTRY, TLS_KEY_ENTRY,
    common_labels, worker_ca_secret_name, worker_tls_secret_name,
};

/// A certificate and its private key, PEM.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// Everything the operator keeps (the `{name}-worker-ca` Secret).
#[derive(Clone, Debug, PartialEq)]
pub struct Authority {
    /// Signs `leaf`.
    pub ca: Pair,
    /// Trusted, not signing yet.
    pub next: Option<Pair>,
    /// Trusted, no longer signing (its certificate only).
    pub previous: Option<String>,
    /// The certificate the router and the workers show.
    pub leaf: Pair,
}

/// What the pods mount (the `{name}-worker-tls` Secret's entries).
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// Every CA trusted now, PEM one after another.
    pub ca_bundle: String,
    pub cert: String,
    pub key: String,
}

impl Authority {
    pub fn published(&self) -> Published {
        let trusted = [Some(&self.ca.cert), self.next.as_ref().map(|n| &n.cert)]
            .into_iter()
            .flatten()
            .chain(&self.previous);
        Published {
            ca_bundle: trusted.map(String::as_str).collect(),
            cert: self.leaf.cert.clone(),
            key: self.leaf.key.clone(),
        }
    }
}

/// The operator's Secret of `authority`; owned by the deployment, so it goes with it.
pub fn authority_secret(
    deployment: &str,
    owner: Option<OwnerReference>,
    authority: &Authority,
) -> Secret {
    let pairs = [
        (TLS_CA_ENTRY, Some(&authority.ca.cert)),
        ("ca.key", Some(&authority.ca.key)),
        ("next.crt", authority.next.as_ref().map(|n| &n.cert)),
        ("next.key", authority.next.as_ref().map(|n| &n.key)),
        ("previous.crt", authority.previous.as_ref()),
        (TLS_CERT_ENTRY, Some(&authority.leaf.cert)),
        (TLS_KEY_ENTRY, Some(&authority.leaf.key)),
    ];
    let data = pairs
        .into_iter()
        .filter_map(|(entry, value)| Some((entry.to_string(), bytes(value?))))
        .collect();
    secret(
        worker_ca_secret_name(deployment),
        deployment,
        owner,
        data,
        None,
    )
}

/// What the operator's Secret holds; none when it lacks an entry (made again then).
pub fn authority_from(secret: &Secret) -> Option<Authority> {
    let entry = |name: &str| text_entry(secret, name);
    let pair = |cert: &str, key: &str| {
        Some(Pair {
            cert: entry(cert)?,
            key: entry(key)?,
        })
    };
    Some(Authority {
        ca: pair(TLS_CA_ENTRY, "ca.key")?,
        next: pair("next.crt", "next.key"),
        previous: entry("previous.crt"),
        leaf: pair(TLS_CERT_ENTRY, TLS_KEY_ENTRY)?,
    })
}

/// The `kubernetes.io/tls` Secret the pods mount, noting when it was published.
pub fn published_secret(
    deployment: &str,
    owner: Option<OwnerReference>,
    published: &Published,
    at: i64,
) -> Secret {
    let data = [
        (TLS_CA_ENTRY, &published.ca_bundle),
        (TLS_CERT_ENTRY, &published.cert),
        (TLS_KEY_ENTRY, &published.key),
    ]
    .into_iter()
    .map(|(entry, value)| (entry.to_string(), bytes(value)))
    .collect();
    let at = Timestamp::from_second(at).unwrap_or(Timestamp::UNIX_EPOCH);
    let mut secret = secret(
        worker_tls_secret_name(deployment),
        deployment,
        owner,
        data,
        Some("kubernetes.io/tls"),
    );
    secret.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_TLS_PUBLISHED.to_string(),
        at.to_string(),
    )]));
    secret
}

/// What the pods' Secret holds and when it was published; none when it was not all made
/// here (published again then).
pub fn published_from(secret: &Secret) -> Option<(Published, i64)> {
    let entry = |name: &str| text_entry(secret, name);
    let at: Timestamp = secret
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TLS_PUBLISHED)?
        .parse()
        .ok()?;
    let published = Published {
        ca_bundle: entry(TLS_CA_ENTRY)?,
        cert: entry(TLS_CERT_ENTRY)?,
        key: entry(TLS_KEY_ENTRY)?,
    };
    Some((published, at.as_second()))
}

/// A Secret's entry as text; none when missing or not UTF-8.
fn text_entry(secret: &Secret, name: &str) -> Option<String> {
    let value = secret.data.as_ref()?.get(name)?;
    String::from_utf8(value.0.clone()).ok()
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

fn secret(
    name: String,
    deployment: &str,
    owner: Option<OwnerReference>,
    data: BTreeMap<String, ByteString>,
    type_: Option<&str>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(common_labels(deployment, COMPONENT_WORKER_TLS)),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(data),
        type_: type_.map(str::to_string),
        ..Default::default()
    }
}

/// How long certificates live, and how long a Secret's change takes to reach every pod.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub ca: Duration,
    pub leaf: Duration,
    /// The kubelet refreshes mounted Secrets within about a minute, and the router and the
    /// workers read the files every 10 s.
    pub propagation: Duration,
}

pub const LIFETIMES: Lifetimes = Lifetimes {
    ca: Duration::from_secs(365 * 24 * 3600),
    leaf: Duration::from_secs(30 * 24 * 3600),
    propagation: Duration::from_secs(5 * 60),
};

/// Certificates start this long before they are made, for clocks a little behind.
const CLOCK_SKEW: i64 = 3600;

/// What to do next.
#[derive(Debug)]
pub enum Plan {
    /// Keep this as the operator's state (the `{name}-worker-ca` Secret).
    Keep(Box<Authority>),
    /// Give the pods this (the `{name}-worker-tls` Secret), noting the time.
    Publish(Published),
    /// Nothing until then (or until the Secrets change).
    WaitFor(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Only an edit of the operator's Secret makes one; deleting that Secret starts over.
    #[error("{what}: not a PEM certificate (delete that Secret to make a new CA)")]
    Unreadable { what: &'static str },
    #[error("making a certificate: {0}")]
    Making(#[from] rcgen::Error),
    #[error("Unix time {0} is out of a certificate's range")]
    TimeOutOfRange(i64),
}

/// The next step, at `now` (Unix seconds), for what the operator keeps and what the pods
/// were last given (with when).
pub fn plan(
    deployment: &str,
    kept: Option<&Authority>,
    published: Option<(&Published, i64)>,
    now: i64,
    lifetimes: Lifetimes,
) -> Result<Plan, CaError> {
    let fresh = || -> Result<Plan, CaError> {
        let ca = new_ca(deployment, now, lifetimes)?;
        let leaf = new_leaf(deployment, &ca, now, lifetimes)?;
        Ok(Plan::Keep(Box::new(Authority {
            ca,
            next: None,
            previous: None,
            leaf,
        })))
    };
    let Some(kept) = kept else {
        return fresh();
    };
    let (_, ca_end) = validity(&kept.ca.cert, "the CA")?;
    if now >= ca_end {
        // Nothing it signed is valid any more: start again (the operator was away too long).
        return fresh();
    }
    let Some((_, changed_at)) = published.filter(|(shown, _)| **shown == kept.published()) else {
        return Ok(Plan::Publish(kept.published()));
    };
    let settled_at = changed_at.saturating_add(secs(lifetimes.propagation));
    if now < settled_at {
        return Ok(Plan::WaitFor(until(now, settled_at)));
    }
    let mut next = kept.clone();
    if let Some(incoming) = next.next.take() {
        next.previous = Some(std::mem::replace(&mut next.ca, incoming).cert);
        next.leaf = new_leaf(deployment, &next.ca, now, lifetimes)?;
        return Ok(Plan::Keep(Box::new(next)));
    }
    if next.previous.take().is_some() {
        return Ok(Plan::Keep(Box::new(next)));
    }
    let ca_renewal = renewal_time(&kept.ca.cert, "the CA")?;
    if now >= ca_renewal {
        next.next = Some(new_ca(deployment, now, lifetimes)?);
        return Ok(Plan::Keep(Box::new(next)));
    }
    let leaf_renewal = renewal_time(&kept.leaf.cert, "the certificate")?;
    if now >= leaf_renewal {
        next.leaf = new_leaf(deployment, &kept.ca, now, lifetimes)?;
        return Ok(Plan::Keep(Box::new(next)));
    }
    Ok(Plan::WaitFor(until(now, ca_renewal.min(leaf_renewal))))
}

/// Two thirds into a certificate's life, as cert-manager renews.
fn renewal_time(cert: &str, what: &'static str) -> Result<i64, CaError> {
    let (start, end) = validity(cert, what)?;
    Ok(start + (end - start) * 2 / 3)
}

/// A certificate's not-before and not-after, Unix seconds.
pub fn validity(cert: &str, what: &'static str) -> Result<(i64, i64), CaError> {
    let unreadable = || CaError::Unreadable { what };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).map_err(|_| unreadable())?;
    let x509 = pem.parse_x509().map_err(|_| unreadable())?;
    let validity = x509.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

fn until(now: i64, then: i64) -> Duration {
    Duration::from_secs(then.saturating_sub(now).max(1) as u64)
}

fn params(common_name: String, start: i64, end: i64) -> Result<CertificateParams, CaError> {
    let time = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| CaError::TimeOutOfRange(t))
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = time(start - CLOCK_SKEW)?;
    params.not_after = time(end)?;
    Ok(params)
}

fn new_ca(deployment: &str, now: i64, lifetimes: Lifetimes) -> Result<Pair, CaError> {
    let key = KeyPair::generate()?;
    // Named by its start, so the CAs of one deployment are told apart.
    let mut params = params(
        format!("{deployment} worker CA {now}"),
        now,
        now + secs(lifetimes.ca),
    )?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The router's and the workers' certificate, for server and client auth; its name is not
/// checked (peers are checked against the CA only, see `deepseek_proto::tls`). It ends no
/// later than its CA.
fn new_leaf(deployment: &str, ca: &Pair, now: i64, lifetimes: Lifetimes) -> Result<Pair, CaError> {
    let (_, ca_end) = validity(&ca.cert, "the CA")?;
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = params(
        format!("{deployment}-worker"),
        now,
        (now + secs(lifetimes.leaf)).min(ca_end),
    )?;
    params.subject_alt_names = vec![rcgen::SanType::DnsName(
        format!("{deployment}-worker").try_into()?,
    )];
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}
