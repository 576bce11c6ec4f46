//! The model against `transformers` on the committed tiny checkpoints
//! (`tests/fixtures/make_fixtures.py`): prompt logits within 1e-4, the same 16 greedy
//! tokens with their step logits, and incremental decode equal to recomputation.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use deepseek_worker::backend::{Backend, Output, Pass};
use deepseek_worker::model::Model;
use deepseek_worker::model::cache::BlockTable;
use deepseek_worker::sampling::{Next, Want};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    prompt_ids: Vec<u32>,
    prompt_logits: Vec<Vec<f32>>,
    greedy_tokens: Vec<u32>,
    step_logits: Vec<Vec<f32>>,
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn load(name: &str) -> (Model, Reference) {
    let dir = fixture(name);
    let model = Model::open(&dir).unwrap();
    let reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (model, reference)
}

pub fn rows(logits: &Tensor) -> Vec<Vec<f32>> {
    logits.to_vec2().unwrap()
}

/// Largest absolute difference between two logit matrices.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

pub fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

fn check(name: &str) {
    let (model, reference) = load(name);
    let mut cache = model.new_cache();
    let prompt = rows(&model.forward(&reference.prompt_ids, &mut cache).unwrap());
    let diff = max_diff(&prompt, &reference.prompt_logits);
    assert!(diff < TOLERANCE, "{name}: prompt logits differ by {diff}");

    let mut tokens = Vec::new();
    let mut steps = vec![prompt.last().unwrap().clone()];
    for step in 0..reference.greedy_tokens.len() {
        let next = argmax(&steps[step]);
        tokens.push(next);
        if step + 1 < reference.greedy_tokens.len() {
            steps.push(rows(&model.forward(&[next], &mut cache).unwrap()).remove(0));
        }
    }
    assert_eq!(tokens, reference.greedy_tokens, "{name}: greedy tokens");
    let diff = max_diff(&steps, &reference.step_logits);
    assert!(diff < TOLERANCE, "{name}: step logits differ by {diff}");

    // One prefill over prompt + generated tokens gives the incremental steps' logits.
    let mut all = reference.prompt_ids.clone();
    all.extend(&tokens[..tokens.len() - 1]);
    let full = rows(&model.forward(&all, &mut model.new_cache()).unwrap());
    let recomputed = &full[reference.prompt_ids.len() - 1..];
    let diff = max_diff(recomputed, &steps);
    assert!(
        diff < 1e-5,
        "{name}: incremental decode differs from recomputation by {diff}"
    );
}

#[test]
fn tiny_v3_bf16_matches_transformers() {
    check("tiny-v3-bf16");
}

#[test]
fn tiny_v3_fp8_matches_transformers() {
    check("tiny-v3-fp8");
}

#[test]
fn tiny_v2_lite_matches_transformers() {
    check("tiny-v2-lite");
}

/// A batched decode step gives every sequence exactly (bit for bit) the logits it gets alone.
fn batched_decode_equals_alone(name: &str) {
    let (model, reference) = load(name);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| reference.prompt_ids[..3 + i].to_vec())
        .collect();
    let mut alone = Vec::new();
    // One shared pool, as the scheduler runs it: the sequences' blocks interleave.
    let mut pool = model.new_pool(64);
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::default()).collect();
    for (prompt, table) in prompts.iter().zip(&mut tables) {
        assert!(pool.reserve(table, prompt.len() + 1));
        model
            .forward_batch(prompt, &mut pool, &mut [(prompt.len(), table)], false)
            .unwrap();
        let mut solo = model.new_cache();
        model.forward(prompt, &mut solo).unwrap();
        alone.push(rows(&model.forward(&[7], &mut solo).unwrap()).remove(0));
    }
    let mut refs: Vec<&mut _> = tables.iter_mut().collect();
    let batched = rows(&model.forward_decode(&[7; 5], &mut pool, &mut refs).unwrap());
    assert_eq!(batched, alone, "{name}");
}

/// One batch-invariant pass of decode rows and prompt chunks (a prompt's first chunk and
/// another's second) gives every sequence exactly the logits of its own passes: what lets
/// the scheduler run short chunks with the decode rows.
fn chunks_among_decode_rows_equal_alone(name: &str) {
    let (model, reference) = load(name);
    assert_eq!(model.batchable_chunk_tokens(), 64, "{name}");
    let p = &reference.prompt_ids;
    // (cached before, rows of the shared pass), by sequence
    let plans: [(&[u32], &[u32]); 4] = [
        (&p[..3], &[7]),
        (&[], &p[..4]),
        (&p[..5], &[9]),
        (&p[..2], &p[2..6]),
    ];
    let mut alone = Vec::new();
    for (before, rows_now) in plans {
        let mut solo = model.new_cache();
        if !before.is_empty() {
            model.forward(before, &mut solo).unwrap();
        }
        alone.extend(rows(&model.forward(rows_now, &mut solo).unwrap()));
    }
    let mut pool = model.new_pool(64);
    let mut tables: Vec<BlockTable> = plans.iter().map(|_| BlockTable::default()).collect();
    for ((before, rows_now), table) in plans.iter().zip(&mut tables) {
        assert!(pool.reserve(table, before.len() + rows_now.len()));
        if !before.is_empty() {
            model
                .forward_batch(before, &mut pool, &mut [(before.len(), table)], false)
                .unwrap();
        }
    }
    let tokens: Vec<u32> = plans
        .iter()
        .flat_map(|(_, now)| now.iter().copied())
        .collect();
    let mut segments: Vec<(usize, &mut BlockTable)> = plans
        .iter()
        .zip(&mut tables)
        .map(|((_, now), table)| (now.len(), table))
        .collect();
    let together = rows(
        &model
            .forward_batch(&tokens, &mut pool, &mut segments, true)
            .unwrap(),
    );
    assert_eq!(together, alone, "{name}");
}

#[test]
fn prompt_chunks_among_decode_rows_are_batch_invariant_bf16() {
    chunks_among_decode_rows_equal_alone("tiny-v3-bf16");
}

#[test]
fn prompt_chunks_among_decode_rows_are_batch_invariant_fp8() {
    chunks_among_decode_rows_equal_alone("tiny-v3-fp8");
}

#[test]
fn batched_decode_is_batch_invariant_bf16() {
    batched_decode_equals_alone("tiny-v3-bf16");
}

#[test]
fn batched_decode_is_batch_invariant_fp8() {
    batched_decode_equals_alone("tiny-v3-fp8");
}

/// A pass asked for its segments' last rows gives exactly the logits those rows get when
/// every row goes through `lm_head`, and an empty answer to a segment that wants nothing;
/// a pass that wants nothing at all runs no `lm_head`.
#[test]
fn a_pass_gives_the_last_rows_asked_for_and_nothing_else() {
    let (model, reference) = load("tiny-v3-bf16");
    let p = &reference.prompt_ids;
    let prompts: [&[u32]; 3] = [&p[..4], &p[..6], &p[..5]];
    let last_alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|prompt| rows(&model.forward(prompt, &mut model.new_cache()).unwrap()).pop())
        .map(Option::unwrap)
        .collect();
    let mut cache = Backend::new_cache(&model, 64).unwrap();
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::default()).collect();
    for (prompt, table) in prompts.iter().zip(&mut tables) {
        assert!(cache.pool.reserve(table, prompt.len() + 1));
    }
    let tokens = prompts.concat();
    let mut segments: Vec<(usize, &mut BlockTable)> = prompts
        .iter()
        .zip(&mut tables)
        .map(|(prompt, table)| (prompt.len(), table))
        .collect();
    let wants = [Want::Logits, Want::Nothing, Want::Logits];
    let pass = Pass {
        tokens: &tokens,
        segments: &mut segments,
        batch_invariant: true,
        output: Output::LastRows(&wants),
    };
    let next = Backend::forward(&model, &mut cache, pass).unwrap();
    let expected = [
        Next::Logits(last_alone[0].clone()),
        Next::Logits(Vec::new()),
        Next::Logits(last_alone[2].clone()),
    ];
    assert_eq!(next, expected);

    let pass = Pass {
        tokens: &[7],
        segments: &mut [(1, &mut tables[1])],
        batch_invariant: true,
        output: Output::LastRows(&[Want::Nothing]),
    };
    let next = Backend::forward(&model, &mut cache, pass).unwrap();
    assert_eq!(next, [Next::Logits(Vec::new())]);
}
