//! The HTTP front's handling of bad input: named 4xx errors, never a 5xx, including for
//! 10,000 generated and mutated bodies and headers.

use deepseek_router::policy::Policy;
use serde_json::{Value, json};

use crate::fakes::{FakeServer, Mode};
use crate::{config, http, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_get_openai_errors_naming_the_field() {
    let fake = FakeServer::start("a", Mode::Answer).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", fake.addr)])).await;
    let chat = "/v1/chat/completions";
    for (path, body, status, says) in [
        (chat, "{not json", 400, "not valid JSON"),
        (
            chat,
            r#"{"model": "fake"}"#,
            400,
            "missing field `messages`",
        ),
        (
            chat,
            r#"{"model": "fake", "messages": "hi"}"#,
            400,
            "\"param\":\"messages\"",
        ),
        (
            chat,
            r#"{"model": "fake", "messages": []}"#,
            400,
            "must not be empty",
        ),
        (
            chat,
            r#"{"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 3}"#,
            400,
            "\"param\":\"n\"",
        ),
        (
            chat,
            r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}"#,
            404,
            "model_not_found",
        ),
        (chat, r#"[1, 2]"#, 400, "not a valid request"),
        (
            "/v1/completions",
            r#"{"model": "fake", "prompt": {"a": 1}}"#,
            400,
            "\"param\":\"prompt\"",
        ),
        (
            "/v1/completions",
            r#"{"model": "fake", "prompt": ["a", "b"]}"#,
            400,
            "exactly one prompt",
        ),
        (
            "/v1/completions",
            r#"{"model": "fake", "prompt": "x", "max_tokens": -1}"#,
            400,
            "\"param\":\"max_tokens\"",
        ),
        ("/v1/embeddings", "{}", 404, "no such endpoint"),
    ] {
        let (got, text) = http(router.http, "POST", path, &[], body.as_bytes()).await;
        assert_eq!(got, status, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        assert!(error["error"]["message"].is_string(), "{text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    // Refused before a handler runs: a wrong method, a body past the limit (2 MiB).
    let too_large = vec![b' '; 3 << 20];
    for (method, path, body, status, says) in [
        (
            "GET",
            "/v1/chat/completions",
            &b""[..],
            405,
            "GET is not allowed here",
        ),
        (
            "POST",
            "/v1/completions",
            &too_large[..],
            413,
            "length limit exceeded",
        ),
    ] {
        let (got, text) = http(router.http, method, path, &[], body).await;
        assert_eq!(got, status, "{method} {path}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{text}"
        );
    }
    let (status, text) = http(router.http, "GET", "/v1/models", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["data"][0]["id"],
        "fake"
    );
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 8 } else { 10 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!(-(rng.below(5) as i64)),
        4 => json!([1e300, 0.5, -0.0, 3.5e-45][rng.below(4)]),
        5 => json!("x".repeat(rng.below(3) * 40_000)),
        6 => json!(["stop", "\u{0}", "\u{1F600}"][rng.below(3)]),
        7 => json!(rng.below(100)),
        8 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                map.insert(
                    ["role", "content", "type", "text"][rng.below(4)].into(),
                    random_value(rng, depth + 1),
                );
            }
            Value::Object(map)
        }
    }
}

/// A valid request with a few fields replaced, removed or added.
fn mutated_body(rng: &mut Rng, chat: bool) -> Vec<u8> {
    let mut body = if chat {
        json!({"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    } else {
        json!({"model": "fake", "prompt": "hello", "max_tokens": 2})
    };
    let fields = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "presence_penalty",
        "logprobs",
        "echo",
        "suffix",
        "ignore_eos",
    ];
    for _ in 0..1 + rng.below(3) {
        let field = fields[rng.below(fields.len())];
        if rng.below(4) == 0 {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = random_value(rng, 0);
        }
    }
    let mut bytes = serde_json::to_vec(&body).unwrap();
    match rng.below(10) {
        0 => bytes.truncate(rng.below(bytes.len() + 1)),
        1 => {
            let at = rng.below(bytes.len() + 1);
            bytes.insert(at, [b'{', b'"', 0xff, b'\\', b']'][rng.below(5)]);
        }
        _ => {}
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_bodies_and_headers_get_2xx_or_4xx() {
    let fake = FakeServer::start("a", Mode::Answer).await;
    let router = start(config(Policy::LeastLoad, &[], &[("p", fake.addr)])).await;
    let addr = router.http;
    let lanes: Vec<_> = (0..8u64)
        .map(|lane| {
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (lane + 1));
                for i in 0..1250 {
                    let chat = rng.below(2) == 0;
                    let path = if chat {
                        "/v1/chat/completions"
                    } else {
                        "/v1/completions"
                    };
                    let body = mutated_body(&mut rng, chat);
                    let header_value =
                        ["application/json", "text/plain", "", "Bearer x", "\u{7f}"][rng.below(5)];
                    let header_name =
                        ["Content-Type", "Authorization", "Accept", "X-Request-Id"][rng.below(4)];
                    let headers = [(header_name, header_value)];
                    let (status, text) = http(addr, "POST", path, &headers, &body).await;
                    assert!(
                        (200..500).contains(&status),
                        "lane {lane} request {i}: {status} for {:?}: {text}",
                        String::from_utf8_lossy(&body)
                    );
                }
            })
        })
        .collect();
    for lane in lanes {
        lane.await.unwrap();
    }
}
