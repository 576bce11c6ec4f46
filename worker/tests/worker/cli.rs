//! The `generate` command-line contract, run as a process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepseek-worker"))
        .args(args)
        .output()
        .unwrap()
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn greedy_generation_prints_the_reference_tokens_and_logits() {
    let dir = fixture("tiny-v3-bf16");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<String> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let logits_file = std::env::temp_dir().join(format!("dsd-logits-{}.json", std::process::id()));
    let out = json(&worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-new-tokens",
        "16",
        "--threads",
        "1",
        "--logits-out",
        logits_file.to_str().unwrap(),
    ]));
    assert_eq!(out["tokens"], reference["greedy_tokens"]);
    assert_eq!(out["prompt_ids"], reference["prompt_ids"]);
    assert!(out["text"].is_string(), "the fixture has a tokenizer");
    for key in ["load_s", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(out["timing"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    let logits: Value =
        serde_json::from_str(&std::fs::read_to_string(&logits_file).unwrap()).unwrap();
    std::fs::remove_file(&logits_file).unwrap();
    for key in ["prompt_logits", "step_logits"] {
        let ours = logits[key].as_array().unwrap();
        let theirs = reference[key].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{key}");
        for (a, b) in ours.iter().zip(theirs) {
            for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
                assert!(
                    (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                    "{key}"
                );
            }
        }
    }
}

/// The output and the logits file of 8 greedy tokens from a fixed prompt with `flags`.
fn logits_with(dir: &Path, flags: &[&str]) -> (Value, String) {
    let logits = std::env::temp_dir().join(format!(
        "dsd-kernels-{}-{}.json",
        flags.join("-"),
        std::process::id()
    ));
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "0,5,17,99,3,250,42,7",
        "--max-new-tokens",
        "8",
        "--logits-out",
        logits.to_str().unwrap(),
    ];
    args.extend(flags);
    let out = json(&worker(&args));
    let text = std::fs::read_to_string(&logits).unwrap();
    std::fs::remove_file(&logits).unwrap();
    (out, text)
}

/// Whether this CPU runs the `avx512vbmi` kernels.
fn has_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("avx512f") && has!("avx512bw") && has!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `--cpu-kernels` changes speed only: every path this CPU has gives the same logits, bit for
/// bit, on bf16 and FP8 weights, and the output names the path that ran.
#[test]
fn every_cpu_kernel_path_gives_the_same_logits() {
    let mut paths = vec![("baseline", "baseline")];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            paths.push(("avx2", "avx2+fma"));
            if has!("avx512f") {
                paths.push(("avx512", "avx512f"));
                if has_vbmi() {
                    paths.push(("avx512vbmi", "avx512f+vbmi"));
                }
            }
        }
    }
    for model in ["tiny-v3-bf16", "tiny-v3-fp8"] {
        let dir = fixture(model);
        let runs: Vec<String> = paths
            .iter()
            .map(|(flag, name)| {
                let (out, logits) = logits_with(&dir, &["--cpu-kernels", flag]);
                assert_eq!(out["cpu_kernels"], *name);
                logits
            })
            .collect();
        for ((flag, _), run) in paths.iter().zip(&runs) {
            assert!(
                run == &runs[0],
                "{model}: --cpu-kernels {flag} gave other logits"
            );
        }
    }
}

/// `--cpu-decode-weights coded` changes speed and memory only: the same logits, bit for bit,
/// where the CPU has the kernels that decode it (`bad_input_fails_with_a_message_and_no_output`
/// has it refused elsewhere).
#[test]
fn coded_decode_weights_give_the_same_logits() {
    if has_vbmi() {
        let dir = fixture("tiny-v3-bf16");
        let (_, stored) = logits_with(&dir, &["--cpu-decode-weights", "stored"]);
        let (_, coded) = logits_with(&dir, &["--cpu-decode-weights", "coded"]);
        assert!(coded == stored, "coded weights gave other logits");
    }
}

/// The trained demo model answers as transformers did when it was made: the same greedy
/// words (`training.json` keeps transformers' answers, computed with the bf16 weights).
#[test]
fn the_demo_model_answers_as_transformers_does() {
    let dir = fixture("demo-v3");
    let training: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    let answers = training["greedy_answers_bf16"].as_object().unwrap();
    for (prompt, answer) in answers {
        let chat = format!("<｜User｜>{prompt}<｜Assistant｜>");
        let out = json(&worker(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &chat,
            "--max-new-tokens",
            "40",
        ]));
        assert_eq!(out["text"].as_str(), answer.as_str(), "{prompt}");
    }
}

#[test]
fn text_prompts_use_the_tokenizer() {
    let model = fixture("tiny-v3-bf16");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello world",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ];
    let out = json(&worker(&args));
    assert_eq!(out["prompt_ids"].as_array().unwrap()[0], 0, "BOS first");
    assert_eq!(out["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(
        out["tokens"],
        json(&worker(&args))["tokens"],
        "a seed reproduces the tokens"
    );
}

#[test]
fn bad_input_fails_with_a_message_and_no_output() {
    let v3 = fixture("tiny-v3-bf16");
    let v3 = v3.to_str().unwrap();
    let lite = fixture("tiny-v2-lite");
    let lite = lite.to_str().unwrap();
    let coded = ["--cpu-decode-weights", "coded"];
    let cases: [(Vec<&str>, &str); 9] = [
        (
            vec!["--model", v3, "--prompt-ids", "1", "--device", "tpu:0"],
            "expected `cpu` or `cuda:N`",
        ),
        (
            vec!["--model", "/nonexistent", "--prompt-ids", "1"],
            "/nonexistent/config.json",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "1", "--cpu-kernels", "sse9"],
            "invalid value 'sse9' for '--cpu-kernels",
        ),
        (
            vec!["--model", lite, "--prompt", "hi"],
            "has none, so give --prompt-ids",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "1,99999"],
            "token id 99999 is outside the vocabulary",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "1", "--temperature", "-1"],
            "temperature must be ≥ 0",
        ),
        (
            vec![
                "--model",
                v3,
                "--prompt-ids",
                "1",
                "--max-new-tokens",
                "100000",
            ],
            "exceeds the context length 256",
        ),
        (
            [
                &[
                    "--model",
                    v3,
                    "--prompt-ids",
                    "1,2",
                    "--cpu-kernels",
                    "baseline",
                ],
                &coded[..],
            ]
            .concat(),
            "--cpu-decode-weights: coded weights need the avx512vbmi kernels",
        ),
        (
            [
                &["--model", v3, "--prompt-ids", "1,2", "--device", "cuda:0"],
                &coded[..],
            ]
            .concat(),
            "--cpu-decode-weights coded is for --device cpu",
        ),
    ];
    for (args, expected) in cases {
        let output = worker(&[&["generate"], &args[..]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && output.stdout.is_empty(),
            "{args:?}"
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn plan_balances_measured_expert_load_or_falls_back_to_round_robin() {
    let dir = std::env::temp_dir().join(format!("dsd-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scrape = dir.join("rank0.txt");
    // Layer 1: expert 3 carries almost everything.
    let counts = [5, 5, 5, 900, 5, 5, 5, 5];
    let text: String = counts
        .iter()
        .enumerate()
        .map(|(e, n)| {
            format!(
                "deepseek_worker_expert_routed_tokens_total{{layer=\"1\",expert=\"{e}\"}} {n}\n"
            )
        })
        .collect();
    std::fs::write(&scrape, text).unwrap();
    let model = fixture("tiny-v3-bf16");
    let args = [
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--group-size",
        "4",
        "--redundant",
        "3",
    ];
    let plan = json(&worker(
        &[&args[..], &["--metrics", scrape.to_str().unwrap()]].concat(),
    ));
    let plan = deepseek_proto::placement::PlacementPlan::from_json(&plan.to_string()).unwrap();
    assert_eq!(plan.layer(1)[3].len(), 4, "the hot expert is on every rank");
    assert_eq!(
        plan.layer(2),
        &plan.default,
        "no data for layer 2: round-robin"
    );
    let round_robin = json(&worker(&args));
    assert!(round_robin["layers"].is_null());
    let bad = worker(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--group-size",
        "0",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--group-size must be at least 1"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Fills a kernel cache with NVRTC (CI installs it and sets DSD_REQUIRE_NVRTC); a GPU
/// machine without NVRTC then loads the cubins from there.
#[test]
fn kernels_fills_the_cache_with_cubins_for_both_pools() {
    let cache = std::env::temp_dir().join(format!("dsd-kernel-cache-{}", std::process::id()));
    let output = worker(&[
        "kernels",
        "--arch",
        "sm_80",
        "--arch",
        "sm_90a",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && std::env::var_os("DSD_REQUIRE_NVRTC").is_none() {
        assert!(stderr.contains("NVRTC not found"), "{stderr}");
        eprintln!("skipped: {stderr}");
        return;
    }
    assert!(output.status.success(), "{stderr}");
    let cubins: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for arch in ["sm_80", "sm_90a"] {
        let n = cubins
            .iter()
            .filter(|f| f.contains(&format!("-{arch}-")))
            .count();
        assert_eq!(n, deepseek_worker::gpu::KERNELS.len(), "{arch}: {cubins:?}");
    }
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_model_that_cannot_load_ends_serve_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("dsd-no-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("tiny-v3-bf16").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let model = dir.to_str().unwrap();
    let output = worker(&["serve", "--model", model, "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("loading the model: "), "{stderr}");
    assert!(stderr.contains("safetensors"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_gpu_device_without_a_driver_says_so() {
    // SAFETY: only probes for libcuda with dlopen.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let model = fixture("tiny-v3-bf16");
    let output = worker(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--device",
        "cuda:0",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && output.stdout.is_empty());
    assert!(
        stderr.contains("--device cuda:0: no CUDA driver"),
        "{stderr}"
    );
}

#[test]
fn nccl_needs_a_gpu_rank() {
    let output = worker(&["serve", "--ep-transport", "nccl", "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--ep-transport nccl needs --device cuda:N"),
        "{stderr}"
    );
}
