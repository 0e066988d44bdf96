//! `openshell:compute/network`: a VM's network. `start` makes an empty
//! network namespace with one loopback listener, a forwarder task from it
//! to the sandbox's supervisor socket, and gvproxy inside the namespace
//! (`/run/openshell-vm/<id>/net.sock`, `<sandbox>/gvproxy.log`), both
//! gvproxy and QEMU running as the sandbox's own uid, not root. The VM table owns the result,
//! keyed by sandbox id; the confinement argument is in `openshell_vm::net`.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_vm::net;
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::network::{Host, HostVmNetwork};
use crate::bindings::types::CapError;
use crate::caps::vm::{SOCKET_ROOT, VmTable, blocking, cap_error, lock, log_file, socket_dir};
use crate::caps::{CallState, CapabilityError};
use crate::children::HostChild;

/// How long gvproxy gets to create its socket.
const NET_READY: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct NetworkHandle {
    pub(crate) sandbox_id: String,
}

/// A running VM network; dropping it kills gvproxy.
pub(crate) struct Net {
    pub(crate) port: u16,
    pub(crate) gvproxy: HostChild,
    forwarder: tokio::task::AbortHandle,
    _netns: Arc<OwnedFd>,
    /// `/run/openshell-vm/<id>`, removed with the network (also when the
    /// table goes at shutdown; only a SIGKILLed gateway leaves one behind).
    socket_dir: std::path::PathBuf,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.forwarder.abort();
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

fn check_socket_path(p: &Path) -> Result<(), CapError> {
    openshell_vm::check_socket_path(p).map_err(cap_error)?;
    openshell_vm::qemu::check_path(p).map_err(cap_error)
}

impl VmTable {
    /// The gateway's port inside the sandbox's network namespace.
    pub(crate) fn port(&self, sandbox_id: &str) -> Option<u16> {
        lock(&self.nets).get(sandbox_id).map(|n| n.port)
    }

    pub(crate) async fn start_network(
        &self,
        id: &str,
        dir: &Path,
        run_as: net::RunAs,
    ) -> Result<(), CapError> {
        self.stop_network(id);
        let rt = self.runtime().await?;
        let socket = Path::new(SOCKET_ROOT).join(id).join("net.sock");
        let target = dir.join("run/gateway.sock");
        check_socket_path(&socket)?;
        check_socket_path(&target)?;
        let log = dir.join("gvproxy.log");
        let sock = socket.clone();
        let (sandbox, uid) = (id.to_owned(), run_as.uid);
        let (confined, (out, err)) = blocking(move || {
            // gvproxy runs as the sandbox's uid: its socket goes in a
            // directory of that uid's, outside the root-only state dir.
            let dir = socket_dir(&sandbox, uid)?;
            // gvproxy is exec'd through a descriptor opened as root (see
            // below), by a link named after it so `ps` still says gvproxy.
            let link = dir.join("gvproxy");
            std::os::unix::fs::symlink(format!("/proc/self/fd/{}", net::EXEC_FD), &link)
                .map_err(|e| CapError::Failed(format!("cannot make {}: {e}", link.display())))?;
            let _ = std::fs::remove_file(&sock);
            let confined = net::confined_loopback().map_err(cap_error)?;
            Ok((confined, log_file(&log)?))
        })
        .await?;
        // Exec'd through a descriptor opened as root: gvproxy runs as the
        // sandbox's uid, which may not pass the directories above the
        // runtime (a clone in /root, say); /proc/self/fd/N checks only the
        // binary's own permissions.
        let binary = std::fs::File::open(&rt.gvproxy)
            .map_err(|e| CapError::Failed(format!("cannot open {}: {e}", rt.gvproxy.display())))?;
        let mut cmd = Command::new(Path::new(SOCKET_ROOT).join(id).join("gvproxy"));
        cmd.args(net::gvproxy_args(&socket))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        net::confine_child(&mut cmd, Some(confined.netns.clone()), Some(run_as));
        net::pass_fds(&mut cmd, Arc::new(vec![binary.into()]), net::EXEC_FD);
        // Owned from here on: abandoned at any await below, it is killed.
        let gvproxy = self
            .spawner
            .spawn(cmd)
            .await
            .map_err(|e| CapError::Failed(format!("cannot start gvproxy: {e}")))?;
        let started = Instant::now();
        while !tokio::fs::try_exists(&socket).await.unwrap_or(false) {
            if started.elapsed() > NET_READY || gvproxy.exited().is_some() {
                return Err(CapError::Failed(format!(
                    "gvproxy did not create {} (see gvproxy.log)",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let port = confined.port;
        let forwarder = tokio::spawn(net::forward(
            confined.listener,
            target,
            net::FORWARD_CONNECTIONS,
            self.config.supervisor_tls.clone(),
        ))
        .abort_handle();
        lock(&self.nets).insert(
            id.to_owned(),
            Net {
                port,
                gvproxy,
                forwarder,
                _netns: confined.netns,
                socket_dir: Path::new(SOCKET_ROOT).join(id),
            },
        );
        Ok(())
    }

    /// Stops the forwarder and kills gvproxy (by dropping them), and
    /// removes the VM's socket dir.
    pub(crate) fn stop_network(&self, id: &str) {
        drop(lock(&self.nets).remove(id));
    }

    /// At gateway shutdown: removes every VM's socket dir (gvproxy and QEMU
    /// die with the gateway; the table itself is never dropped).
    pub fn remove_socket_dirs(&self) {
        for net in lock(&self.nets).values() {
            let _ = std::fs::remove_dir_all(&net.socket_dir);
        }
    }
}

impl Host for CallState {
    async fn start(&mut self) -> Result<Resource<NetworkHandle>, CapabilityError> {
        let (id, dir, run_as) = self.vm_scope()?;
        let services = self.services.clone();
        services.vms.start_network(&id, &dir, run_as).await?;
        Ok(self.table.push(NetworkHandle { sandbox_id: id })?)
    }
}

impl HostVmNetwork for CallState {
    async fn guest_endpoint(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<String> {
        let id = &self.table.get(&h)?.sandbox_id;
        let scheme = if self.services.vms.config.supervisor_tls.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(match self.services.vms.port(id) {
            Some(port) => format!("{scheme}://{}:{port}", net::GUEST_HOST_ADDR),
            None => String::new(),
        })
    }

    async fn drop(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<()> {
        // The host owns the network; dropping the handle keeps it.
        self.table.delete(h)?;
        Ok(())
    }
}
