//! `deepseek-worker`: one expert-parallel rank set of a DeepSeek MoE model.
//!
//! `generate` runs the model on one prompt from the command line. `serve` resolves and checks
//! the rank's place in its group (the contract with the operator); serving gRPC comes with
//! the service issue.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use deepseek_worker::generate::{GenerateOptions, generate};
use deepseek_worker::model::Model;
use deepseek_worker::rank;
use deepseek_worker::sampling::SamplingParams;
use deepseek_worker::tokenizer::Tokenizer;
use serde_json::json;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt and print the result as JSON.
    Generate(GenerateArgs),
    /// Serve the model over gRPC as ranks of an expert-parallel group.
    Serve(rank::ServeArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory: config.json and safetensors (tokenizer.json for text prompts).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write every prompt position's and generated step's logits to this JSON file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => {
            let ranks = args.resolve()?;
            eprintln!("{ranks}");
            bail!(
                "serving is not implemented yet: this build of deepseek-worker only checks its \
                 group configuration (see README, \"Status\")"
            )
        }
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads.filter(|&n| n > 0) {
        // SAFETY: set before any other thread exists; candle and rayon read it at first use.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    let start = Instant::now();
    let model = Model::open(&args.model)?;
    let stop_ids = model.config().eos_token_ids.clone();
    let load_seconds = start.elapsed().as_secs_f64();

    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let prompt_ids = match (args.prompt_ids, &args.prompt, &tokenizer) {
        (Some(ids), _, _) => ids,
        (None, Some(text), Some(tokenizer)) => tokenizer.encode(text, true)?,
        (None, Some(_), None) => bail!(
            "--prompt needs {}/tokenizer.json; this model has none, so give --prompt-ids",
            args.model.display()
        ),
        (None, None, _) => bail!("give --prompt or --prompt-ids"),
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        },
        stop_ids,
        keep_logits: args.logits_out.is_some(),
    };
    let out = generate(&model, &prompt_ids, &options)?;
    if let Some(path) = &args.logits_out {
        let logits = json!({"prompt_logits": out.prompt_logits, "step_logits": out.step_logits});
        std::fs::write(path, serde_json::to_vec(&logits)?)
            .with_context(|| format!("--logits-out {}", path.display()))?;
    }
    let per_second = |tokens: usize, seconds: f64| {
        if seconds > 0.0 {
            tokens as f64 / seconds
        } else {
            0.0
        }
    };
    // The first generated token comes from the prefill; decode produced the rest.
    let decoded = out.tokens.len().saturating_sub(1);
    let mut report = json!({
        "prompt_ids": prompt_ids,
        "tokens": out.tokens,
        "timing": {
            "load_s": load_seconds,
            "prefill_tokens_per_s": per_second(prompt_ids.len(), out.prefill_seconds),
            "decode_tokens_per_s": per_second(decoded, out.decode_seconds),
        },
    });
    if let Some(tokenizer) = &tokenizer {
        report["text"] = tokenizer.decode(&out.tokens, true)?.into();
    }
    println!("{report}");
    Ok(())
}
