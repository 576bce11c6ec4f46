//! Parse, then validate: a `deepseek.v1.GenerateRequest` becomes a [`ValidRequest`] or an
//! [`InvalidRequest`] naming the field and the limit. Only valid requests reach the scheduler.

use deepseek_proto::v1::{ChatMessages, GenerateRequest, ToolChoice, generate_request::Prompt};
use serde_json::Value;

use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Thinking, Tokenizer};
use crate::tools::{ToolMarkers, forced_call_prefix, function_names};

/// What the served model allows.
#[derive(Clone, Debug)]
pub struct Limits {
    pub vocab_size: usize,
    pub context_length: usize,
    /// Used when the request sets no `stopping.max_new_tokens`: the rest of the context, at
    /// most this.
    pub default_max_new_tokens: usize,
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub include_logprobs: bool,
    /// Where the model's thinking is, for a model that thinks and a request that wants it
    /// apart from the answer.
    pub thinking: Option<Thinking>,
    /// Set when the reply's tool calls are to be read.
    pub tools: Option<ToolUse>,
}

/// How a reply's tool calls are read: the functions offered, and the call the prompt
/// already starts (`tool_choice` FUNCTION), whose tokens end the prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUse {
    pub markers: ToolMarkers,
    pub names: Vec<String>,
    pub forced: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidRequest {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        field,
        message: message.into(),
    }
}

pub fn validate(
    request: GenerateRequest,
    tokenizer: Option<&Tokenizer>,
    limits: &Limits,
) -> Result<ValidRequest, InvalidRequest> {
    let (mut prompt_ids, offered) = prompt_ids(request.prompt, tokenizer)?;
    let tools = tool_use(
        request.tool_choice,
        &request.tool_choice_function,
        offered,
        tokenizer,
    )?;
    if let Some(tools) = &tools {
        prompt_ids.extend(&tools.forced);
    }
    let room = check_prompt(&prompt_ids, limits)?;
    let requested_max = request.stopping.as_ref().map(|s| s.max_new_tokens);
    let stopping = request.stopping.unwrap_or_default();
    let max_new_tokens = max_new_tokens(requested_max, room, prompt_ids.len(), limits)?;
    check_stop_strings(&stopping.stop, tokenizer.is_some(), limits)?;

    let thinking = tokenizer
        .filter(|_| !request.reasoning_in_text)
        .and_then(|t| t.thinking(&prompt_ids));
    Ok(ValidRequest {
        thinking,
        tools,
        request_id: request.request_id,
        prompt_ids,
        sampling: sampling(request.sampling.unwrap_or_default())?,
        max_new_tokens,
        stop: stopping.stop,
        ignore_eos: stopping.ignore_eos,
        include_logprobs: request.include_logprobs,
    })
}

/// Text and chat prompts need the model's tokenizer; token ids do not.
fn needs_tokenizer(field: &'static str) -> InvalidRequest {
    invalid(
        field,
        "this model has no tokenizer.json, so it takes token_ids prompts only",
    )
}

/// The prompt as token ids: as given, or encoded by the tokenizer (chat through its
/// template); with the functions a chat offers.
fn prompt_ids(
    prompt: Option<Prompt>,
    tokenizer: Option<&Tokenizer>,
) -> Result<(Vec<u32>, Option<Vec<String>>), InvalidRequest> {
    match prompt {
        None => Err(invalid("prompt", "missing: set text, token_ids or chat")),
        Some(Prompt::TokenIds(ids)) => Ok((ids.ids, None)),
        Some(Prompt::Text(text)) => {
            let tokenizer = tokenizer.ok_or_else(|| needs_tokenizer("prompt.text"))?;
            if text.is_empty() {
                return Err(invalid("prompt.text", "is empty"));
            }
            let ids = tokenizer
                .encode(&text, true)
                .map_err(|e| invalid("prompt.text", e.to_string()))?;
            Ok((ids, None))
        }
        Some(Prompt::Chat(chat)) => {
            let tokenizer = tokenizer.ok_or_else(|| needs_tokenizer("prompt.chat"))?;
            chat_ids(tokenizer, chat, &GENERATE_CHAT)
        }
    }
}

/// The names a chat prompt's parts go by in the request that carries it.
pub struct ChatFields {
    pub chat: &'static str,
    pub messages: &'static str,
    pub tools: &'static str,
}

pub const GENERATE_CHAT: ChatFields = ChatFields {
    chat: "prompt.chat",
    messages: "prompt.chat.messages",
    tools: "prompt.chat.tools_json",
};

pub const TOKENIZE_CHAT: ChatFields = ChatFields {
    chat: "chat",
    messages: "chat.messages",
    tools: "chat.tools_json",
};

/// A chat's ids through the chat template, and the names of the functions it offers when it
/// has tools. A template that renders the same with the tools as without would have the
/// model never see them: refused.
pub fn chat_ids(
    tokenizer: &Tokenizer,
    chat: ChatMessages,
    fields: &ChatFields,
) -> Result<(Vec<u32>, Option<Vec<String>>), InvalidRequest> {
    if chat.messages.is_empty() {
        return Err(invalid(fields.messages, "is empty"));
    }
    if !tokenizer.has_chat_template() {
        return Err(invalid(
            fields.chat,
            "this model's tokenizer_config.json has no chat_template",
        ));
    }
    let messages: Vec<ChatMessage> = chat.messages.into_iter().map(ChatMessage::from).collect();
    let render = |tools: Option<&Value>| {
        tokenizer
            .apply_chat_template(&messages, tools, true)
            .map_err(|e| invalid(fields.chat, e.to_string()))
    };
    // The template writes the BOS token itself.
    let encode = |text: String| {
        tokenizer
            .encode(&text, false)
            .map_err(|e| invalid(fields.chat, e.to_string()))
    };
    if chat.tools_json.is_empty() {
        return Ok((encode(render(None)?)?, None));
    }
    let tools: Value = serde_json::from_str(&chat.tools_json)
        .map_err(|e| invalid(fields.tools, format!("is not valid JSON: {e}")))?;
    let names = function_names(&tools).map_err(|message| invalid(fields.tools, message))?;
    let rendered = render(Some(&tools))?;
    if rendered == render(None)? {
        return Err(invalid(
            fields.tools,
            "this model's chat template does not show tools to the model; serve it with \
             --chat-template naming a template that does",
        ));
    }
    Ok((encode(rendered)?, Some(names)))
}

/// How the reply's tool calls are read, from `tool_choice` and the functions the chat
/// offers.
fn tool_use(
    choice: i32,
    function: &str,
    offered: Option<Vec<String>>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Option<ToolUse>, InvalidRequest> {
    let choice = ToolChoice::try_from(choice)
        .map_err(|_| invalid("tool_choice", format!("unknown value {choice}")))?;
    if choice != ToolChoice::Function && !function.is_empty() {
        return Err(invalid(
            "tool_choice_function",
            "is set only with tool_choice TOOL_CHOICE_FUNCTION",
        ));
    }
    let (Some(names), Some(tokenizer)) = (offered, tokenizer) else {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(invalid(
                "tool_choice",
                "needs tools in prompt.chat.tools_json",
            )),
        };
    };
    if choice == ToolChoice::None {
        return Ok(None);
    }
    let markers = ToolMarkers::of(tokenizer).ok_or_else(|| {
        invalid(
            "prompt.chat.tools_json",
            "this model's vocabulary has no DeepSeek tool-call tokens, so its calls could not \
             be read; send tool_choice TOOL_CHOICE_NONE to have them in text",
        )
    })?;
    let forced = match choice {
        ToolChoice::Function if !names.iter().any(|n| n == function) => {
            return Err(invalid(
                "tool_choice_function",
                format!("no function {function:?} in prompt.chat.tools_json"),
            ));
        }
        ToolChoice::Function => tokenizer
            .encode(&forced_call_prefix(function), false)
            .map_err(|e| invalid("tool_choice_function", e.to_string()))?,
        _ => Vec::new(),
    };
    Ok(Some(ToolUse {
        markers,
        names,
        forced,
    }))
}

/// A prompt must be non-empty, in the vocabulary and leave room in the context; returns
/// that room.
fn check_prompt(prompt_ids: &[u32], limits: &Limits) -> Result<usize, InvalidRequest> {
    if prompt_ids.is_empty() {
        return Err(invalid("prompt", "is empty"));
    }
    check_token_ids(prompt_ids, limits.vocab_size)
        .map_err(|message| invalid("prompt.token_ids", message))?;
    let context = limits.context_length;
    if prompt_ids.len() >= context {
        return Err(invalid(
            "prompt",
            format!(
                "{} tokens leave no room in the context length {context}",
                prompt_ids.len()
            ),
        ));
    }
    Ok(context - prompt_ids.len())
}

/// The request's `stopping.max_new_tokens` if it fits the `room` the prompt leaves; unset,
/// the room up to the default.
fn max_new_tokens(
    requested: Option<u32>,
    room: usize,
    prompt_len: usize,
    limits: &Limits,
) -> Result<usize, InvalidRequest> {
    match requested {
        None => Ok(room.min(limits.default_max_new_tokens)),
        Some(0) => Err(invalid("stopping.max_new_tokens", "must be at least 1")),
        Some(n) if n as usize > room => Err(invalid(
            "stopping.max_new_tokens",
            format!(
                "{n} exceeds the {room} tokens the context length {} leaves after a {prompt_len}-token prompt",
                limits.context_length
            ),
        )),
        Some(n) => Ok(n as usize),
    }
}

/// Stop strings within the count and length limits; matching them needs the tokenizer.
fn check_stop_strings(
    stop: &[String],
    has_tokenizer: bool,
    limits: &Limits,
) -> Result<(), InvalidRequest> {
    if stop.len() > limits.max_stop_strings {
        return Err(invalid(
            "stopping.stop",
            format!(
                "{} strings; at most {}",
                stop.len(),
                limits.max_stop_strings
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > limits.max_stop_string_bytes) {
        return Err(invalid(
            "stopping.stop",
            format!(
                "a stop string of {} bytes; at most {}",
                long.len(),
                limits.max_stop_string_bytes
            ),
        ));
    }
    if !stop.is_empty() && !has_tokenizer {
        return Err(needs_tokenizer("stopping.stop"));
    }
    Ok(())
}

/// Every id must be below the vocabulary size.
pub fn check_token_ids(ids: &[u32], vocab_size: usize) -> Result<(), String> {
    match ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab_size)
    {
        Some((i, id)) => Err(format!(
            "ids[{i}] = {id} is not below the vocabulary size {vocab_size}"
        )),
        None => Ok(()),
    }
}

/// Unset `top_p` and `repetition_penalty` mean their neutral value 1; temperature 0 is greedy
/// and min_p 0 is off, so those need no presence.
fn sampling(p: deepseek_proto::v1::SamplingParams) -> Result<SamplingParams, InvalidRequest> {
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p.unwrap_or(1.0),
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed,
        ..Default::default()
    };
    params.validate().map_err(|e| {
        let field = match e.param {
            "temperature" => "sampling.temperature",
            "top_p" => "sampling.top_p",
            "min_p" => "sampling.min_p",
            "repetition_penalty" => "sampling.repetition_penalty",
            _ => "sampling",
        };
        invalid(field, e.message)
    })?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use deepseek_proto::v1::{SamplingParams as ProtoSampling, StoppingCriteria, TokenIds};

    use super::*;

    fn limits() -> Limits {
        Limits {
            vocab_size: 100,
            context_length: 32,
            default_max_new_tokens: 16,
            max_stop_strings: 4,
            max_stop_string_bytes: 8,
        }
    }

    fn ids(ids: &[u32]) -> GenerateRequest {
        GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: ids.to_vec() })),
            ..Default::default()
        }
    }

    fn error(request: GenerateRequest) -> String {
        validate(request, None, &limits()).unwrap_err().to_string()
    }

    #[test]
    fn a_plain_request_gets_defaults() {
        let valid = validate(ids(&[1, 2, 3]), None, &limits()).unwrap();
        assert_eq!(valid.max_new_tokens, 16);
        assert_eq!(valid.sampling, SamplingParams::default());
        let mut near_end = ids(&[1; 20]);
        near_end.sampling = Some(ProtoSampling {
            temperature: 0.7,
            top_p: Some(0.9),
            ..Default::default()
        });
        let valid = validate(near_end, None, &limits()).unwrap();
        assert_eq!(valid.max_new_tokens, 12, "the rest of the context");
        assert_eq!(
            (valid.sampling.temperature, valid.sampling.top_p),
            (0.7, 0.9)
        );
    }

    #[test]
    fn every_bad_field_is_named_with_its_limit() {
        assert_eq!(
            error(GenerateRequest::default()),
            "prompt: missing: set text, token_ids or chat"
        );
        assert_eq!(error(ids(&[])), "prompt: is empty");
        assert_eq!(
            error(ids(&[1, 100])),
            "prompt.token_ids: ids[1] = 100 is not below the vocabulary size 100"
        );
        assert_eq!(
            error(ids(&[1; 32])),
            "prompt: 32 tokens leave no room in the context length 32"
        );
        let with = |stopping: StoppingCriteria| GenerateRequest {
            stopping: Some(stopping),
            ..ids(&[1; 30])
        };
        assert_eq!(
            error(with(StoppingCriteria {
                max_new_tokens: 0,
                ..Default::default()
            })),
            "stopping.max_new_tokens: must be at least 1"
        );
        assert!(
            error(with(StoppingCriteria {
                max_new_tokens: 3,
                ..Default::default()
            }))
            .starts_with("stopping.max_new_tokens: 3 exceeds the 2 tokens")
        );
        let sampled = |s: ProtoSampling| GenerateRequest {
            sampling: Some(s),
            ..ids(&[1])
        };
        assert_eq!(
            error(sampled(ProtoSampling {
                temperature: -0.5,
                ..Default::default()
            })),
            "sampling.temperature: temperature must be ≥ 0, got -0.5"
        );
        assert!(
            error(sampled(ProtoSampling {
                temperature: f32::NAN,
                ..Default::default()
            }))
            .starts_with("sampling.temperature: temperature must be a finite number")
        );
        assert_eq!(
            error(sampled(ProtoSampling {
                top_p: Some(1.5),
                ..Default::default()
            })),
            "sampling.top_p: top_p must be in (0, 1], got 1.5"
        );
        assert!(
            error(sampled(ProtoSampling {
                top_p: Some(-0.1),
                ..Default::default()
            }))
            .starts_with("sampling.top_p")
        );
        let text = GenerateRequest {
            prompt: Some(Prompt::Text("hi".into())),
            ..Default::default()
        };
        assert_eq!(
            error(text),
            "prompt.text: this model has no tokenizer.json, so it takes token_ids prompts only"
        );
        let stops = with(StoppingCriteria {
            max_new_tokens: 1,
            stop: vec!["x".repeat(9)],
            ..Default::default()
        });
        assert_eq!(
            error(stops),
            "stopping.stop: a stop string of 9 bytes; at most 8"
        );
    }

    /// 10,000 generated requests with edge values and long strings: each validates or is
    /// refused with a message, none panics.
    #[test]
    fn ten_thousand_generated_requests_never_panic() {
        let mut rng = crate::sampling::Rng::new(11);
        let floats = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1e-30,
            1e30,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN,
            f32::MAX,
        ];
        let mut accepted = 0;
        for i in 0..10_000 {
            let mut next = || rng.next_u64();
            let prompt = match next() % 4 {
                0 => None,
                1 => Some(Prompt::TokenIds(TokenIds {
                    ids: (0..next() % 40).map(|_| (next() % 120) as u32).collect(),
                })),
                2 => Some(Prompt::TokenIds(TokenIds {
                    ids: vec![u32::MAX; (next() % 3) as usize],
                })),
                _ => Some(Prompt::Text("x".repeat((next() % 5000) as usize))),
            };
            let pick = |n: u64| floats[(n % floats.len() as u64) as usize];
            let request = GenerateRequest {
                request_id: "r".repeat((next() % 100) as usize),
                prompt,
                sampling: (next() % 2 == 0).then(|| ProtoSampling {
                    temperature: pick(next()),
                    top_p: Some(pick(next())).filter(|p| *p != 0.0),
                    top_k: next() as u32,
                    min_p: pick(next()),
                    repetition_penalty: Some(pick(next())).filter(|p| *p != 0.0),
                    seed: (next() % 2 == 0).then(&mut next),
                }),
                stopping: (next() % 2 == 0).then(|| StoppingCriteria {
                    max_new_tokens: [0, 1, 5, 40, u32::MAX][(next() % 5) as usize],
                    stop: (0..next() % 6)
                        .map(|_| "s".repeat((next() % 12) as usize))
                        .collect(),
                    ignore_eos: next() % 2 == 0,
                }),
                include_logprobs: next() % 2 == 0,
                reasoning_in_text: false,
                // now and then a choice without tools (3 is no ToolChoice at all)
                tool_choice: if i % 16 == 0 { i / 16 % 4 } else { 0 },
                tool_choice_function: "f".repeat(usize::from(i % 16 == 8)),
            };
            match validate(request, None, &limits()) {
                Ok(valid) => {
                    accepted += 1;
                    assert!(
                        valid.max_new_tokens >= 1
                            && valid.prompt_ids.len() + valid.max_new_tokens <= 32
                    );
                    assert!(valid.sampling.validate().is_ok());
                }
                Err(err) => assert!(!err.message.is_empty()),
            }
        }
        assert!(accepted > 100, "{accepted}");
    }
}
