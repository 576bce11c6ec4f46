//! `deepseek-worker`: one expert-parallel rank set of a DeepSeek MoE model.
//!
//! Today it resolves and checks its place in the group (the contract with the operator);
//! loading the model and serving gRPC come with the engine and service issues.

use clap::{Parser, Subcommand};
use deepseek_worker::rank;

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
