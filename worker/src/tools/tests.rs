use std::path::Path;

use serde_json::json;

use super::*;

/// The demo model's tokenizer: DeepSeek's tool-call tokens, as V3's vocabulary has them.
fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/demo-v3");
    Tokenizer::from_dir(&dir)
        .unwrap()
        .expect("the demo model ships a tokenizer")
}

/// What a reply streams: its text, and its calls as (name, arguments).
fn read(reply: &str, names: &[&str], forced: &str) -> (String, Vec<(String, String)>) {
    let t = tokenizer();
    let markers = ToolMarkers::of(&t).expect("the vocabulary has the tool tokens");
    let forced = t.encode(forced, false).unwrap();
    let names = names.iter().map(|n| n.to_string()).collect();
    let mut parser = ToolCallParser::new(markers, names, &forced);
    let (mut text, mut calls) = (Vec::new(), Vec::new());
    for token in t.encode(reply, false).unwrap() {
        match parser.step(&t, token) {
            ToolStep::Text => text.push(token),
            ToolStep::Held => {}
            ToolStep::Call(call) => {
                assert!(
                    call.id.starts_with("call_") && call.id.len() == 29,
                    "{}",
                    call.id
                );
                calls.push((call.name, call.arguments));
            }
            ToolStep::Release(tokens) => text.extend(tokens),
        }
    }
    text.extend(parser.finish());
    (t.decode(&text, false).unwrap(), calls)
}

const WEATHER: &str = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>";
const TIME: &str =
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>";

fn call(name: &str, arguments: &str) -> (String, String) {
    (name.to_string(), arguments.to_string())
}

#[test]
fn calls_in_deepseek_format_come_out_whole_and_apart_from_the_text() {
    let reply = format!("Let me look.<｜tool▁calls▁begin｜>{WEATHER}\n{TIME}<｜tool▁calls▁end｜>");
    assert_eq!(
        read(&reply, &["get_weather", "get_time"], ""),
        (
            "Let me look.".to_string(),
            vec![
                call("get_weather", "{\"city\": \"Paris\"}"),
                call("get_time", "{}")
            ]
        )
    );
    // V3.1 writes the name before the separator and the bare arguments after it.
    let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{\"zone\": \"UTC\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    assert_eq!(
        read(v31, &["get_time"], ""),
        (String::new(), vec![call("get_time", "{\"zone\": \"UTC\"}")])
    );
}

#[test]
fn a_malformed_call_goes_out_as_its_raw_text_and_none_is_dropped() {
    let names = ["get_weather", "get_time"];
    for broken in [
        // arguments that are not a JSON object
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n[1, 2]\n```<｜tool▁call▁end｜>",
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"a\": \n```<｜tool▁call▁end｜>",
        // a function not offered
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>rm_rf\n```json\n{}\n```<｜tool▁call▁end｜>",
        // no separator
        "<｜tool▁call▁begin｜>get_time {}<｜tool▁call▁end｜>",
        // a call begun inside a call
        "<｜tool▁call▁begin｜>function<｜tool▁call▁begin｜>",
    ] {
        let reply = format!("<｜tool▁calls▁begin｜>{broken}");
        let (text, calls) = read(&reply, &names, "");
        assert_eq!((text.as_str(), calls.len()), (reply.as_str(), 0));
    }
    // A good call is kept; the malformed one after it comes out as text.
    let reply = format!("<｜tool▁calls▁begin｜>{WEATHER}\nnot a call");
    let (text, calls) = read(&reply, &names, "");
    assert_eq!(calls, [call("get_weather", "{\"city\": \"Paris\"}")]);
    assert_eq!(text, "\nnot a call");
    // A block the model did not close after a good call loses nothing.
    let unclosed = format!("<｜tool▁calls▁begin｜>{WEATHER}\n");
    assert_eq!(
        read(&unclosed, &names, ""),
        (
            String::new(),
            vec![call("get_weather", "{\"city\": \"Paris\"}")]
        )
    );
    // Cut off by the token budget: the held tokens come out at the end.
    let (text, calls) = read(
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_ti",
        &names,
        "",
    );
    assert_eq!(
        text,
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_ti"
    );
    assert!(calls.is_empty());
}

#[test]
fn a_forced_call_is_completed_by_the_reply() {
    let prefix = forced_call_prefix("get_weather");
    assert!(prefix.ends_with("get_weather\n```json\n"));
    assert_eq!(
        read(
            "{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            &["get_weather"],
            &prefix
        ),
        (
            String::new(),
            vec![call("get_weather", "{\"city\": \"Oslo\"}")]
        )
    );
    // Left unfinished, the whole call, its forced start included, is the text.
    let (text, _) = read("{\"city\"", &["get_weather"], &prefix);
    assert_eq!(text, format!("{prefix}{{\"city\""));
}

#[test]
fn tools_are_functions_with_names() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "function": {"name": "get_time"}},
    ]);
    assert_eq!(function_names(&tools).unwrap(), ["get_weather", "get_time"]);
    for (bad, says) in [
        (json!({"type": "function"}), "must be a JSON array of tools"),
        (
            json!([{"type": "retrieval"}]),
            "[0].type: only \"function\" tools are supported",
        ),
        (
            json!([{"type": "function", "function": {}}]),
            "[0].function.name: missing or empty",
        ),
    ] {
        assert_eq!(function_names(&bad).unwrap_err(), says);
    }
}
