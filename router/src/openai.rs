//! The OpenAI-compatible HTTP front: `POST /v1/chat/completions`, `POST /v1/completions`
//! (streaming as server-sent events ending in `data: [DONE]`, or one JSON body) and
//! `GET /v1/models`. Requests become `deepseek.v1.GenerateRequest`s and go through the same
//! routing as gRPC. Every client mistake is a 4xx with an OpenAI-shaped error body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deepseek_proto::v1::generate_request::Prompt;
use deepseek_proto::v1::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, GenerateResponse, SamplingParams,
    StoppingCriteria, TokenIds,
};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::auth::ApiKeys;
use crate::proxy::Router;

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
        .with_state(state)
}

/// An OpenAI error: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                format!("{param}: {}", message.into()),
            )
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
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

    fn body(&self) -> Value {
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
        json_response(self.status, &self.body())
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
        let param = [
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
        ApiError {
            status: status_code,
            message: status.message().to_string(),
            param: param.filter(|_| status_code == StatusCode::BAD_REQUEST),
            code: None,
        }
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

fn authorize(http: &Http, headers: &HeaderMap) -> Result<(), ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if http.keys.allows(authorization) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or unknown API key: send `Authorization: Bearer KEY`",
    )
    .with_code("invalid_api_key"))
}

/// Parses a JSON body into an object.
fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body is not a valid request: expected a JSON object",
        ));
    }
    Ok(value)
}

/// Reads some of a request's fields; the error names the offending one
/// (`messages[0].content: …`). Fields the target does not know are left alone.
fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            ApiError::new(StatusCode::BAD_REQUEST, message)
        } else {
            ApiError::invalid(&path, message)
        }
    })
}

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or parts of which only `text` ones are supported.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What both endpoints share. Fields OpenAI defines that change nothing here (`user`,
/// `logit_bias` absent, …) are accepted and ignored; ones we cannot honour are refused.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

/// `prompt`: a string, token ids, or a one-element list of either.
#[derive(Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: CompletionPrompt,
    #[serde(default)]
    echo: bool,
    logprobs: Option<u32>,
    suffix: Option<String>,
}

/// The two endpoints' differences in the responses they write.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Common {
    /// The checks OpenAI's own API makes before generation; the worker checks the rest
    /// (lengths, ranges) and names the field.
    fn check(&self, served: Option<&str>) -> Result<(), ApiError> {
        if let Some(served) = served.filter(|s| *s != self.model) {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{}` does not exist; this endpoint serves `{served}`",
                    self.model
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                "only 1 choice per request is supported",
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    name,
                    "not supported; use repetition_penalty",
                ));
            }
        }
        Ok(())
    }

    fn into_request(
        self,
        prompt: Prompt,
        max_tokens: Option<u32>,
        id: String,
        include_logprobs: bool,
    ) -> GenerateRequest {
        GenerateRequest {
            request_id: id,
            prompt: Some(prompt),
            // OpenAI samples at temperature 1 unless told otherwise; 0 is greedy.
            sampling: Some(SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p,
                top_k: self.top_k.unwrap_or(0),
                min_p: self.min_p.unwrap_or(0.0),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            }),
            stopping: Some(StoppingCriteria {
                max_new_tokens: max_tokens.unwrap_or(0),
                stop: match self.stop {
                    None => Vec::new(),
                    Some(OneOrMany::One(s)) => vec![s],
                    Some(OneOrMany::Many(v)) => v,
                },
                ignore_eos: self.ignore_eos,
            })
            .filter(|s| s.max_new_tokens > 0 || !s.stop.is_empty() || s.ignore_eos),
            include_logprobs,
        }
    }
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "must not be empty"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (k, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{k}]"),
                                    format!("content parts of type {kind:?} are not supported; send text"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
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

/// Authorises and parses a request: the shared fields, checked, and the endpoint's own.
fn read_request<T: DeserializeOwned>(
    http: &Http,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Common, T), ApiError> {
    authorize(http, headers)?;
    let body = parse_body(body)?;
    let common: Common = fields(&body)?;
    common.check(http.served_name.get().map(String::as_str))?;
    Ok((common, fields(&body)?))
}

/// `param` asks for that many alternatives per token; only 0 (the sampled token's own
/// log-probability) is served.
fn refuse_alternatives(param: &str, alternatives: Option<u32>) -> Result<(), ApiError> {
    match alternatives {
        Some(n) if n > 0 => Err(ApiError::invalid(
            param,
            "alternatives are not supported yet: only the sampled tokens' log-probabilities (0)",
        )),
        _ => Ok(()),
    }
}

async fn chat_completions(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (common, request): (Common, ChatRequest) = read_request(&http, &headers, &body)?;
    refuse_alternatives("top_logprobs", request.top_logprobs)?;
    let messages = chat_messages(request.messages)?;
    let max_tokens = request.max_completion_tokens.or(common.max_tokens);
    let prompt = Prompt::Chat(ChatMessages { messages });
    respond(
        &http,
        Kind::Chat,
        common,
        prompt,
        max_tokens,
        request.logprobs,
    )
    .await
}

async fn completions(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (common, request): (Common, CompletionRequest) = read_request(&http, &headers, &body)?;
    for (name, refused) in [("echo", request.echo), ("suffix", request.suffix.is_some())] {
        if refused {
            return Err(ApiError::invalid(name, "not supported yet"));
        }
    }
    refuse_alternatives("logprobs", request.logprobs)?;
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "prompt",
                "exactly one prompt per request is supported",
            ))
        }
    };
    let prompt = match request.prompt {
        CompletionPrompt::Text(text) => Prompt::Text(text),
        CompletionPrompt::Ids(ids) => Prompt::TokenIds(TokenIds { ids }),
        CompletionPrompt::Texts(mut texts) => {
            one(texts.len())?;
            Prompt::Text(texts.remove(0))
        }
        CompletionPrompt::IdLists(mut lists) => {
            one(lists.len())?;
            Prompt::TokenIds(TokenIds {
                ids: lists.remove(0),
            })
        }
    };
    // OpenAI's completions default to 16 tokens.
    let max_tokens = Some(common.max_tokens.unwrap_or(16));
    let logprobs = request.logprobs.is_some();
    respond(
        &http,
        Kind::Completion,
        common,
        prompt,
        max_tokens,
        logprobs,
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

/// OpenAI's name for a finish reason.
fn finish_reason(code: i32) -> Option<&'static str> {
    match FinishReason::try_from(code).ok()? {
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => Some("abort"),
        FinishReason::Unspecified => None,
    }
}

fn usage_json(m: &GenerateResponse) -> Option<Value> {
    let u = m.usage.as_ref()?;
    Some(json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }))
}

/// Routes the request and writes the answer: SSE chunks when `stream`, else one body; with
/// `logprobs`, each token's log-probability.
async fn respond(
    http: &Http,
    kind: Kind,
    common: Common,
    prompt: Prompt,
    max_tokens: Option<u32>,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let (id, object) = match kind {
        Kind::Chat => (new_id("chatcmpl"), "chat.completion"),
        Kind::Completion => (new_id("cmpl"), "text_completion"),
    };
    let model = common.model.clone();
    let stream = common.stream;
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let request = common.into_request(prompt, max_tokens, id.clone(), logprobs);
    let messages = http.router.generate(request, None).await?;
    let created = unix_now();
    let frame = Frame {
        kind,
        id,
        model,
        created,
        logprobs,
    };
    if stream {
        return Ok(sse(frame, messages, include_usage));
    }
    let mut text = String::new();
    let mut pieces: Vec<(String, f32)> = Vec::new();
    let mut last = None;
    let mut messages = messages;
    while let Some(message) = messages.next().await {
        let message = message?;
        match (token_pieces(&message), pieces.last_mut()) {
            // text released with no token (the decoder's tail at the end) joins the last one
            (new, Some(last)) if new.is_empty() => last.0.push_str(&message.text),
            (new, _) => pieces.extend(new),
        }
        text.push_str(&message.text);
        last = Some(message);
    }
    let last = last.unwrap_or_default();
    let logprobs = frame.logprobs_json(&pieces, 0);
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(last.finish_reason),
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(last.finish_reason),
        }),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": frame.id,
            "object": object,
            "created": created,
            "model": frame.model,
            "choices": [choice],
            "usage": usage_json(&last),
        }),
    ))
}

/// A message's tokens with their log-probabilities. A worker message carries one token and
/// the text it released, which stands for the token's text (with stop strings, text can be
/// held back and released with a later token).
fn token_pieces(message: &GenerateResponse) -> Vec<(String, f32)> {
    message
        .logprobs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let text = if i == 0 {
                message.text.clone()
            } else {
                String::new()
            };
            (text, l.logprob)
        })
        .collect()
}

/// What every streamed chunk repeats.
struct Frame {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    /// Whether the client asked for log-probabilities.
    logprobs: bool,
}

impl Frame {
    /// OpenAI's logprobs object for `pieces` (null when not asked for); `offset` is where the
    /// first piece starts in the completion's text, in characters.
    fn logprobs_json(&self, pieces: &[(String, f32)], mut offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({"content": pieces.iter().map(|(token, logprob)| json!({
                "token": token,
                "logprob": logprob,
                "bytes": token.as_bytes(),
                "top_logprobs": [],
            })).collect::<Vec<_>>()}),
            Kind::Completion => {
                let offsets: Vec<usize> = pieces
                    .iter()
                    .map(|(token, _)| {
                        let at = offset;
                        offset += token.chars().count();
                        at
                    })
                    .collect();
                json!({
                    "tokens": pieces.iter().map(|(t, _)| t).collect::<Vec<_>>(),
                    "token_logprobs": pieces.iter().map(|(_, l)| l).collect::<Vec<_>>(),
                    "top_logprobs": null,
                    "text_offset": offsets,
                })
            }
        }
    }

    fn chunk(
        &self,
        text: Option<&str>,
        finish: Option<&str>,
        first: bool,
        logprobs: Value,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = text {
                    delta.insert("content".into(), text.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.wrap(vec![choice])
    }

    fn wrap(&self, choices: Vec<Value>) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Server-sent events: a chunk per worker message, the finish reason, usage when asked
/// for, then `data: [DONE]`. An error after the stream started is sent as a `data:` error
/// object (the status line has gone out already).
fn sse(frame: Frame, messages: crate::proxy::ResponseStream, include_usage: bool) -> Response {
    let mut first = true;
    let mut offset = 0;
    // With logprobs, each token's chunk waits for the next message: text released with no
    // token (the decoder's tail at the end) joins the token before it, as in a whole body.
    let mut pending: Option<(String, Vec<(String, f32)>)> = None;
    let body = messages
        .map(move |message| {
            let mut events = Vec::new();
            let mut send = |text: String, pieces: Vec<(String, f32)>, events: &mut Vec<Bytes>| {
                if !text.is_empty() || !pieces.is_empty() || (first && frame.kind == Kind::Chat) {
                    let logprobs = frame.logprobs_json(&pieces, offset);
                    events.push(event(&frame.chunk(Some(&text), None, first, logprobs)));
                    offset += text.chars().count();
                    first = false;
                }
            };
            match message {
                Ok(m) => {
                    let finish = finish_reason(m.finish_reason);
                    let pieces = token_pieces(&m);
                    if !frame.logprobs {
                        send(m.text.clone(), pieces, &mut events);
                    } else if let (true, Some((text, held))) = (pieces.is_empty(), &mut pending) {
                        text.push_str(&m.text);
                        if let Some(last) = held.last_mut() {
                            last.0.push_str(&m.text);
                        }
                    } else if let Some((text, held)) = pending.replace((m.text.clone(), pieces)) {
                        send(text, held, &mut events);
                    }
                    if finish.is_some() {
                        if let Some((text, held)) = pending.take() {
                            send(text, held, &mut events);
                        }
                        events.push(event(&frame.chunk(None, finish, first, Value::Null)));
                        if include_usage {
                            let mut usage = frame.wrap(Vec::new());
                            usage["usage"] = usage_json(&m).unwrap_or(Value::Null);
                            events.push(event(&usage));
                        }
                    }
                }
                Err(status) => events.push(event(&ApiError::from(status).body())),
            }
            futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
        })
        .flatten()
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"data: [DONE]\n\n"))
        }));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn field_errors_name_the_json_path() {
        let body = parse_body(br#"{"model": "m", "messages": [{"role": 1}]}"#).unwrap();
        let err = fields::<ChatRequest>(&body).err().unwrap();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = parse_body(b"{not json").unwrap_err();
        assert!(
            err.message.starts_with("the body is not valid JSON"),
            "{err:?}"
        );
        let err = parse_body(b"[1]").unwrap_err();
        assert!(err.message.contains("expected a JSON object"), "{err:?}");
        let body = parse_body(br#"{"messages": []}"#).unwrap();
        let err = fields::<Common>(&body).err().unwrap();
        assert!(err.message.contains("missing field `model`"), "{err:?}");
    }

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
        let busy = ApiError::from(Status::resource_exhausted("full"));
        assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.body()["error"]["type"], "rate_limit_error");
        assert_eq!(
            ApiError::from(Status::internal("boom")).status,
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn requests_map_to_generate_requests() {
        let body = parse_body(
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "max_completion_tokens": 5, "temperature": 0, "stop": "x", "seed": 7}"#,
        )
        .unwrap();
        let (request, common): (ChatRequest, Common) =
            (fields(&body).ok().unwrap(), fields(&body).ok().unwrap());
        let messages = chat_messages(request.messages).unwrap();
        assert_eq!(messages[0].content, "hi");
        let g = common.into_request(
            Prompt::Chat(ChatMessages { messages }),
            request.max_completion_tokens,
            "id".into(),
            request.logprobs,
        );
        assert!(!g.include_logprobs);
        let (s, t) = (g.sampling.unwrap(), g.stopping.unwrap());
        assert_eq!((s.temperature, s.seed), (0.0, Some(7)));
        assert_eq!((t.max_new_tokens, t.stop), (5, vec!["x".to_string()]));
        // Unset temperature is OpenAI's 1, not greedy.
        let body = parse_body(br#"{"model": "m", "prompt": [1, 2, 3]}"#).unwrap();
        let request: CompletionRequest = fields(&body).ok().unwrap();
        assert!(matches!(request.prompt, CompletionPrompt::Ids(ref ids) if ids == &[1, 2, 3]));
        let common: Common = fields(&body).ok().unwrap();
        let g = common.into_request(Prompt::Text(String::new()), None, "id".into(), true);
        assert!(g.include_logprobs);
        assert_eq!(g.sampling.unwrap().temperature, 1.0);
        assert!(g.stopping.is_none());
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let common: Common = fields(&json!({"model": "m", "n": 2})).ok().unwrap();
        assert_eq!(
            common.check(None).err().unwrap().param.as_deref(),
            Some("n")
        );
        let common: Common = fields(&json!({"model": "other"})).ok().unwrap();
        let err = common.check(Some("deepseek")).err().unwrap();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let err = chat_messages(vec![]).err().unwrap();
        assert_eq!(err.param.as_deref(), Some("messages"));
    }
}

#[cfg(test)]
mod logprob_tests {
    use super::*;

    fn frame(kind: Kind, logprobs: bool) -> Frame {
        Frame {
            kind,
            id: "x".into(),
            model: "m".into(),
            created: 0,
            logprobs,
        }
    }

    #[test]
    fn logprobs_take_each_endpoints_shape() {
        let pieces = [("Hel".to_string(), -0.5), ("lo".to_string(), -1.25)];
        assert_eq!(
            frame(Kind::Chat, false).logprobs_json(&pieces, 0),
            Value::Null
        );
        let chat = frame(Kind::Chat, true).logprobs_json(&pieces, 0);
        assert_eq!(chat["content"][1]["token"], "lo");
        assert_eq!(chat["content"][1]["logprob"], -1.25);
        assert_eq!(chat["content"][0]["bytes"], json!([72, 101, 108]));
        let completion = frame(Kind::Completion, true).logprobs_json(&pieces, 10);
        assert_eq!(completion["tokens"], json!(["Hel", "lo"]));
        assert_eq!(completion["token_logprobs"], json!([-0.5, -1.25]));
        assert_eq!(completion["text_offset"], json!([10, 13]));
    }
}
