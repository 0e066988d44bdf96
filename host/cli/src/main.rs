//! `openshell`: the CLI, and `openshell gateway start`.
//!
//! [`args`] is the grammar; each command lives in its own module and talks to
//! the gateway over gRPC through [`client`]. Errors print what to fix and
//! exit non-zero.

mod args;
mod bundled;
mod client;
mod config;
mod doctor;
mod exec;
mod files;
mod forward;
mod gateway;
mod image;
mod output;
mod plugin;
mod policy;
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
        Command::Policy(cmd) => policy::run(&target, cli.output, cmd).await,
        Command::Forward(cmd) => forward_cmd(cli.output, cmd),
        Command::SshProxy { name } => ssh::proxy(&mut client::connect(&target).await?, name).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Into a buffer first: clap_complete panics on a write error,
            // and `| head` closing the pipe is not one worth a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "openshell", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Doctor(a) => Ok(doctor::run(a)),
    }
}

fn forward_cmd(out: args::Output, cmd: args::ForwardCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        args::ForwardCmd::List => output::forwards(out, &forward::live()?),
        args::ForwardCmd::Stop { target, all } => {
            let (sandbox, local) = match target.as_deref().map(|t| t.rsplit_once(':')) {
                Some(Some((s, p))) => {
                    let p = p
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{p:?} is not a local port"))?;
                    (Some(s.to_owned()), Some(p))
                }
                Some(None) => (target.clone(), None),
                None => (None, None),
            };
            let _ = all;
            let n = forward::stop(sandbox.as_deref(), local)?;
            if n == 0 {
                anyhow::bail!("no background forward matches; `openshell forward list` shows them");
            }
            eprintln!("Stopped {n} forward(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
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
