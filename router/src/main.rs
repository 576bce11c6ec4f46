//! `deepseek-router`: one endpoint over the worker pools of a DeepSeekDeployment.
//!
//! The flags below are the ones the operator passes; routing itself lands with the router
//! issue, and until then the binary says so and exits.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// gRPC listen address (`deepseek.v1.Inference`).
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc_listen: String,
    /// HTTP listen address (OpenAI-compatible API).
    #[arg(long, default_value = "0.0.0.0:8000")]
    http_listen: String,
    /// Metrics listen address.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: String,
    /// Model name clients use.
    #[arg(long)]
    served_name: Option<String>,
    /// least-load, prefix-affinity or weighted.
    #[arg(long, default_value = "least-load", value_parser = ["least-load", "prefix-affinity", "weighted"])]
    policy: String,
    /// Namespace of the worker EndpointSlices.
    #[arg(long)]
    discover_namespace: Option<String>,
    /// Label selector of the worker pods.
    #[arg(long)]
    discover_selector: Option<String>,
    /// `NAME=WEIGHT` for each pool, in preference order.
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<(String, u32)>,
}

fn parse_pool(value: &str) -> Result<(String, u32), String> {
    let (name, weight) = value.split_once('=').ok_or("expected NAME=WEIGHT")?;
    let weight = weight
        .parse()
        .map_err(|_| format!("weight {weight:?} is not a non-negative integer"))?;
    Ok((name.to_string(), weight))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "routing is not implemented yet: this build of deepseek-router only accepts its flags \
         ({} pools, policy {}); see README, \"Status\"",
        cli.pools.len(),
        cli.policy
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_as_name_and_weight() {
        assert_eq!(parse_pool("h100=3"), Ok(("h100".into(), 3)));
        assert!(parse_pool("h100").is_err());
        assert!(parse_pool("h100=-1").unwrap_err().contains("\"-1\""));
    }

    #[test]
    fn the_operators_arguments_are_accepted() {
        let args = [
            "deepseek-router",
            "--grpc-listen",
            "0.0.0.0:50051",
            "--policy",
            "prefix-affinity",
            "--pool",
            "h100=3",
            "--pool",
            "a100=1",
        ];
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(
            cli.pools,
            [("h100".to_string(), 3), ("a100".to_string(), 1)]
        );
    }
}
