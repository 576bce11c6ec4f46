use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deepseek_operator::api::DeepSeekDeployment;
use kube::CustomResourceExt;

/// Kubernetes operator for DeepSeek mixture-of-experts serving.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DeepSeekDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would create for a DeepSeekDeployment manifest.
    Render {
        /// Manifest file (YAML), or `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", serde_yaml::to_string(&DeepSeekDeployment::crd())?),
        Command::Render { file } => print!("{}", render(&file)?),
    }
    Ok(())
}

fn render(file: &PathBuf) -> anyhow::Result<String> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let dsd: DeepSeekDeployment = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid DeepSeekDeployment", file.display()))?;
    Ok(dsd.desired()?.to_yaml())
}
