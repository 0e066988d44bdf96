//! `openshell sandbox ...`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use openshell_proto::v1 as pb;
use pb::watch_sandbox_event::Event as WatchEvent;

use crate::args::{Output, SandboxCmd, SandboxCreate};
use crate::client::{Client, connect, status_error};
use crate::output;

pub async fn run(
    endpoint: &crate::client::Target,
    out: Output,
    cmd: SandboxCmd,
) -> anyhow::Result<ExitCode> {
    let mut c = connect(endpoint).await?;
    match cmd {
        SandboxCmd::Create(a) => return create(&mut c, out, a).await,
        SandboxCmd::Get { name } => {
            let r = c
                .get_sandbox(pb::GetSandboxRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            output::sandbox(out, &r.sandbox.unwrap_or_default());
        }
        SandboxCmd::List {
            names,
            ids,
            limit,
            offset,
        } => {
            let r = c
                .list_sandboxes(pb::ListSandboxesRequest { limit, offset })
                .await
                .map_err(status_error)?
                .into_inner();
            if names || ids {
                for s in &r.sandboxes {
                    println!("{}", if names { &s.name } else { &s.id });
                }
            } else {
                output::sandboxes(out, &r.sandboxes, r.total);
            }
        }
        SandboxCmd::Delete { names, all } => {
            let names = if all { all_names(&mut c).await? } else { names };
            let mut failed = false;
            for name in names {
                match delete_and_wait(&mut c, &name).await {
                    Ok(()) => match out {
                        Output::Table => println!("Deleted sandbox: {name}"),
                        Output::Json => println!("{}", serde_json::json!({"deleted": name})),
                    },
                    Err(e) => {
                        eprintln!("error: {name}: {e:#}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        SandboxCmd::Exec {
            name,
            workdir,
            timeout,
            env,
            command,
        } => {
            let code = crate::exec::run(
                &mut c,
                crate::exec::ExecArgs {
                    sandbox: name,
                    argv: command,
                    workdir: workdir.unwrap_or_default(),
                    timeout_ms: timeout.saturating_mul(1000),
                    env: env.into_iter().collect(),
                    tty: None,
                    main: false,
                },
            )
            .await?;
            return Ok(exit_code(code));
        }
        SandboxCmd::Connect { name, shell: sh } => return shell(&mut c, name, sh).await,
        SandboxCmd::Logs {
            name,
            follow,
            since,
            tail,
            timestamps,
            network,
        } => {
            let since_ms = since.map_or(0, |d| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.saturating_sub(Duration::from_secs(d)).as_millis() as i64
            });
            let mut stream = c
                .sandbox_logs(pb::SandboxLogsRequest {
                    name,
                    follow,
                    since_ms,
                    tail: tail.unwrap_or(0),
                    network,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(r) = stream.message().await.map_err(status_error)? {
                output::log_record(out, &r, timestamps)?;
            }
        }
        SandboxCmd::Upload {
            name,
            src,
            dst,
            overwrite,
        } => {
            let r = crate::files::upload(&mut c, &name, &src, &dst.unwrap_or_default(), overwrite)
                .await?;
            match out {
                Output::Table => eprintln!(
                    "Uploaded {} to {name}: {}",
                    src.display(),
                    crate::files::said(r.entries, r.bytes)
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"entries": r.entries, "bytes": r.bytes})
                ),
            }
        }
        SandboxCmd::Download {
            name,
            src,
            dst,
            overwrite,
        } => {
            let dst = dst.unwrap_or_else(|| ".".into());
            let s = crate::files::download(&mut c, &name, &src, &dst, overwrite).await?;
            if dst != std::path::Path::new("-") {
                match out {
                    Output::Table => eprintln!(
                        "Downloaded {src} from {name}: {}",
                        crate::files::said(s.entries, s.bytes)
                    ),
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"entries": s.entries, "bytes": s.bytes})
                    ),
                }
            }
        }
        SandboxCmd::Forward {
            name,
            ports,
            address,
            background,
        } => {
            if background {
                let args: Vec<String> = std::env::args().collect();
                return crate::forward::background(&args, &name, ports.1);
            }
            return crate::forward::serve(c, name, address, ports).await;
        }
        SandboxCmd::SshConfig { name } => return crate::ssh::config(&mut c, endpoint, &name).await,
        SandboxCmd::Stop { names } => {
            for name in names {
                let started = std::time::Instant::now();
                let sb = c
                    .stop_sandbox(pb::StopSandboxRequest { name })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .sandbox
                    .unwrap_or_default();
                match out {
                    Output::Table => {
                        println!("Stopped sandbox: {} ({:.1?})", sb.name, started.elapsed())
                    }
                    Output::Json => println!("{}", output::sandbox_json(&sb)),
                }
            }
        }
        SandboxCmd::Start {
            name,
            no_wait,
            timeout,
        } => {
            let sb = c
                .start_sandbox(pb::StartSandboxRequest { name })
                .await
                .map_err(status_error)?
                .into_inner()
                .sandbox
                .unwrap_or_default();
            let sb = if no_wait {
                sb
            } else {
                wait_ready(&mut c, &sb.name, Duration::from_secs(timeout)).await?
            };
            output::sandbox(out, &sb);
        }
        SandboxCmd::Stats { name } => {
            let r = c
                .get_sandbox_stats(pb::GetSandboxStatsRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            output::stats(
                out,
                &r.sandbox.unwrap_or_default(),
                &r.stats.unwrap_or_default(),
            );
        }
        SandboxCmd::Watch {
            name,
            until_settled,
        } => {
            let mut stream = c
                .watch_sandbox(pb::WatchSandboxRequest {
                    name,
                    until_settled,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(status_error)? {
                match ev.event {
                    Some(WatchEvent::Sandbox(s)) => match out {
                        Output::Json => println!("{}", output::sandbox_json(&s)),
                        Output::Table => {
                            let ready = s.conditions.iter().find(|c| c.r#type == "Ready");
                            println!(
                                "{} {} rev={} reason={} {}",
                                s.name,
                                output::phase_name(s.phase),
                                s.revision,
                                ready.map_or("", |c| c.reason.as_str()),
                                ready.map_or("", |c| c.message.as_str()),
                            );
                        }
                    },
                    Some(WatchEvent::Deleted(d)) => {
                        match out {
                            Output::Json => {
                                println!("{}", serde_json::json!({"deleted": d.id, "name": d.name}))
                            }
                            Output::Table => println!("deleted {}", d.id),
                        }
                        break;
                    }
                    None => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An interactive shell: raw local terminal, remote pty, resizes followed,
/// the terminal restored whatever happens, the shell's code returned.
async fn shell(c: &mut Client, name: String, shell: Option<String>) -> anyhow::Result<ExitCode> {
    let argv = match shell {
        Some(s) => vec![s, "-l".to_owned()],
        // Prefer bash, as a login shell; every image has sh.
        None => [
            "sh",
            "-c",
            "command -v bash >/dev/null && exec bash -l; exec sh -l",
        ]
        .map(String::from)
        .to_vec(),
    };
    let mut env = std::collections::HashMap::new();
    env.insert(
        "TERM".to_owned(),
        std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    );
    let size = crate::terminal::size().unwrap_or((24, 80));
    let raw = crate::terminal::RawMode::enable()?;
    let result = crate::exec::run(
        c,
        crate::exec::ExecArgs {
            sandbox: name,
            argv,
            workdir: String::new(),
            timeout_ms: 0,
            env,
            tty: Some(size),
            main: false,
        },
    )
    .await;
    drop(raw);
    Ok(exit_code(result?))
}

/// A remote exit code as ours (codes outside 0..=255 become 255).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

async fn all_names(c: &mut Client) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    loop {
        let r = c
            .list_sandboxes(pb::ListSandboxesRequest {
                limit: 1000,
                offset: names.len() as u32,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if r.sandboxes.is_empty() {
            return Ok(names);
        }
        names.extend(r.sandboxes.into_iter().map(|s| s.name));
    }
}

async fn delete_and_wait(c: &mut Client, name: &str) -> anyhow::Result<()> {
    let sb = c
        .delete_sandbox(pb::DeleteSandboxRequest { name: name.into() })
        .await
        .map_err(status_error)?
        .into_inner()
        .sandbox
        .unwrap_or_default();
    let wait = async {
        let mut stream = match c
            .watch_sandbox(pb::WatchSandboxRequest {
                name: sb.id.clone(),
                until_settled: false,
            })
            .await
        {
            Ok(s) => s.into_inner(),
            // Already gone between the delete and the watch.
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(status_error(s)),
        };
        while let Some(ev) = stream.message().await.map_err(status_error)? {
            if let Some(WatchEvent::Deleted(_)) = ev.event {
                return Ok(());
            }
        }
        Err(anyhow!(
            "the gateway closed the watch before the sandbox was gone"
        ))
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .map_err(|_| anyhow!("still deleting after 120 s; check `openshell sandbox get {name}`"))?
}

async fn create(c: &mut Client, out: Output, a: SandboxCreate) -> anyhow::Result<ExitCode> {
    // Pulled first, with progress; the create then finds it stored.
    let policy = match &a.policy {
        Some(path) => crate::policy::read(path)?,
        None => String::new(),
    };
    if let Some(image) = &a.image {
        crate::image::pull(c, image).await?;
    }
    let r = c
        .create_sandbox(pb::CreateSandboxRequest {
            name: a.name.unwrap_or_default(),
            spec: Some(pb::SandboxSpec {
                driver: a.driver.unwrap_or_default(),
                environment: a.env.into_iter().collect(),
                resources: Some(pb::Resources {
                    vcpus: a.vcpus,
                    memory_mib: a.memory_mib,
                    max_processes: a.max_processes,
                }),
                image: a.image.clone().unwrap_or_default(),
                image_digest: String::new(),
                disk_gib: a.disk_gib.unwrap_or(0),
                ttl_seconds: a.ttl.unwrap_or(0),
                idle_timeout_seconds: a.idle_timeout.unwrap_or(0),
            }),
            request_id: a.request_id.unwrap_or_default(),
            policy,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let sb = r.sandbox.unwrap_or_default();
    eprintln!("Created sandbox: {}", sb.name);
    if a.no_wait {
        output::sandbox(out, &sb);
        return Ok(ExitCode::SUCCESS);
    }
    let ready = wait_ready(c, &sb.name, Duration::from_secs(a.timeout)).await?;
    if ready.isolation == "vm-tcg" {
        eprintln!(
            "notice: {} runs under software emulation (TCG): its own kernel, but no hardware isolation",
            ready.name
        );
    }
    for spec in &a.upload {
        let (src, dst) = crate::files::parse_upload(spec);
        let r = crate::files::upload(c, &ready.id, &src, &dst, false)
            .await
            .with_context(|| format!("--upload {spec}"))?;
        eprintln!(
            "Uploaded {} to {}: {}",
            src.display(),
            ready.name,
            crate::files::said(r.entries, r.bytes)
        );
    }
    if a.command.is_empty() {
        output::sandbox(out, &ready);
        return Ok(ExitCode::SUCCESS);
    }
    let result = crate::exec::run(
        c,
        crate::exec::ExecArgs {
            sandbox: ready.id.clone(),
            argv: a.command,
            workdir: String::new(),
            timeout_ms: 0,
            env: Default::default(),
            tty: None,
            main: true,
        },
    )
    .await;
    if a.rm
        && let Err(e) = delete_and_wait(c, &ready.name).await
    {
        eprintln!("warning: could not delete {}: {e:#}", ready.name);
    }
    Ok(exit_code(result?))
}

/// Waits on the watch stream for Ready; fails on Error, deletion or timeout.
async fn wait_ready(c: &mut Client, name: &str, timeout: Duration) -> anyhow::Result<pb::Sandbox> {
    let progress = std::io::stderr().is_terminal();
    let wait = async {
        let mut stream = c
            .watch_sandbox(pb::WatchSandboxRequest {
                name: name.into(),
                until_settled: true,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut last = None;
        while let Some(ev) = stream.message().await.map_err(status_error)? {
            match ev.event {
                Some(WatchEvent::Sandbox(s)) => {
                    if progress {
                        let why = s.conditions.first().map_or("", |c| c.message.as_str());
                        eprint!(
                            "\r\x1b[2K{}: {} {}",
                            s.name,
                            output::phase_name(s.phase),
                            why
                        );
                    }
                    last = Some(s);
                }
                Some(WatchEvent::Deleted(_)) => bail!("sandbox {name} was deleted while starting"),
                None => {}
            }
        }
        if progress {
            eprintln!();
        }
        let s = last.ok_or_else(|| anyhow!("the gateway sent no state for {name}"))?;
        match pb::SandboxPhase::try_from(s.phase) {
            Ok(pb::SandboxPhase::Ready) => Ok(s),
            _ => {
                let why = s
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.r#type, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                bail!("sandbox {name} is {}: {why}", output::phase_name(s.phase))
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        anyhow!("sandbox {name} was not Ready within {} s; `openshell sandbox get {name}` shows why (raise --timeout or OPENSHELL_PROVISION_TIMEOUT)", timeout.as_secs())
    })?
}
