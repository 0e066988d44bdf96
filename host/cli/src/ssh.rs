//! SSH for tools that speak it: `openshell sandbox ssh-config NAME` prints
//! an OpenSSH `Host` block and pins the sandbox's host key;
//! `openshell ssh-proxy NAME` is its ProxyCommand, carrying the SSH byte
//! stream over the gateway's SshTunnel RPC (so ssh never opens a socket to
//! the sandbox, and the gateway's own authentication is what lets it in).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use openshell_core::SandboxName;
use openshell_proto::v1 as pb;
use pb::ssh_tunnel_frame::Frame as T;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, Target, status_error};

const CHUNK: usize = 32 * 1024;
/// After ssh closes our stdin, how long the rest of the gateway's stream
/// may take to arrive.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Bridges stdin and stdout to an SshTunnel; returns when either side
/// closes.
pub async fn proxy(c: &mut Client, sandbox: String) -> anyhow::Result<ExitCode> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::SshTunnelFrame {
        frame: Some(T::Sandbox(sandbox)),
    })
    .await
    .map_err(|_| anyhow!("internal: tunnel channel closed"))?;
    let (stdin_done_tx, stdin_done) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _done = stdin_done_tx;
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf).await {
                // Dropping `tx` ends our half of the tunnel.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frame = pb::SshTunnelFrame {
                        frame: Some(T::Data(buf[..n].to_vec().into())),
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stream = c
        .ssh_tunnel(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let copy = async {
        while let Some(f) = stream.message().await.map_err(status_error)? {
            if let Some(T::Data(bytes)) = f.frame {
                // ssh went away: nothing left to deliver.
                if stdout.write_all(&bytes).await.is_err() || stdout.flush().await.is_err() {
                    break;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::pin!(copy);
    tokio::select! {
        r = &mut copy => r?,
        _ = stdin_done => {
            // ssh closed our stdin; the server side ends in turn.
            if let Ok(r) = tokio::time::timeout(CLOSE_GRACE, copy).await {
                r?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Fetches the host key, pins it in a known_hosts file of its own, and
/// prints the `Host` block.
pub async fn config(c: &mut Client, target: &Target, name: &str) -> anyhow::Result<ExitCode> {
    let name = SandboxName::parse(name)?;
    let key = c
        .get_ssh_host_key(pb::GetSshHostKeyRequest {
            name: name.as_str().into(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .host_key;
    let resolved = crate::client::resolve(target)?;
    let ca_file = match &target.ca_file {
        Some(f) => Some(std::path::absolute(f)?),
        None => None,
    };
    let block = Block {
        name: &name,
        program: &std::env::current_exe().context("cannot find this openshell binary")?,
        endpoint: &resolved.endpoint,
        ca_file: ca_file.as_deref(),
        known_hosts: &known_hosts_path(name.as_str())?,
    };
    let text = block.render()?;
    write_private(block.known_hosts, &known_hosts_line(name.as_str(), &key)?)?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Everything a `Host` block is made of.
struct Block<'a> {
    name: &'a SandboxName,
    program: &'a Path,
    endpoint: &'a str,
    ca_file: Option<&'a Path>,
    known_hosts: &'a Path,
}

impl Block<'_> {
    fn render(&self) -> anyhow::Result<String> {
        let name = self.name.as_str();
        let mut proxy = vec![
            shell_word(path_str(self.program)?),
            "--gateway-endpoint".into(),
            shell_word(self.endpoint),
        ];
        if let Some(ca) = self.ca_file {
            proxy.extend(["--ca-file".into(), shell_word(path_str(ca)?)]);
        }
        proxy.extend(["ssh-proxy".into(), name.into()]);
        // ssh expands %-tokens in both ProxyCommand and UserKnownHostsFile.
        let proxy = proxy.join(" ").replace('%', "%%");
        let known_hosts = path_str(self.known_hosts)?;
        if known_hosts.contains('"') {
            bail!(
                "the known_hosts path {known_hosts:?} contains a double quote, which ssh_config cannot carry; set XDG_CACHE_HOME elsewhere"
            );
        }
        let known_hosts = known_hosts.replace('%', "%%");
        Ok(format!(
            "# openshell sandbox {name}: re-run `openshell sandbox ssh-config {name}` after its supervisor restarts (it gets a new host key)
Host {name}
    User sandbox
    ProxyCommand {proxy}
    HostKeyAlias openshell-{name}
    StrictHostKeyChecking yes
    UserKnownHostsFile \"{known_hosts}\"
    ServerAliveInterval 15
    ServerAliveCountMax 3
    LogLevel ERROR
"
        ))
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    let s = p
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8; ssh_config cannot carry it", p.display()))?;
    if s.contains(['\n', '\r', '\0']) {
        bail!("{s:?} contains a line break; ssh_config cannot carry it");
    }
    Ok(s)
}

/// One word for `sh -c` (ssh runs ProxyCommand with the user's shell).
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:@=+,".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `$XDG_CACHE_HOME/openshell/known_hosts/NAME`, else under `~/.cache`.
fn known_hosts_path(name: &str) -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| {
            anyhow!("neither XDG_CACHE_HOME nor HOME is set: nowhere to pin the host key")
        })?;
    Ok(base.join("openshell/known_hosts").join(name))
}

/// The pinned line, `openshell-NAME ssh-ed25519 AAAA...`, from a key the
/// gateway reported: exactly two fields of base64-ish text, so a key can
/// never smuggle in another line or option.
fn known_hosts_line(name: &str, key: &str) -> anyhow::Result<String> {
    let fields: Vec<&str> = key.split(' ').collect();
    let clean = fields.len() == 2
        && fields.iter().all(|f| !f.is_empty())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-+/=@. ".contains(&b));
    if !clean {
        bail!("the gateway reported a malformed SSH host key for {name}: {key:?}");
    }
    Ok(format!("openshell-{name} {key}\n"))
}

/// Writes `text` to `path`, readable by this user only, replacing it whole.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    openshell_plugin::write_private(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(program: &str, endpoint: &str, known_hosts: &str) -> anyhow::Result<String> {
        Block {
            name: &SandboxName::parse("dev-1").unwrap(),
            program: Path::new(program),
            endpoint,
            ca_file: None,
            known_hosts: Path::new(known_hosts),
        }
        .render()
    }

    #[test]
    fn the_host_block_pins_the_key_and_proxies_through_this_binary() {
        let text = block("/usr/bin/openshell", "http://127.0.0.1:8080", "/h/kh/dev-1").unwrap();
        for line in [
            "Host dev-1\n",
            "    User sandbox\n",
            "    ProxyCommand /usr/bin/openshell --gateway-endpoint http://127.0.0.1:8080 ssh-proxy dev-1\n",
            "    HostKeyAlias openshell-dev-1\n",
            "    StrictHostKeyChecking yes\n",
            "    UserKnownHostsFile \"/h/kh/dev-1\"\n",
            "    ServerAliveInterval 15\n",
            "    ServerAliveCountMax 3\n",
            "    LogLevel ERROR\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }

    #[test]
    fn odd_paths_are_quoted_for_the_shell_and_percent_signs_escaped_for_ssh() {
        let text = block("/opt/my tools/open'shell", "http://h:1/%x", "/c 1/%u/dev-1").unwrap();
        assert!(
            text.contains(r"ProxyCommand '/opt/my tools/open'\''shell' --gateway-endpoint 'http://h:1/%%x' ssh-proxy dev-1"),
            "{text}"
        );
        assert!(
            text.contains("UserKnownHostsFile \"/c 1/%%u/dev-1\""),
            "{text}"
        );
        assert!(block("/bin/o", "http://h", "/a\"b/dev-1").is_err());
        assert!(block("/bin/o\nHost *", "http://h", "/k").is_err());
    }

    #[test]
    fn only_a_two_field_key_is_pinned() {
        assert_eq!(
            known_hosts_line("a", "ssh-ed25519 AAAAC3Nz").unwrap(),
            "openshell-a ssh-ed25519 AAAAC3Nz\n"
        );
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA extra",
            "ssh-ed25519 AAAA\n* ssh-ed25519 BBBB",
            "ssh-ed25519  AAAA",
        ] {
            assert!(known_hosts_line("a", bad).is_err(), "{bad:?}");
        }
    }
}
