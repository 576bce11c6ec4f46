//! The request bodies both endpoints accept, their checks, and their conversion to a
//! `deepseek.v1.GenerateRequest`.

use axum::http::StatusCode;
use deepseek_proto::v1::generate_request::Prompt;
use deepseek_proto::v1::{
    ChatMessage, GenerateRequest, SamplingParams, StoppingCriteria, TokenIds, ToolCall, ToolChoice,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// Parses a JSON body into an object.
pub(super) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
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
pub(super) fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
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
pub(super) struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls, fed back.
    #[serde(default)]
    tool_calls: Option<Vec<MessageToolCall>>,
    /// A `tool` turn's call.
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct MessageToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: CalledFunction,
}

#[derive(Deserialize)]
struct CalledFunction {
    name: String,
    arguments: String,
}

#[derive(Deserialize, Default)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// What both endpoints share. Fields OpenAI defines that change nothing here (`user`,
/// `parallel_tool_calls`, …) are accepted and ignored; ones we cannot honour are refused.
#[derive(Deserialize)]
pub(super) struct Common {
    pub(super) model: String,
    #[serde(default)]
    pub(super) stream: bool,
    #[serde(default)]
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) max_tokens: Option<u32>,
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
    // Would change the answer, and are not supported yet: refused by name when they ask
    // for anything, never ignored.
    functions: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<Value>,
    logit_bias: Option<Value>,
}

/// Whether an option the router does not support asks for anything: absent, null, empty,
/// `"none"`/`"auto"` choices and a plain-text response format ask for nothing.
fn asks_for_something(param: &str, value: &Option<Value>) -> bool {
    match (param, value) {
        (_, None | Some(Value::Null)) => false,
        (_, Some(Value::Array(items))) => !items.is_empty(),
        ("response_format", Some(format)) => format["type"] != "text",
        (_, Some(Value::Object(map))) => !map.is_empty(),
        (_, Some(Value::String(choice))) => choice != "none" && choice != "auto",
        _ => true,
    }
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    pub(super) messages: Vec<Message>,
    pub(super) max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub(super) logprobs: bool,
    pub(super) top_logprobs: Option<u32>,
    /// A thinking model's thinking in `reasoning_content`, apart from `content` (SGLang's
    /// name for the switch).
    #[serde(default = "separate_by_default")]
    pub(super) separate_reasoning: bool,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// A chat's tools for the worker (JSON text, empty for none) and which calls the reply may
/// make.
#[derive(Debug, PartialEq)]
pub(super) struct Tools {
    pub(super) json: String,
    pub(super) choice: ToolChoice,
    pub(super) function: String,
}

impl ChatRequest {
    /// `tools`, `tool_choice` and `parallel_tool_calls`, checked. The worker checks each
    /// tool and that its chat template shows them to the model.
    pub(super) fn tools(&self) -> Result<Tools, ApiError> {
        let json = match &self.tools {
            None | Some(Value::Null) => String::new(),
            Some(Value::Array(tools)) if tools.is_empty() => String::new(),
            Some(tools @ Value::Array(_)) => tools.to_string(),
            Some(_) => return Err(ApiError::invalid("tools", "must be an array of tools")),
        };
        if self.parallel_tool_calls == Some(false) && !json.is_empty() {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "false is not supported: the model may answer with several calls",
            ));
        }
        let (choice, function) = match &self.tool_choice {
            None | Some(Value::Null) => (ToolChoice::Auto, String::new()),
            Some(Value::String(choice)) if choice == "auto" => (ToolChoice::Auto, String::new()),
            Some(Value::String(choice)) if choice == "none" => (ToolChoice::None, String::new()),
            Some(Value::String(choice)) if choice == "required" => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "\"required\" is not supported (it needs constrained decoding); name the \
                     function, or use \"auto\"",
                ));
            }
            Some(named) => match (&named["type"], named["function"]["name"].as_str()) {
                (Value::String(kind), Some(name)) if kind == "function" => {
                    (ToolChoice::Function, name.to_string())
                }
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "expected \"none\", \"auto\" or {\"type\": \"function\", \"function\": \
                         {\"name\": …}}",
                    ));
                }
            },
        };
        if json.is_empty() {
            return match choice {
                ToolChoice::Function => Err(ApiError::invalid(
                    "tool_choice",
                    "names a function, but the request has no tools",
                )),
                // Without tools there is no call to make or to leave out.
                _ => Ok(Tools {
                    json,
                    choice: ToolChoice::Auto,
                    function,
                }),
            };
        }
        Ok(Tools {
            json,
            choice,
            function,
        })
    }
}

fn separate_by_default() -> bool {
    true
}

/// `prompt`: a string, token ids, or a one-element list of either.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) prompt: CompletionPrompt,
    #[serde(default)]
    pub(super) echo: bool,
    pub(super) logprobs: Option<u32>,
    pub(super) suffix: Option<String>,
    /// Chat only: refused here by name.
    tools: Option<Value>,
    tool_choice: Option<Value>,
}

impl CompletionRequest {
    /// A chat-only parameter this completion asks for something with, if any.
    pub(super) fn chat_only(&self) -> Option<&'static str> {
        [("tools", &self.tools), ("tool_choice", &self.tool_choice)]
            .into_iter()
            .find(|(name, value)| asks_for_something(name, value))
            .map(|(name, _)| name)
    }
}

impl Common {
    /// The checks OpenAI's own API makes before generation; the worker checks the rest
    /// (lengths, ranges) and names the field.
    pub(super) fn check(&self, served: Option<&str>) -> Result<(), ApiError> {
        if let Some(served) = served.filter(|s| *s != self.model) {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{}` does not exist; this endpoint serves `{served}`",
                    self.model
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
                retry_after: None,
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                "only 1 choice per request is supported",
            ));
        }
        for (name, value) in [
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("response_format", &self.response_format),
            ("logit_bias", &self.logit_bias),
        ] {
            if asks_for_something(name, value) {
                return Err(ApiError::invalid(name, "not supported yet"));
            }
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

    pub(super) fn into_request(
        self,
        prompt: Prompt,
        max_tokens: Option<u32>,
        id: String,
        include_logprobs: bool,
        reasoning_in_text: bool,
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
            reasoning_in_text,
            ..Default::default()
        }
    }
}

pub(super) fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
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
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(k, call)| match call.kind.as_str() {
                    "function" => Ok(ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments: call.function.arguments,
                    }),
                    kind => Err(ApiError::invalid(
                        &format!("messages[{i}].tool_calls[{k}].type"),
                        format!("{kind:?}: only \"function\" calls are supported"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ChatMessage {
                role: m.role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.unwrap_or_default(),
            })
        })
        .collect()
}

impl CompletionPrompt {
    /// The one prompt a request may carry; a list must hold exactly one.
    pub(super) fn into_prompt(self) -> Result<Prompt, ApiError> {
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
        Ok(match self {
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
        })
    }
}

/// `param` asks for that many alternatives per token; only 0 (the sampled token's own
/// log-probability) is served.
pub(super) fn refuse_alternatives(param: &str, alternatives: Option<u32>) -> Result<(), ApiError> {
    match alternatives {
        Some(n) if n > 0 => Err(ApiError::invalid(
            param,
            "alternatives are not supported yet: only the sampled tokens' log-probabilities (0)",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use deepseek_proto::v1::ChatMessages;
    use serde_json::json;

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
            Prompt::Chat(ChatMessages {
                messages,
                ..Default::default()
            }),
            request.max_completion_tokens,
            "id".into(),
            request.logprobs,
            !request.separate_reasoning,
        );
        assert!(!g.include_logprobs && !g.reasoning_in_text);
        let (s, t) = (g.sampling.unwrap(), g.stopping.unwrap());
        assert_eq!((s.temperature, s.seed), (0.0, Some(7)));
        assert_eq!((t.max_new_tokens, t.stop), (5, vec!["x".to_string()]));
        // Unset temperature is OpenAI's 1, not greedy.
        let body = parse_body(br#"{"model": "m", "prompt": [1, 2, 3]}"#).unwrap();
        let request: CompletionRequest = fields(&body).ok().unwrap();
        assert!(matches!(request.prompt, CompletionPrompt::Ids(ref ids) if ids == &[1, 2, 3]));
        let common: Common = fields(&body).ok().unwrap();
        let g = common.into_request(Prompt::Text(String::new()), None, "id".into(), true, true);
        assert!(g.include_logprobs && g.reasoning_in_text);
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
        let refused = |body: Value| {
            let common: Common = fields(&body).ok().unwrap();
            common.check(None).err().and_then(|e| e.param)
        };
        let tool = json!([{"type": "function", "function": {"name": "f"}}]);
        for (param, value) in [
            ("functions", tool),
            ("response_format", json!({"type": "json_object"})),
            ("logit_bias", json!({"42": 100})),
        ] {
            let body = json!({"model": "m", param: value});
            assert_eq!(refused(body.clone()).as_deref(), Some(param), "{body}");
        }
        for (param, value) in [
            ("response_format", json!({"type": "text"})),
            ("logit_bias", json!({})),
        ] {
            let body = json!({"model": "m", param: value});
            assert_eq!(refused(body.clone()), None, "{body}");
        }
    }

    fn chat(body: Value) -> ChatRequest {
        let mut body = body;
        body["messages"] = json!([{"role": "user", "content": "hi"}]);
        fields(&body).ok().unwrap()
    }

    #[test]
    fn tools_and_tool_choice_become_the_workers_or_are_refused_by_name() {
        let tool = json!([{"type": "function", "function": {"name": "f"}}]);
        let tools = |body: Value| chat(body).tools();
        let offered = tools(json!({"tools": tool})).unwrap();
        assert_eq!(
            (offered.json.as_str(), offered.choice),
            (tool.to_string().as_str(), ToolChoice::Auto)
        );
        let named = json!({"type": "function", "function": {"name": "f"}});
        let forced = tools(json!({"tools": tool, "tool_choice": named})).unwrap();
        assert_eq!(
            (forced.choice, forced.function.as_str()),
            (ToolChoice::Function, "f")
        );
        let none = tools(json!({"tools": tool, "tool_choice": "none"})).unwrap();
        assert_eq!(none.choice, ToolChoice::None);
        // No tools: "none" and "auto" ask for nothing.
        for empty in [
            json!({"tools": []}),
            json!({"tool_choice": "none"}),
            json!({}),
        ] {
            let nothing = tools(empty).unwrap();
            assert_eq!(
                (nothing.json.as_str(), nothing.choice),
                ("", ToolChoice::Auto)
            );
        }
        for (body, param) in [
            (
                json!({"tools": tool, "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"tools": tool, "tool_choice": {"type": "function"}}),
                "tool_choice",
            ),
            (json!({"tool_choice": named}), "tool_choice"),
            (json!({"tools": {"type": "function"}}), "tools"),
            (
                json!({"tools": tool, "parallel_tool_calls": false}),
                "parallel_tool_calls",
            ),
        ] {
            let err = tools(body.clone()).err().unwrap();
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
        }
        let completion: CompletionRequest =
            fields(&json!({"model": "m", "prompt": "x", "tools": tool}))
                .ok()
                .unwrap();
        assert_eq!(completion.chat_only(), Some("tools"));
    }

    #[test]
    fn fed_back_calls_and_results_reach_the_worker() {
        let messages: Vec<Message> = fields(&json!([
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]))
        .ok()
        .unwrap();
        let messages = chat_messages(messages).unwrap();
        assert_eq!(
            messages[0].tool_calls,
            [ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{}".into()
            }]
        );
        assert_eq!(messages[0].content, "");
        assert_eq!(
            (
                messages[1].tool_call_id.as_str(),
                messages[1].content.as_str()
            ),
            ("call_1", "42")
        );
        let odd: Vec<Message> = fields(&json!([{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "code", "function": {"name": "f", "arguments": "{}"}}
        ]}]))
        .ok()
        .unwrap();
        assert_eq!(
            chat_messages(odd).err().unwrap().param.as_deref(),
            Some("messages[0].tool_calls[0].type")
        );
    }
}
