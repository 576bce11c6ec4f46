//! Text in and out: the Hugging Face `tokenizer.json`, the chat template of
//! `tokenizer_config.json` (rendered with minijinja, Python string methods included), UTF-8
//! safe incremental detokenisation for streaming, and stop strings.

use std::path::Path;

use minijinja::{Environment, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Context, Error, Result};

/// A message as chat templates read it: OpenAI's shape, with `tool_calls` and
/// `tool_call_id` present only where set (templates test `'tool_calls' in message`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    /// `None` for an assistant turn that only calls tools (templates test `is none`).
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<TemplateToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TemplateToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: TemplateFunction,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TemplateFunction {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

impl ChatMessage {
    /// A plain message.
    pub fn text(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

impl From<deepseek_proto::v1::ChatMessage> for ChatMessage {
    fn from(m: deepseek_proto::v1::ChatMessage) -> Self {
        let tool_calls: Vec<TemplateToolCall> = m
            .tool_calls
            .into_iter()
            .map(|call| TemplateToolCall {
                id: call.id,
                kind: "function",
                function: TemplateFunction {
                    name: call.name,
                    arguments: call.arguments,
                },
            })
            .collect();
        ChatMessage {
            content: (tool_calls.is_empty() || !m.content.is_empty()).then_some(m.content),
            role: m.role,
            tool_calls,
            tool_call_id: Some(m.tool_call_id).filter(|id| !id.is_empty()),
        }
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Whether a sequence is inside `<think>` … `</think>`: R1-style models think there before
/// they answer, and that text is streamed apart from the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thinking {
    open: u32,
    close: u32,
    inside: bool,
}

/// Which part of the output a token's text belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Thinking,
    Answer,
    /// `<think>` or `</think>` itself: in DeepSeek's vocabulary they are not special tokens,
    /// so their text is dropped here rather than by the decoder.
    Tag,
}

impl Thinking {
    /// Moves past `token`, saying where its text goes.
    pub fn step(&mut self, token: u32) -> Part {
        if token == self.open || token == self.close {
            self.inside = token == self.open;
            return Part::Tag;
        }
        if self.inside {
            Part::Thinking
        } else {
            Part::Answer
        }
    }

    pub fn inside(&self) -> bool {
        self.inside
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl Tokenizer {
    /// `dir/tokenizer.json` (and `tokenizer_config.json` when present); `None` when the
    /// model ships no tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Message(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?
            }
            Err(_) => Value::Null,
        };
        Ok(Some(Tokenizer {
            inner,
            chat_template: chat_template(&config),
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        }))
    }

    /// Where a sequence that starts with `prompt` thinks, when the vocabulary has both
    /// `<think>` and `</think>`: inside when the prompt's last tag opens.
    pub fn thinking(&self, prompt: &[u32]) -> Option<Thinking> {
        let open = self.token_id(THINK_OPEN)?;
        let close = self.token_id(THINK_CLOSE)?;
        let last_tag = prompt.iter().rev().find(|t| **t == open || **t == close);
        Some(Thinking {
            open,
            close,
            inside: last_tag == Some(&open),
        })
    }

    /// The id of a token written out whole (`<think>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds
    /// (BOS for DeepSeek).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Message(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Message(format!("detokenizing: {e}")))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Serves with `template` instead of the one in `tokenizer_config.json` (vLLM's
    /// `--chat-template`), for instance one that shows `tools` to the model.
    pub fn with_chat_template(self, template: String) -> Self {
        Tokenizer {
            chat_template: Some(template),
            ..self
        }
    }

    /// Renders the conversation with the model's chat template, `tools` (OpenAI's list) given
    /// as the template's `tools` when set. The template writes the BOS token itself, so
    /// encode the result without special tokens.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .context("tokenizer_config.json has no chat_template")?;
        let mut env = Environment::new();
        // `str.split`, `dict.get` and friends, which Hugging Face templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_template("chat", template)
            .map_err(|e| Error::Message(format!("chat_template: {e}")))?;
        let rendered = env
            .get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    tools => tools,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                })
            })
            .map_err(|e| Error::Message(format!("rendering chat_template: {e}")))?;
        Ok(rendered)
    }
}

/// Hugging Face's `tojson` filter: Python's `json.dumps` with `ensure_ascii=False`, so
/// `{"a": 1, "b": [2, 3]}` (its separators), or indented with `indent=N`. Unlike minijinja's
/// own it escapes no HTML.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let invalid = |e: serde_json::Error| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    };
    let json = serde_json::to_value(&value).map_err(invalid)?;
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let Some(indent) = indent else {
        let mut out = String::new();
        write_python_json(&json, &mut out);
        return Ok(out);
    };
    let indent = " ".repeat(indent);
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
    serde::Serialize::serialize(
        &json,
        &mut serde_json::Serializer::with_formatter(&mut out, formatter),
    )
    .map_err(invalid)?;
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// `json.dumps` without indent: `", "` between items, `": "` after keys.
fn write_python_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is used.
fn chat_template(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Special tokens are written as a string or as `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(token)) => token.clone(),
        Some(token) => token
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

/// Turns a growing list of token ids into text deltas without ever emitting half a UTF-8
/// character or a byte-fallback fragment: a delta is released only once the decoded text no
/// longer ends in U+FFFD. Decoding a window from a few tokens back keeps word-boundary
/// spacing right (the approach of text-generation-inference).
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

impl IncrementalDecoder {
    /// Text still held back when generation ends (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is
/// held back until it is known not to be.
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

/// What a chunk of streamed text turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit now (maybe empty).
    Continue(String),
    /// A stop string was reached: emit this text (before the stop) and finish.
    Stopped(String),
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck::Stopped(before);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| self.pending.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0);
        let emit_to = self.pending.len() - keep;
        let emitted = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        StopCheck::Continue(emitted)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_is_what_lies_between_the_tags() {
        let (open, close) = (4, 5);
        let mut thinking = Thinking {
            open,
            close,
            inside: true,
        };
        let parts: Vec<Part> = [9, close, 9, open, 9, 9, close, 9]
            .iter()
            .map(|t| thinking.step(*t))
            .collect();
        let (think, tag, answer) = (Part::Thinking, Part::Tag, Part::Answer);
        assert_eq!(parts, [think, tag, answer, tag, think, think, tag, answer]);
        assert!(!thinking.inside());
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut stops = StopStrings::new(vec!["</s>".into(), "STOP".into()]);
        assert_eq!(stops.push("hello <"), StopCheck::Continue("hello ".into()));
        assert_eq!(stops.push("/"), StopCheck::Continue(String::new()));
        assert_eq!(stops.push("x"), StopCheck::Continue("</x".into()));
        assert_eq!(stops.push(" and ST"), StopCheck::Continue(" and ".into()));
        assert_eq!(stops.push("OP more"), StopCheck::Stopped(String::new()));
        let mut stops = StopStrings::new(vec!["é!".into()]);
        assert_eq!(stops.push("café"), StopCheck::Continue("caf".into()));
        assert_eq!(stops.flush(), "é");
    }

    #[test]
    fn special_tokens_and_templates_in_both_spellings() {
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}],
        });
        assert_eq!(special_token(&config, "bos_token"), "<s>");
        assert_eq!(special_token(&config, "eos_token"), "</s>");
        assert_eq!(chat_template(&config).as_deref(), Some("y"));
    }
}
