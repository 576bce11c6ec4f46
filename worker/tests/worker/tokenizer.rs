//! The tiny fixture's tokenizer and DeepSeek-V3 chat template, against what transformers 5.24
//! (`AutoTokenizer`, `apply_chat_template`) gives for the same inputs.

use std::path::Path;

use deepseek_worker::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-v3-bf16");
    Tokenizer::from_dir(&dir)
        .unwrap()
        .expect("the fixture ships a tokenizer")
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage::text(role, content)
}

#[test]
fn encoding_adds_bos_like_transformers() {
    let t = tokenizer();
    assert_eq!(
        t.encode("Hello world é", true).unwrap(),
        [0, 54, 326, 90, 93, 293, 285, 90, 82, 235, 142, 117]
    );
    assert_eq!(
        t.decode(&[0, 54, 326, 90, 93, 293, 285, 90, 82, 235, 142, 117], true)
            .unwrap(),
        "Hello world é"
    );
}

#[test]
fn the_chat_template_renders_like_transformers() {
    let t = tokenizer();
    let messages = [
        message("system", "Be brief."),
        message("user", "Hi there"),
        message("assistant", "<think>x</think>Hello!"),
        message("user", "Bye"),
    ];
    let rendered = t.apply_chat_template(&messages, None, true).unwrap();
    assert_eq!(
        rendered,
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>"
    );
    assert_eq!(
        // (the template wrote the BOS token: no special tokens added)
        t.encode(&rendered, false).unwrap(),
        [
            0, 48, 83, 327, 96, 87, 83, 84, 28, 2, 54, 87, 280, 272, 83, 3, 54, 326, 90, 93, 15, 1,
            2, 48, 103, 83, 3
        ]
    );
}

#[test]
fn incremental_decoding_streams_whole_characters() {
    let t = tokenizer();
    let text = "naïve café — 東京 ok";
    let ids = t.encode(text, false).unwrap();
    let mut decoder = IncrementalDecoder::default();
    let mut streamed = String::new();
    for &id in &ids {
        let delta = decoder.push(&t, id).unwrap();
        assert!(
            !delta.contains('\u{FFFD}'),
            "half a character leaked: {delta:?}"
        );
        streamed.push_str(&delta);
    }
    assert_eq!(streamed, text);
}

#[test]
fn tojson_writes_what_pythons_json_dumps_writes() {
    let tools =
        serde_json::json!([{"type": "function", "function": {"name": "f", "x": ["é", 1.5, null]}}]);
    let render = |template: &str| {
        tokenizer()
            .with_chat_template(template.into())
            .apply_chat_template(&[], Some(&tools), false)
            .unwrap()
    };
    // json.dumps(tools, ensure_ascii=False): ", " and ": " separators, no HTML escaping
    assert_eq!(
        render("{{ tools | tojson }}"),
        r#"[{"function": {"name": "f", "x": ["é", 1.5, null]}, "type": "function"}]"#
    );
    assert_eq!(
        render("{{ tools[0]['function'] | tojson(indent=2) }}"),
        "{\n  \"name\": \"f\",\n  \"x\": [\n    \"é\",\n    1.5,\n    null\n  ]\n}"
    );
}
