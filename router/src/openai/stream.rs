//! Writing generated tokens the OpenAI way: the chunk frame both endpoints share, their
//! log-probability objects, and server-sent events ending in `data: [DONE]`.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use deepseek_proto::v1::{FinishReason, GenerateResponse, ToolCall};
use futures::StreamExt;
use serde_json::{Value, json};

use super::ApiError;

/// The two endpoints' differences in the responses they write.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// OpenAI's name for a finish reason; a reply that ended by itself after calling tools
/// finished for `tool_calls`.
pub(super) fn finish_reason(code: i32, made_calls: bool) -> Option<&'static str> {
    match FinishReason::try_from(code).ok()? {
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos if made_calls => Some("tool_calls"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => Some("abort"),
        FinishReason::Unspecified => None,
    }
}

/// A call as OpenAI writes it; streamed, with its `index` among the reply's calls.
pub(super) fn tool_call_json(index: Option<usize>, call: &ToolCall) -> Value {
    let mut json = json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    });
    if let Some(index) = index {
        json["index"] = index.into();
    }
    json
}

pub(super) fn usage_json(m: &GenerateResponse) -> Option<Value> {
    let u = m.usage.as_ref()?;
    Some(json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }))
}

/// A message's tokens with their log-probabilities. A worker message carries one token and
/// the text it released, which stands for the token's text (with stop strings, text can be
/// held back and released with a later token).
pub(super) fn token_pieces(message: &GenerateResponse) -> Vec<(String, f32)> {
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
pub(super) struct Frame {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) model: String,
    pub(super) created: u64,
    /// Whether the client asked for log-probabilities.
    pub(super) logprobs: bool,
}

impl Frame {
    /// OpenAI's logprobs object for `pieces` (null when not asked for); `offset` is where the
    /// first piece starts in the completion's text, in characters.
    pub(super) fn logprobs_json(&self, pieces: &[(String, f32)], mut offset: usize) -> Value {
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
        self.delta_chunk(text.map(|t| ("content", t)), finish, first, logprobs)
    }

    /// A chat chunk's delta holds `field` (`content` or `reasoning_content`); a completion
    /// chunk's `text` only ever holds content.
    fn delta_chunk(
        &self,
        delta_text: Option<(&str, &str)>,
        finish: Option<&str>,
        first: bool,
        logprobs: Value,
    ) -> Value {
        let text = delta_text.map(|(_, text)| text);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some((field, text)) = delta_text {
                    delta.insert(field.into(), text.into());
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
pub(super) fn sse(
    frame: Frame,
    messages: crate::proxy::ResponseStream,
    include_usage: bool,
) -> Response {
    let mut first = true;
    let mut offset = 0;
    let mut calls = 0;
    // With logprobs, each token's chunk waits for the next message: text released with no
    // token (the decoder's tail at the end) joins the token before it, as in a whole body.
    let mut pending: Option<(String, Vec<(String, f32)>)> = None;
    let body = messages
        .map(move |message| {
            let mut events = Vec::new();
            // Thinking goes ahead of the answer text of the same message (there is none).
            if let Ok(m) = &message
                && !m.reasoning_text.is_empty()
            {
                let reasoning = Some(("reasoning_content", m.reasoning_text.as_str()));
                let chunk = frame.delta_chunk(reasoning, None, first, Value::Null);
                events.push(event(&chunk));
                first = false;
            }
            let send = |(text, pieces): (String, Vec<(String, f32)>),
                        events: &mut Vec<Bytes>,
                        first: &mut bool,
                        offset: &mut usize| {
                if !text.is_empty() || !pieces.is_empty() || (*first && frame.kind == Kind::Chat) {
                    let logprobs = frame.logprobs_json(&pieces, *offset);
                    events.push(event(&frame.chunk(Some(&text), None, *first, logprobs)));
                    *offset += text.chars().count();
                    *first = false;
                }
            };
            match message {
                Ok(m) => {
                    let pieces = token_pieces(&m);
                    if !frame.logprobs {
                        send(
                            (m.text.clone(), pieces),
                            &mut events,
                            &mut first,
                            &mut offset,
                        );
                    } else if let (true, Some((text, held))) = (pieces.is_empty(), &mut pending) {
                        text.push_str(&m.text);
                        if let Some(last) = held.last_mut() {
                            last.0.push_str(&m.text);
                        }
                    } else if let Some(held) = pending.replace((m.text.clone(), pieces)) {
                        send(held, &mut events, &mut first, &mut offset);
                    }
                    if !m.tool_calls.is_empty() {
                        // Text before the calls goes first.
                        if let Some(held) = pending.take() {
                            send(held, &mut events, &mut first, &mut offset);
                        }
                        let deltas: Vec<Value> = m
                            .tool_calls
                            .iter()
                            .enumerate()
                            .map(|(k, call)| tool_call_json(Some(calls + k), call))
                            .collect();
                        calls += deltas.len();
                        let mut chunk = frame.chunk(None, None, first, Value::Null);
                        chunk["choices"][0]["delta"]["tool_calls"] = deltas.into();
                        events.push(event(&chunk));
                        first = false;
                    }
                    let finish = finish_reason(m.finish_reason, calls > 0);
                    if finish.is_some() {
                        if let Some(held) = pending.take() {
                            send(held, &mut events, &mut first, &mut offset);
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
