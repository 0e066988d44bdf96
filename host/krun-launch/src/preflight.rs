//! Checks of the host side before libkrun sees the config.
//!
//! libkrun connects to gvproxy's socket only when the guest driver
//! activates the network device, and opens the root directory and console
//! file only inside `krun_start_enter`: a wrong path would surface as a
//! guest without a network or a VM that dies with a bare errno. Checking
//! here turns each into one clear line before anything starts.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{Context, bail};
use openshell_vm::krun::KrunLaunch;

/// The guest kernel library libkrun loads by this name at run time.
pub const LIBKRUNFW: &str = "libkrunfw.so.5";

pub fn check(launch: &KrunLaunch) -> anyhow::Result<()> {
    let socket = &launch.net_socket;
    match std::fs::metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => bail!(
            "the gvproxy socket {} is not a unix socket",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the gvproxy socket {} does not exist: start the sandbox's network (gvproxy -listen-qemu) first; libkrun itself would only notice once the guest brought up its network",
            socket.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot stat the gvproxy socket {}", socket.display()));
        }
    }
    if !launch.root.is_dir() {
        bail!(
            "the guest root {} is not a directory",
            launch.root.display()
        );
    }
    let console_dir = launch.console.parent().unwrap_or(Path::new("/"));
    if !console_dir.is_dir() {
        bail!(
            "the console log's directory {} does not exist",
            console_dir.display()
        );
    }
    let krunfw = launch.libkrunfw_dir.join(LIBKRUNFW);
    if !krunfw.is_file() {
        bail!(
            "{} is missing: run `just vm-setup` (libkrun loads the guest kernel from it)",
            krunfw.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch whose every path exists, in `dir`; the listener keeps the
    /// socket alive.
    fn ready(dir: &Path) -> (KrunLaunch, std::os::unix::net::UnixListener) {
        let sock = dir.join("net.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::create_dir(dir.join("root")).unwrap();
        std::fs::create_dir(dir.join("fw")).unwrap();
        std::fs::write(dir.join("fw").join(LIBKRUNFW), b"").unwrap();
        let launch = KrunLaunch::new(
            1,
            256,
            dir.join("root"),
            sock,
            dir.join("console.log"),
            vec![],
            dir.join("fw"),
        )
        .unwrap();
        (launch, listener)
    }

    #[test]
    fn a_launch_whose_paths_exist_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (launch, _l) = ready(dir.path());
        check(&launch).unwrap();
    }

    #[test]
    fn a_missing_gvproxy_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut launch, _l) = ready(dir.path());
        launch.net_socket = dir.path().join("gone.sock");
        let e = format!("{:#}", check(&launch).unwrap_err());
        assert!(
            e.contains("gone.sock") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_gvproxy_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (mut launch, _l) = ready(dir.path());
        launch.net_socket = dir.path().join("fw").join(LIBKRUNFW);
        let e = format!("{:#}", check(&launch).unwrap_err());
        assert!(e.contains("not a unix socket"), "{e}");
    }

    #[test]
    fn a_missing_root_console_dir_or_libkrunfw_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (launch, _l) = ready(dir.path());
        let mut l = launch.clone();
        l.root = dir.path().join("noroot");
        assert!(format!("{:#}", check(&l).unwrap_err()).contains("noroot"));
        let mut l = launch.clone();
        l.console = dir.path().join("nodir/console.log");
        assert!(format!("{:#}", check(&l).unwrap_err()).contains("nodir"));
        let mut l = launch;
        l.libkrunfw_dir = dir.path().join("nofw");
        let e = format!("{:#}", check(&l).unwrap_err());
        assert!(e.contains("just vm-setup"), "{e}");
    }
}
