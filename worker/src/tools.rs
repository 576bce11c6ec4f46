//! Tool calls in DeepSeek's format. The model writes
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! {"arg": 1}
//! ```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>
//! ```
//!
//! (V3 and R1; V3.1 writes `NAME<｜tool▁sep｜>{"arg": 1}` inside a call, which is read too).
//! [`ToolCallParser`] follows the generated tokens: markup and calls are held back from the
//! text, a well-formed call comes out whole, and a malformed one comes out as its raw
//! tokens, to be streamed as text.

use std::hash::BuildHasher;

use deepseek_proto::v1::ToolCall;
use serde_json::Value;

use crate::tokenizer::Tokenizer;

const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALLS_END: &str = "<｜tool▁calls▁end｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";

/// The ids of DeepSeek's tool-call tokens in a vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolMarkers {
    calls_begin: u32,
    calls_end: u32,
    call_begin: u32,
    call_end: u32,
    sep: u32,
}

impl ToolMarkers {
    /// `None` when the vocabulary lacks any of them: the model has no call format we read.
    pub fn of(tokenizer: &Tokenizer) -> Option<Self> {
        Some(ToolMarkers {
            calls_begin: tokenizer.token_id(CALLS_BEGIN)?,
            calls_end: tokenizer.token_id(CALLS_END)?,
            call_begin: tokenizer.token_id(CALL_BEGIN)?,
            call_end: tokenizer.token_id(CALL_END)?,
            sep: tokenizer.token_id(SEP)?,
        })
    }
}

/// The text that starts a reply with a call of `name`, as the model would write it.
pub fn forced_call_prefix(name: &str) -> String {
    format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n")
}

/// The names of the functions in OpenAI `tools`, or what is wrong with them.
pub fn function_names(tools: &Value) -> Result<Vec<String>, String> {
    let Value::Array(tools) = tools else {
        return Err("must be a JSON array of tools".into());
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool["type"] != "function" {
                return Err(format!("[{i}].type: only \"function\" tools are supported"));
            }
            match tool["function"]["name"].as_str() {
                Some(name) if !name.is_empty() => Ok(name.to_string()),
                _ => Err(format!("[{i}].function.name: missing or empty")),
            }
        })
        .collect()
}

/// What a generated token is to the parser.
#[derive(Debug, PartialEq)]
pub enum ToolStep {
    /// Ordinary text.
    Text,
    /// Held back: tool-call markup or part of a call not yet complete.
    Held,
    /// The token completed a call.
    Call(ToolCall),
    /// What was held back is not a call: these tokens go out as text.
    Release(Vec<u32>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Text,
    /// Inside `calls_begin` … `calls_end`, between calls.
    BetweenCalls,
    InCall,
}

pub struct ToolCallParser {
    markers: ToolMarkers,
    /// The functions offered: a call of any other is malformed.
    names: Vec<String>,
    state: State,
    /// Tokens held since the last call completed or was released.
    held: Vec<u32>,
    /// Where the current call's tokens start in `held` (after its `call_begin`).
    call_start: usize,
    calls: usize,
}

impl ToolCallParser {
    /// A parser for a reply whose prompt ends in `forced`: the start of a call (as
    /// `forced_call_prefix` writes it), or nothing.
    pub fn new(markers: ToolMarkers, names: Vec<String>, forced: &[u32]) -> Self {
        let call_start = forced.iter().position(|t| *t == markers.call_begin);
        ToolCallParser {
            markers,
            names,
            state: if call_start.is_some() {
                State::InCall
            } else {
                State::Text
            },
            held: forced.to_vec(),
            call_start: call_start.map_or(0, |i| i + 1),
            calls: 0,
        }
    }

    /// Moves past `token`; `tokenizer` decodes a call's name and arguments when it ends.
    pub fn step(&mut self, tokenizer: &Tokenizer, token: u32) -> ToolStep {
        let m = self.markers;
        match (self.state, token) {
            (State::Text, t) if t == m.calls_begin => {
                self.state = State::BetweenCalls;
                self.held.push(t);
                ToolStep::Held
            }
            (State::Text, _) => ToolStep::Text,
            (State::BetweenCalls, t) if t == m.call_begin => {
                self.state = State::InCall;
                self.held.push(t);
                self.call_start = self.held.len();
                ToolStep::Held
            }
            (State::BetweenCalls, t) if t == m.calls_end => {
                self.state = State::Text;
                self.held.clear();
                ToolStep::Held
            }
            (State::BetweenCalls, t) => {
                self.held.push(t);
                let blank = tokenizer
                    .decode(&[t], false)
                    .is_ok_and(|text| text.trim().is_empty());
                if blank {
                    ToolStep::Held
                } else {
                    self.release()
                }
            }
            (State::InCall, t) if t == m.call_end => {
                let call = parse_call(tokenizer, m.sep, &self.held[self.call_start..])
                    .filter(|(name, _)| self.names.contains(name));
                self.held.push(t);
                match call {
                    Some((name, arguments)) => {
                        self.state = State::BetweenCalls;
                        self.held.clear();
                        self.calls += 1;
                        ToolStep::Call(ToolCall {
                            id: call_id(self.calls),
                            name,
                            arguments,
                        })
                    }
                    None => self.release(),
                }
            }
            (State::InCall, t) => {
                self.held.push(t);
                if t == m.calls_begin || t == m.call_begin || t == m.calls_end {
                    self.release()
                } else {
                    ToolStep::Held
                }
            }
        }
    }

    /// Tokens still held when generation ends (a call cut off): they go out as text. Blank
    /// tokens after a complete call (the model stopped without closing the block) are
    /// markup, not text.
    pub fn finish(&mut self) -> Vec<u32> {
        let after_calls = self.state == State::BetweenCalls && self.calls > 0;
        self.state = State::Text;
        let held = std::mem::take(&mut self.held);
        if after_calls { Vec::new() } else { held }
    }

    fn release(&mut self) -> ToolStep {
        self.state = State::Text;
        ToolStep::Release(std::mem::take(&mut self.held))
    }
}

/// The name and arguments of a call's tokens between `call_begin` and `call_end`, when
/// they are well formed: a separator, a name, and arguments that are a JSON object.
fn parse_call(tokenizer: &Tokenizer, sep: u32, tokens: &[u32]) -> Option<(String, String)> {
    let at = tokens.iter().position(|t| *t == sep)?;
    let head = tokenizer.decode(&tokens[..at], false).ok()?;
    let tail = tokenizer.decode(&tokens[at + 1..], false).ok()?;
    let (name, arguments) = split_call(&head, &tail)?;
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)?;
    Some((name.to_string(), arguments.to_string()))
}

/// A call's name and JSON arguments from the text before and after its separator: V3's
/// `function` ⟨sep⟩ `NAME\n```json\n{…}\n```` or V3.1's `NAME` ⟨sep⟩ `{…}`.
fn split_call<'a>(head: &'a str, tail: &'a str) -> Option<(&'a str, &'a str)> {
    if head.trim() == "function" {
        let (name, rest) = tail.split_once('\n')?;
        let arguments = rest.trim().strip_prefix("```json")?.strip_suffix("```")?;
        Some((name.trim(), arguments.trim()))
    } else {
        Some((head.trim(), tail.trim()))
    }
}

/// `call_` and 24 hex digits, as OpenAI's ids look: random, and distinct within a reply.
fn call_id(n: usize) -> String {
    let random = std::collections::hash_map::RandomState::new();
    format!(
        "call_{:016x}{:08x}",
        random.hash_one(n),
        random.hash_one(!n) as u32
    )
}

#[cfg(test)]
mod tests;
