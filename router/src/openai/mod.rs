//! The OpenAI-compatible HTTP front: `POST /v1/chat/completions`, `POST /v1/completions`
//! (streaming as server-sent events ending in `data: [DONE]`, or one JSON body) and
//! `GET /v1/models`. Requests become `deepseek.v1.GenerateRequest`s and go through the same
//! routing as gRPC. Every client mistake is a 4xx with an OpenAI-shaped error body.
//!
//! `request` reads and checks bodies, `error` shapes failures, `stream` writes chunks and
//! server-sent events; this module authorises, routes and answers.

mod error;
mod request;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deepseek_proto::v1::generate_request::Prompt;
use deepseek_proto::v1::{ChatMessages, GenerateRequest, ToolChoice};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use self::error::ApiError;
use self::request::{
    ChatRequest, Common, CompletionRequest, chat_messages, fields, parse_body, refuse_alternatives,
};
use self::stream::{Frame, Kind, finish_reason, sse, token_pieces, tool_call_json, usage_json};
use crate::auth::{ApiKeys, Caller, Key};
use crate::proxy::{ResponseStream, Router};

/// Shared by the handlers.
pub struct Http {
    pub router: Arc<Router>,
    pub keys: Arc<ApiKeys>,
    /// `--served-name`, or what the workers report (set by the health loop).
    pub served_name: Arc<OnceLock<String>>,
}

pub fn app(state: Arc<Http>) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").with_code("not_found")
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here"),
            )
            .with_code("method_not_allowed")
        })
        .with_state(state)
}

/// The request body, or an OpenAI error saying why it could not be read (too large, say).
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The API key the request carries (`None` when no keys are configured).
fn authorize(http: &Http, headers: &HeaderMap) -> Result<Option<Arc<Key>>, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match http.keys.authorize(authorization) {
        Some(Caller::Anyone) => return Ok(None),
        Some(Caller::Key(key)) => return Ok(Some(key)),
        None => {}
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or unknown API key: send `Authorization: Bearer KEY`",
    )
    .with_code("invalid_api_key"))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// `prefix-<16 hex digits>`, unique within the process and unlikely to repeat across replicas.
fn new_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:016x}",
        nanos.rotate_left(17) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Authorises, admits under the key's rate limit, and parses a request: the caller's key,
/// the shared fields, checked, and the endpoint's own.
fn read_request<T: DeserializeOwned>(
    http: &Http,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Option<Arc<Key>>, Common, T), ApiError> {
    let key = authorize(http, headers)?;
    if let Some(key) = &key {
        key.admit()
            .map_err(|wait| ApiError::rate_limited(key.name(), wait))?;
    }
    let body = parse_body(body)?;
    let common: Common = fields(&body)?;
    common.check(http.served_name.get().map(String::as_str))?;
    Ok((key, common, fields(&body)?))
}

async fn chat_completions(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (key, common, request): (_, Common, ChatRequest) = read_request(&http, &headers, &body)?;
    refuse_alternatives("top_logprobs", request.top_logprobs)?;
    let tools = request.tools()?;
    let messages = chat_messages(request.messages)?;
    let max_tokens = request.max_completion_tokens.or(common.max_tokens);
    let prompt = Prompt::Chat(ChatMessages {
        messages,
        tools_json: tools.json,
    });
    let options = Options {
        logprobs: request.logprobs,
        reasoning_in_text: !request.separate_reasoning,
        tool_choice: (tools.choice, tools.function),
    };
    let caller = Origin::new(key, headers);
    respond(
        &http,
        caller,
        Kind::Chat,
        common,
        prompt,
        max_tokens,
        options,
    )
    .await
}

async fn completions(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (key, common, request): (_, Common, CompletionRequest) =
        read_request(&http, &headers, &body)?;
    for (name, refused) in [("echo", request.echo), ("suffix", request.suffix.is_some())] {
        if refused {
            return Err(ApiError::invalid(name, "not supported yet"));
        }
    }
    if let Some(name) = request.chat_only() {
        return Err(ApiError::invalid(
            name,
            "only /v1/chat/completions takes tools",
        ));
    }
    refuse_alternatives("logprobs", request.logprobs)?;
    let prompt = request.prompt.into_prompt()?;
    // OpenAI's completions default to 16 tokens.
    let max_tokens = Some(common.max_tokens.unwrap_or(16));
    // A completion is the raw continuation of its prompt, thinking included.
    let options = Options {
        logprobs: request.logprobs.is_some(),
        reasoning_in_text: true,
        tool_choice: (ToolChoice::Auto, String::new()),
    };
    respond(
        &http,
        Origin::new(key, headers),
        Kind::Completion,
        common,
        prompt,
        max_tokens,
        options,
    )
    .await
}

async fn models(State(http): State<Arc<Http>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&http, &headers)?;
    let data: Vec<Value> = http
        .served_name
        .get()
        .map(|name| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": "deepseek-operator"})
        })
        .into_iter()
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

/// What an endpoint asks of the worker beyond the shared fields.
struct Options {
    /// Each token's log-probability.
    logprobs: bool,
    reasoning_in_text: bool,
    /// Which calls the reply may make, and the function of `ToolChoice::Function`.
    tool_choice: (ToolChoice, String),
}

/// Who asks: the API key (when keys are in use) and the trace the request continues.
struct Origin {
    key: Option<Arc<Key>>,
    trace: tonic::metadata::MetadataMap,
}

impl Origin {
    fn new(key: Option<Arc<Key>>, headers: HeaderMap) -> Self {
        let trace = tonic::metadata::MetadataMap::from_headers(headers);
        Origin { key, trace }
    }
}

/// Routes the request and writes the answer: SSE chunks when `stream`, else one body.
async fn respond(
    http: &Http,
    Origin { key, trace }: Origin,
    kind: Kind,
    common: Common,
    prompt: Prompt,
    max_tokens: Option<u32>,
    options: Options,
) -> Result<Response, ApiError> {
    let Options {
        logprobs,
        reasoning_in_text,
        tool_choice: (tool_choice, tool_choice_function),
    } = options;
    let id = match kind {
        Kind::Chat => new_id("chatcmpl"),
        Kind::Completion => new_id("cmpl"),
    };
    let model = common.model.clone();
    let stream = common.stream;
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let request = GenerateRequest {
        tool_choice: tool_choice as i32,
        tool_choice_function,
        ..common.into_request(prompt, max_tokens, id.clone(), logprobs, reasoning_in_text)
    };
    let messages = http.router.generate(request, None, key, &trace).await?;
    let frame = Frame {
        kind,
        id,
        model,
        created: unix_now(),
        logprobs,
    };
    if stream {
        return Ok(sse(frame, messages, include_usage));
    }
    whole_body(frame, messages).await
}

/// The answer as one JSON body, once the worker has finished.
async fn whole_body(frame: Frame, mut messages: ResponseStream) -> Result<Response, ApiError> {
    let (mut text, mut reasoning) = (String::new(), String::new());
    let mut calls = Vec::new();
    let mut pieces: Vec<(String, f32)> = Vec::new();
    let mut last = None;
    while let Some(message) = messages.next().await {
        let message = message?;
        match (token_pieces(&message), pieces.last_mut()) {
            // text released with no token (the decoder's tail at the end) joins the last one
            (new, Some(last)) if new.is_empty() => last.0.push_str(&message.text),
            (new, _) => pieces.extend(new),
        }
        text.push_str(&message.text);
        reasoning.push_str(&message.reasoning_text);
        calls.extend(
            message
                .tool_calls
                .iter()
                .map(|call| tool_call_json(None, call)),
        );
        last = Some(message);
    }
    let last = last.unwrap_or_default();
    let logprobs = frame.logprobs_json(&pieces, 0);
    let finish = finish_reason(last.finish_reason, !calls.is_empty());
    let (object, choice) = match frame.kind {
        Kind::Chat => (
            "chat.completion",
            json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    // OpenAI's content is null beside calls with no text.
                    "content": (calls.is_empty() || !text.is_empty()).then_some(text),
                    "reasoning_content": (!reasoning.is_empty()).then_some(reasoning),
                    "tool_calls": (!calls.is_empty()).then_some(calls),
                },
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        ),
        Kind::Completion => (
            "text_completion",
            json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        ),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": frame.id,
            "object": object,
            "created": frame.created,
            "model": frame.model,
            "choices": [choice],
            "usage": usage_json(&last),
        }),
    ))
}
