//! `openshell sandbox forward` and `openshell forward list|stop`: a local
//! TCP listener whose every connection becomes one ForwardTcp stream to a
//! port on the sandbox's own loopback. `--background` re-runs this command
//! detached and records it (a JSON file per forward, next to the client
//! config) for `forward list` and `forward stop`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use openshell_proto::v1 as pb;
use pb::forward_tcp_frame::Frame as F;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::{Client, status_error};

/// At most this many connections wait for their relay at once (the
/// gateway bounds the relays a sandbox has waiting); more queue here.
const OPENING_AT_ONCE: usize = 8;
/// What the foreground command prints once it listens; the background
/// launcher waits for it.
const READY: &str = "Forwarding ";

/// `[LOCAL:]REMOTE`; LOCAL 0 picks a free port.
pub fn parse_spec(spec: &str) -> Result<(u16, u16), String> {
    let port = |s: &str, zero_ok: bool| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(0) if !zero_ok => Err(format!("{s:?} is not a port: give 1-65535")),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("{s:?} is not a port: give 1-65535")),
        }
    };
    match spec.split_once(':') {
        Some((l, r)) => Ok((port(l, true)?, port(r, false)?)),
        None => {
            let p = port(spec, false)?;
            Ok((p, p))
        }
    }
}

/// Serves the forward until Ctrl-C or SIGTERM.
pub async fn serve(
    c: Client,
    name: String,
    address: IpAddr,
    (local, remote): (u16, u16),
) -> anyhow::Result<ExitCode> {
    // The sandbox must exist and be Ready now; later connections that find
    // it gone are refused one by one.
    let sb = c
        .clone()
        .get_sandbox(pb::GetSandboxRequest { name: name.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .sandbox
        .unwrap_or_default();
    if sb.phase != pb::SandboxPhase::Ready as i32 {
        bail!(
            "sandbox {name} is {}, not Ready",
            crate::output::phase_name(sb.phase)
        );
    }
    let listener = TcpListener::bind(SocketAddr::new(address, local))
        .await
        .with_context(|| format!("cannot listen on {address}:{local}"))?;
    let bound = listener.local_addr()?;
    println!("{READY}{bound} -> {name}:{remote}");
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    let mut conns = tokio::task::JoinSet::new();
    // Streams made once: a signal that lands between two turns of the loop
    // is kept for the next.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            a = listener.accept() => {
                let (tcp, peer) = match a {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("warning: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (c, name, opening) = (c.clone(), name.clone(), opening.clone());
                conns.spawn(async move {
                    if let Err(e) = connection(c, &name, remote, tcp, opening).await {
                        eprintln!("{peer}: {e:#}");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    // Stop listening, then end every open connection: their streams reset
    // and the supervisor closes its side of each.
    drop(listener);
    conns.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn connection(
    mut c: Client,
    name: &str,
    port: u16,
    tcp: TcpStream,
    opening: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ForwardTcpFrame>(16);
    tx.send(pb::ForwardTcpFrame {
        frame: Some(F::Start(pb::ForwardTcpStart {
            sandbox: name.to_owned(),
            port: port.into(),
        })),
    })
    .await
    .map_err(|_| anyhow!("the stream closed"))?;
    let mut inbound = {
        let _permit = opening.acquire().await?;
        c.forward_tcp(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(status_error)?
            .into_inner()
    };
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let f = pb::ForwardTcpFrame {
                        frame: Some(F::Data(buf[..n].to_vec().into())),
                    };
                    if tx.send(f).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` half-closes towards the sandbox's port.
    };
    let down = async move {
        let r = loop {
            match inbound.message().await {
                Ok(Some(pb::ForwardTcpFrame {
                    frame: Some(F::Data(b)),
                })) => {
                    if wr.write_all(&b).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(s) => break Err(status_error(s)),
            }
        };
        let _ = wr.shutdown().await;
        r
    };
    let ((), r) = tokio::join!(up, down);
    r
}

/// One background forward, as recorded.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Record {
    pub pid: u32,
    pub sandbox: String,
    pub listen: String,
    pub remote: u16,
    pub log: PathBuf,
}

fn records_dir() -> anyhow::Result<PathBuf> {
    let cfg = crate::config::path()
        .ok_or_else(|| anyhow!("no place for forward records: set HOME or OPENSHELL_CONFIG"))?;
    Ok(cfg
        .parent()
        .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf())
        .join("forwards"))
}

/// Starts this forward detached, waits until it listens, records it.
pub fn background(args: &[String], sandbox: &str, remote: u16) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let dir = records_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join(format!(
        "{sandbox}-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let out = std::fs::File::create(&log)?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let child = std::process::Command::new(exe)
        .args(args.iter().skip(1).filter(|a| *a != "--background"))
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own group: a Ctrl-C meant for this shell does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the background forward")?;
    let pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut child = child;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(READY)) {
            let listen = line[READY.len()..]
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned();
            let rec = Record {
                pid,
                sandbox: sandbox.to_owned(),
                listen,
                remote,
                log: log.clone(),
            };
            std::fs::write(dir.join(format!("{pid}.json")), serde_json::to_vec(&rec)?)?;
            println!(
                "{line} (in the background, pid {pid}; `openshell forward stop {sandbox}` ends it)"
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(st) = child.try_wait()? {
            bail!("the forward exited ({st}): {}", text.trim());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("the forward did not start within 30 s: {}", text.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Recorded forwards whose process still runs; records of ended ones are
/// removed.
pub fn live() -> anyhow::Result<Vec<Record>> {
    let dir = records_dir()?;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<Record>(&std::fs::read(&path).unwrap_or_default())
        else {
            continue;
        };
        if is_our_forward(rec.pid) {
            out.push(rec);
        } else {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&rec.log);
        }
    }
    out.sort_by_key(|r| r.pid);
    Ok(out)
}

/// A pid is a forward of ours only while it runs this program's forward
/// command: a recycled pid is not signalled.
fn is_our_forward(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter().any(|a| *a == b"forward") && args.first().is_some_and(|a| a.ends_with(b"openshell"))
}

/// Ends recorded forwards: those of `sandbox` (all of them with `None`),
/// or only the one listening on `local`.
pub fn stop(sandbox: Option<&str>, local: Option<u16>) -> anyhow::Result<usize> {
    let dir = records_dir()?;
    let mut stopped = 0;
    for r in live()? {
        let port_matches = local.is_none_or(|p| r.listen.ends_with(&format!(":{p}")));
        if sandbox.is_none_or(|s| s == r.sandbox) && port_matches {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(r.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = std::fs::remove_file(dir.join(format!("{}.json", r.pid)));
            let _ = std::fs::remove_file(&r.log);
            stopped += 1;
        }
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_spec_is_one_port_or_local_colon_remote() {
        assert_eq!(parse_spec("8000"), Ok((8000, 8000)));
        assert_eq!(parse_spec("9000:80"), Ok((9000, 80)));
        assert_eq!(parse_spec("0:80"), Ok((0, 80)));
        for bad in ["0", "80:0", "x", "70000", "1:2:3", ""] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
