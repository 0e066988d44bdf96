//! `openshell`: the CLI, and `openshell gateway start`.
//!
//! [`args`] is the grammar; each command lives in its own module and talks to
//! the gateway over gRPC through [`client`]. Errors print what to fix and
//! exit non-zero.

mod args;
mod client;
mod config;
mod exec;
mod gateway;
mod image;
mod output;
mod plugin;
mod sandbox;
mod ssh;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, matches!(cli.command, Command::Gateway(_)));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // A read of our stdin may still be parked on a blocking thread (an
    // interactive terminal never sends EOF); don't wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = client::Target {
        endpoint: cli.gateway_endpoint.clone(),
        ca_file: cli.ca_file.clone(),
    };
    match cli.command {
        Command::Gateway(args::GatewayCmd::Start(a)) => gateway::start(a).await,
        Command::Status => {
            let mut c = client::connect(&target).await?;
            let h = c
                .health(openshell_proto::v1::HealthRequest {})
                .await
                .map_err(client::status_error)?
                .into_inner();
            let shown = cli
                .gateway_endpoint
                .clone()
                .unwrap_or_else(|| "the configured gateway".into());
            output::status(cli.output, &shown, &h);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox(cmd) => sandbox::run(&target, cli.output, cmd).await,
        Command::Plugin(cmd) => plugin::run(&target, cli.output, cmd).await,
        Command::Image(cmd) => image::run(&target, cli.output, cmd).await,
        Command::SshProxy { name } => ssh::proxy(&mut client::connect(&target).await?, name).await,
    }
}

fn init_logging(verbose: u8, gateway: bool) {
    let default = match (gateway, verbose) {
        (true, 0) => "info",
        (false, 0) => "warn",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OPENSHELL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
