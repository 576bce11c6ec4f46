//! Expert parallelism in one process: ranks on their own threads, connected by channels,
//! each holding only its experts. A group must compute what one process computes.

use std::sync::Arc;

use deepseek_proto::placement::PlacementPlan;
use deepseek_worker::backend::Backend;
use deepseek_worker::ep::{ChannelTransport, Transport, Wire, open_rank};
use deepseek_worker::model::Model;

use crate::parity::{argmax, fixture, max_diff, rows};

/// What one sequence produced: prompt logits, greedy tokens, and the logits of each step.
#[derive(Debug)]
struct Run {
    prompt: Vec<Vec<f32>>,
    tokens: Vec<u32>,
    steps: Vec<Vec<f32>>,
}

fn generate(model: &Model, prompt: &[u32], steps: usize) -> Run {
    let mut cache = model.new_cache();
    let logits = rows(&model.forward(prompt, &mut cache).unwrap());
    let mut run = Run {
        steps: vec![logits.last().unwrap().clone()],
        prompt: logits,
        tokens: Vec::new(),
    };
    for _ in 0..steps {
        let next = argmax(run.steps.last().unwrap());
        run.tokens.push(next);
        run.steps
            .push(rows(&model.forward(&[next], &mut cache).unwrap()).remove(0));
    }
    run
}

/// Rank r generates from `prompts[r]`; every rank steps in lockstep (same number of
/// forward passes), each on a one-thread pool of its own.
fn run_group(name: &str, plan: &PlacementPlan, wire: Wire, prompts: &[Vec<u32>]) -> Vec<Run> {
    let transports = ChannelTransport::group(plan.group_size as usize);
    let ranks: Vec<_> = transports
        .into_iter()
        .zip(prompts.to_vec())
        .map(|(transport, prompt)| {
            let (dir, plan) = (fixture(name), plan.clone());
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let rank = transport.rank();
                    let join = move || Ok(Arc::new(transport) as Arc<dyn Transport>);
                    let (model, _) = open_rank(&dir, plan, rank, wire, join).unwrap();
                    generate(&model, &prompt, 6)
                })
            })
        })
        .collect();
    ranks.into_iter().map(|r| r.join().unwrap()).collect()
}

fn check(name: &str, plan: PlacementPlan, wire: Wire, tolerance: f32) {
    let single = Model::open(&fixture(name)).unwrap();
    // Different lengths, so ranks send each other different token counts.
    let prompts: Vec<Vec<u32>> = (0..plan.group_size)
        .map(|r| (0..5 + 3 * r).map(|t| (t * 31 + r * 7 + 3) % 200).collect())
        .collect();
    let group = run_group(name, &plan, wire, &prompts);
    for (rank, (prompt, run)) in prompts.iter().zip(&group).enumerate() {
        let alone = generate(&single, prompt, 6);
        let prompt_diff = max_diff(&run.prompt, &alone.prompt);
        let step_diff = max_diff(&run.steps, &alone.steps);
        let what = format!("{name} EP={} rank {rank} {wire:?}", plan.group_size);
        assert!(
            prompt_diff < tolerance,
            "{what}: prompt logits differ by {prompt_diff}"
        );
        assert!(
            step_diff < tolerance,
            "{what}: step logits differ by {step_diff}"
        );
        if wire == Wire::F32 {
            assert_eq!(run.tokens, alone.tokens, "{what}: greedy tokens");
        }
    }
}

#[test]
fn two_and_four_ranks_compute_what_one_process_does() {
    for name in ["tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2-lite"] {
        let experts = Model::open(&fixture(name))
            .unwrap()
            .config()
            .moe
            .n_routed_experts as u32;
        check(
            name,
            PlacementPlan::round_robin(2, experts, 0),
            Wire::F32,
            1e-5,
        );
        check(
            name,
            PlacementPlan::round_robin(4, experts, 0),
            Wire::F32,
            1e-5,
        );
    }
}

#[test]
fn redundant_copies_and_a_balanced_plan_change_nothing_but_where_experts_run() {
    let load =
        std::collections::BTreeMap::from([(1, vec![90, 5, 5, 5, 40, 5, 5, 5]), (2, vec![1; 8])]);
    check(
        "tiny-v3-bf16",
        PlacementPlan::round_robin(4, 8, 4),
        Wire::F32,
        1e-5,
    );
    check(
        "tiny-v3-bf16",
        PlacementPlan::balanced(4, 8, 3, &load),
        Wire::F32,
        1e-5,
    );
}

#[test]
fn bf16_activations_on_the_wire_stay_close() {
    check(
        "tiny-v3-bf16",
        PlacementPlan::round_robin(2, 8, 0),
        Wire::Bf16,
        5e-2,
    );
}
