//! `deepseek-worker`: one expert-parallel rank set of a DeepSeek MoE model.
//!
//! Today it resolves and checks its place in the group (the contract with the operator);
//! loading the model and serving gRPC come with the engine and service issues.

#[allow(dead_code)] // consumed by the engine, which lands next (issue: DeepSeek engine)
mod config;
mod rank;
#[allow(dead_code)] // consumed by the engine, which lands next (issue: DeepSeek engine)
mod weights;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over gRPC as ranks of an expert-parallel group.
    Serve(rank::ServeArgs),
}

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let ranks = args.resolve()?;
    eprintln!("{ranks}");
    anyhow::bail!(
        "model serving is not implemented yet: this build of deepseek-worker only checks its \
         group configuration (see README, \"Status\")"
    )
}
