//! The OpenAI error body and how gRPC statuses map onto it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::json_response;

/// An OpenAI error: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) param: Option<String>,
    pub(super) code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 429 for a key over its rate limit, with when to retry.
    pub(super) fn rate_limited(key: &str, wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs() + 1;
        ApiError {
            retry_after: Some(seconds),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("API key {key} is over its rate limit; retry in {seconds} s"),
            )
            .with_code("rate_limit_exceeded")
        }
    }

    pub(super) fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                format!("{param}: {}", message.into()),
            )
        }
    }

    pub(super) fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    pub(super) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// A worker's or the router's gRPC status as the HTTP error a client would expect. The
/// worker names proto fields (`stopping.max_new_tokens: …`); the OpenAI name is reported as
/// `param`.
impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let status_code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        // The worker names the proto field in a google.rpc.BadRequest field violation.
        let field = status
            .get_details_bad_request()
            .and_then(|bad| bad.field_violations.into_iter().next())
            .map(|violation| violation.field)
            .unwrap_or_default();
        // The first prefix that matches names it.
        let param = [
            ("prompt.chat.tools_json", "tools"),
            ("prompt.chat", "messages"),
            ("tool_choice", "tool_choice"),
            ("prompt", "prompt"),
            ("stopping.max_new_tokens", "max_tokens"),
            ("stopping.stop", "stop"),
            ("sampling.temperature", "temperature"),
            ("sampling.top_p", "top_p"),
            ("sampling.top_k", "top_k"),
            ("sampling.min_p", "min_p"),
            ("sampling.repetition_penalty", "repetition_penalty"),
        ]
        .iter()
        .find(|(proto, _)| field.starts_with(proto))
        .map(|(_, openai)| openai.to_string());
        let retry_after = status
            .metadata()
            .get(crate::proxy::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        ApiError {
            status: status_code,
            message: status.message().to_string(),
            param: param.filter(|_| status_code == StatusCode::BAD_REQUEST),
            code: None,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn worker_statuses_become_http_errors_with_openai_params() {
        let err = ApiError::from(Status::with_error_details(
            Code::InvalidArgument,
            "stopping.max_new_tokens: 100000 exceeds the context",
            ErrorDetails::with_bad_request_violation(
                "stopping.max_new_tokens",
                "100000 exceeds the context",
            ),
        ));
        assert_eq!(
            (err.status, err.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("max_tokens"))
        );
        assert_eq!(err.body()["error"]["type"], "invalid_request_error");
        for (field, param) in [
            ("prompt.chat.tools_json", "tools"),
            ("prompt.chat.messages", "messages"),
            ("tool_choice_function", "tool_choice"),
            ("prompt.token_ids", "prompt"),
        ] {
            let err = ApiError::from(Status::with_error_details(
                Code::InvalidArgument,
                "x",
                ErrorDetails::with_bad_request_violation(field, "x"),
            ));
            assert_eq!(err.param.as_deref(), Some(param), "{field}");
        }
        let busy = ApiError::from(Status::resource_exhausted("full"));
        assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.body()["error"]["type"], "rate_limit_error");
        assert_eq!(
            ApiError::from(Status::internal("boom")).status,
            StatusCode::BAD_GATEWAY
        );
    }
}
