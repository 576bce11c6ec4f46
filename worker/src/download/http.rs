//! A small HTTP(S) client for the hub: redirects followed (the bearer token sent to the
//! hub's own host only, never to the storage it redirects to), ranges asked, bodies
//! streamed. rustls with the system's CA certificates.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, BodyStream, Empty};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, LOCATION, RANGE, USER_AGENT};
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const REDIRECTS: usize = 10;

/// Bytes read from a connection at once.
const READ_BUFFER: usize = 1 << 20;

/// How long the hub may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    token: Option<String>,
    /// The hub's `host:port`, the only one the token goes to.
    hub: Option<String>,
}

/// A whole small answer.
pub struct Answer {
    pub status: u16,
    /// The hub's `X-Error-Code` (`RevisionNotFound`, `RepoNotFound`, …).
    pub error_code: Option<String>,
    pub body: Vec<u8>,
}

impl Http {
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, String> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| format!("HF_ENDPOINT {endpoint:?}: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("the system's CA certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Http {
            // Large reads: a checkpoint is hundreds of GB, and each read is a system call.
            client: Client::builder(TokioExecutor::new())
                .http1_read_buf_exact_size(READ_BUFFER)
                .build(connector),
            token: token.filter(|t| !t.is_empty()),
            hub: uri.authority().map(|a| a.to_string()),
        })
    }

    /// `GET url` from byte `offset` (a range request when above 0), following redirects.
    pub async fn get_from(&self, url: &str, offset: u64) -> Result<Response<Incoming>, String> {
        let mut uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        for _ in 0..REDIRECTS {
            let mut request = Request::get(uri.clone()).header(
                USER_AGENT,
                concat!("deepseek-worker/", env!("CARGO_PKG_VERSION")),
            );
            if offset > 0 {
                request = request.header(RANGE, format!("bytes={offset}-"));
            }
            let to_hub = uri.authority().map(|a| a.as_str()) == self.hub.as_deref();
            if let Some(token) = self.token.as_ref().filter(|_| to_hub) {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
            let response = tokio::time::timeout(ANSWER_TIMEOUT, self.client.request(request))
                .await
                .map_err(|_| format!("{uri}: no answer within {} s", ANSWER_TIMEOUT.as_secs()))?
                .map_err(|e| format!("{uri}: {e}"))?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("{uri}: a redirect without a Location"))?;
            uri = redirect_target(&uri, location)?;
        }
        Err(format!("{url}: more than {REDIRECTS} redirects"))
    }

    /// `GET url`, the whole answer (for the hub's small JSON answers).
    pub async fn get_body(&self, url: &str) -> Result<Answer, String> {
        let response = self.get_from(url, 0).await?;
        let status = response.status().as_u16();
        let error_code = response
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            error_code,
            body,
        })
    }
}

/// The data of a response's body, chunk by chunk.
pub fn body_stream(response: Response<Incoming>) -> impl Stream<Item = Result<Bytes, String>> {
    BodyStream::new(response.into_body()).filter_map(|frame| async move {
        match frame {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(e.to_string())),
        }
    })
}

/// Where a redirect's `Location` points, absolute or relative to the URL it came from.
fn redirect_target(from: &Uri, location: &str) -> Result<Uri, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{from}: redirect to {location:?}: {e}");
    if location.contains("://") {
        return location.parse().map_err(|e| bad(&e));
    }
    let scheme = from.scheme_str().unwrap_or("https");
    let authority = from.authority().map_or("", |a| a.as_str());
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = from.path().rsplit_once('/').map_or("", |(dir, _)| dir);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_and_relative() {
        let from: Uri = "https://hub.example/o/n/resolve/abc/model.safetensors"
            .parse()
            .unwrap();
        let target = |location| redirect_target(&from, location).unwrap().to_string();
        assert_eq!(
            target("https://cdn.example/x?sig=1"),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            target("/api/resolve-cache/o/n/abc/f"),
            "https://hub.example/api/resolve-cache/o/n/abc/f"
        );
        assert_eq!(
            target("other.safetensors"),
            "https://hub.example/o/n/resolve/abc/other.safetensors"
        );
    }
}
