//! OpenSSH's own `ssh` and `scp` against a sandbox, through the config
//! `openshell sandbox ssh-config` prints (issue 5: SSH for tools that speak
//! it). The config goes to a file rather than `<(...)`, as a test has no
//! shell to make one.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::harness::{Gateway, Run, run};
use crate::process::process_gateway;

/// A Ready sandbox and the ssh config file for it.
struct Sandbox {
    gw: Gateway,
    dir: TempDir,
    config: PathBuf,
}

impl Sandbox {
    fn create(name: &str) -> Sandbox {
        let dir = TempDir::new().unwrap();
        let gw = process_gateway(dir.path());
        gw.ok(["sandbox", "create", "--name", name]);
        let mut cmd = gw.cli(["sandbox", "ssh-config", name]);
        cmd.env("XDG_CACHE_HOME", dir.path().join("cache"));
        let printed = run(cmd);
        assert!(printed.success, "{printed}");
        let config = dir.path().join("ssh_config");
        std::fs::write(&config, &printed.stdout).unwrap();
        Sandbox { gw, dir, config }
    }

    fn known_hosts(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("cache/openshell/known_hosts")
            .join(name)
    }

    /// `PROGRAM -F CONFIG ARGS...` with the environment the CLI gets, so the
    /// ProxyCommand reaches this gateway and nothing of the developer's.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        let template = self.gw.cli(["ssh-proxy"]);
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        // BatchMode: never prompt, fail instead.
        cmd.arg("-F")
            .arg(&self.config)
            .args(["-o", "BatchMode=yes"])
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd
    }

    fn ssh(&self, args: &[&str]) -> Run {
        run(self.command("ssh", args))
    }

    fn scp(&self, from: &str, to: &str) -> Run {
        let r = run(self.command("scp", &["-q", from, to]));
        assert!(
            r.success,
            "scp {from} {to}: {r}\ngateway log:\n{}",
            self.gw.log()
        );
        r
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn ssh_runs_commands_in_the_sandbox_and_passes_their_exit_codes_through() {
    let sb = Sandbox::create("ssh1");
    let config = std::fs::read_to_string(&sb.config).unwrap();
    assert!(config.contains("Host ssh1\n"), "{config}");
    assert!(config.contains("ssh-proxy ssh1"), "{config}");
    let pinned = std::fs::read_to_string(sb.known_hosts("ssh1")).unwrap();
    assert!(
        pinned.starts_with("openshell-ssh1 ssh-ed25519 "),
        "{pinned}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sb.known_hosts("ssh1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the pinned key is private");

    let uname = sb.ssh(&["ssh1", "uname", "-a"]);
    assert!(uname.success, "{uname}\ngateway log:\n{}", sb.gw.log());
    assert!(uname.stdout.starts_with("Linux ssh1 "), "{uname}");
    let host = sb.ssh(&["ssh1", "hostname; pwd; echo err >&2"]);
    assert_eq!(host.stdout, "ssh1\n/sandbox\n", "{host}");
    assert_eq!(host.stderr, "err\n", "stderr arrives as stderr: {host}");

    let five = sb.ssh(&["ssh1", "exit 5"]);
    assert_eq!(five.code, Some(5), "{five}");
}

#[test]
fn scp_round_trips_a_10_mib_file_intact() {
    let sb = Sandbox::create("scp1");
    let sent = sb.dir.path().join("sent");
    let data: Vec<u8> = {
        // Incompressible, so nothing on the way can shortcut it.
        let mut f = std::fs::File::open("/dev/urandom").unwrap();
        let mut buf = vec![0u8; 10 << 20];
        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
        buf
    };
    std::fs::write(&sent, &data).unwrap();
    let back = sb.dir.path().join("back");

    sb.scp(sent.to_str().unwrap(), "scp1:/sandbox/copy");
    let inside = sb.ssh(&["scp1", "sha256sum /sandbox/copy"]);
    assert!(inside.success, "{inside}");
    assert!(inside.stdout.starts_with(&sha256(&sent)), "{inside}");
    sb.scp("scp1:/sandbox/copy", back.to_str().unwrap());
    assert_eq!(sha256(&back), sha256(&sent));
}

#[test]
fn ssh_refuses_a_sandbox_whose_key_differs_from_the_pinned_one() {
    let sb = Sandbox::create("pin1");
    assert!(sb.ssh(&["pin1", "true"]).success);
    // Another ed25519 key, as an impostor would present.
    let other = another_public_key(&sb);
    std::fs::write(sb.known_hosts("pin1"), format!("openshell-pin1 {other}\n")).unwrap();
    let refused = sb.ssh(&["pin1", "echo reached"]);
    assert_eq!(refused.code, Some(255), "{refused}");
    assert!(!refused.stdout.contains("reached"), "{refused}");
    assert!(
        refused.stderr.contains("Host key verification failed"),
        "{refused}"
    );
}

/// A public key that is not the sandbox's: a fresh one from ssh-keygen.
fn another_public_key(sb: &Sandbox) -> String {
    let key = sb.dir.path().join("other");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut fields = public.split(' ');
    format!("{} {}", fields.next().unwrap(), fields.next().unwrap())
}
