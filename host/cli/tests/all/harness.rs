//! Starting gateways and running the CLI as child processes.
//!
//! Every child gets a deadline, so a hang fails the test instead of stalling
//! the suite, and a guard that kills it on drop, so a failing test leaves no
//! process behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long any one CLI command or gateway start-up may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test.
pub const OPENSHELL: &str = env!("CARGO_BIN_EXE_openshell");

/// `openshell ARGS` with no inherited OpenShell configuration.
pub fn openshell<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(OPENSHELL);
    // OPENSHELL_* settings in the developer's shell would change what the
    // binary does behind the test's back.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("OPENSHELL_") {
            cmd.env_remove(var);
        }
    }
    // Never read (or write) the developer's own client config.
    cmd.env(
        "OPENSHELL_CONFIG",
        "/nonexistent/openshell-test/config.json",
    );
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless
/// it already exited.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits for the child to exit; `None` if it still runs at `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.0.try_wait().expect("wait for a child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM, as an operator or a service manager would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM {} failed", self.0.id());
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Lines of a child's stdout, read on a thread so that a silent child cannot
/// block the test. The thread keeps draining, so the child never writes into
/// a closed pipe.
pub struct Lines(Receiver<String>);

impl Lines {
    pub fn of(child: &mut Child) -> Lines {
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// The next line, or `None` at end of output; panics after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        match self.0.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no output within {timeout:?}"),
        }
    }
}

/// A gateway process: `openshell gateway start --port 0` on loopback.
pub struct Gateway {
    process: KillOnDrop,
    stdout: Lines,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The line it printed when ready.
    pub ready_line: String,
    log: PathBuf,
    /// The client config a secure gateway wrote (TLS and auth on).
    pub config: Option<PathBuf>,
    state: PathBuf,
}

/// Live [`Gateway`]s per state dir. A gateway mounts its sandbox disk at
/// `STATE/sandboxes` and detaches it when it exits cleanly; one a test
/// kills leaves it mounted for the next gateway on that dir (as in
/// production). The last `Gateway` of a state dir dropped detaches it, so
/// no test leaves a mount behind.
static LIVE: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.process.0.try_wait() {
            let _ = self.process.0.kill();
            let _ = self.process.0.wait();
        }
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let count = live.entry(self.state.clone()).or_default();
        *count = count.saturating_sub(1);
        if *count == 0 {
            live.remove(&self.state);
            if self.state.join("sandboxes.img").exists() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.state.join("sandboxes"))
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Gateway {
    /// A gateway with an in-memory database.
    pub fn in_memory(dir: &Path) -> Gateway {
        Gateway::start(dir, &["--db-url", "sqlite::memory:"])
    }

    /// A gateway whose database is the default SQLite file in `state/`
    /// under `dir`; a second gateway on the same `dir` sees the same state.
    pub fn on_file(dir: &Path) -> Gateway {
        Gateway::start(dir, &[])
    }

    /// Starts `openshell gateway start --port 0 --state-dir DIR/state
    /// --disable-tls --disable-gateway-auth EXTRA...` and waits until it says
    /// where it listens. Its log goes to `DIR/gateway-N.log`.
    pub fn start(dir: &Path, extra: &[&str]) -> Gateway {
        let mut args = vec!["--disable-tls", "--disable-gateway-auth"];
        args.extend_from_slice(extra);
        Gateway::launch(dir, &args, None, &[], None)
    }

    /// [`Gateway::start`] with extra environment for the gateway process
    /// (for example `OPENSHELL_VM_RUNTIME`).
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut args = vec!["--disable-tls", "--disable-gateway-auth"];
        args.extend_from_slice(extra);
        Gateway::launch(dir, &args, None, env, None)
    }

    /// A gateway with the secure defaults (TLS and a token), whose client
    /// config goes to `DIR/config.json`.
    pub fn secure(dir: &Path, extra: &[&str]) -> Gateway {
        Gateway::launch(dir, extra, Some(dir.join("config.json")), &[], None)
    }

    /// [`Gateway::secure`] started with an RLIMIT_NOFILE of `(soft, hard)`,
    /// as a service manager might start it (a soft limit of 1,024 is common).
    pub fn secure_with_nofile(dir: &Path, extra: &[&str], nofile: (u64, u64)) -> Gateway {
        Gateway::launch(dir, extra, Some(dir.join("config.json")), &[], Some(nofile))
    }

    fn launch(
        dir: &Path,
        extra: &[&str],
        config: Option<PathBuf>,
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Gateway {
        let log = (0..)
            .map(|n| dir.join(format!("gateway-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free log file name");
        let state = dir.join("state");
        let mut cmd = openshell(["gateway", "start", "--port", "0", "--state-dir"]);
        if let Some(c) = &config {
            cmd.env("OPENSHELL_CONFIG", c);
        }
        cmd.envs(env.iter().copied());
        cmd.arg(&state).args(extra);
        if let Some((soft, hard)) = nofile {
            cmd = with_nofile(cmd, soft, hard);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("create the gateway log"))
            .spawn()
            .expect("spawn the gateway");
        let stdout = Lines::of(&mut child);
        let process = KillOnDrop(child);
        let ready_line = match stdout.0.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(_) => panic!(
                "the gateway never said it was listening; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        let addr = ready_line
            .strip_prefix("Server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the gateway: {ready_line:?}"));
        assert!(
            addr.starts_with("127.0.0.1:") || extra.contains(&"--bind"),
            "the gateway should listen on loopback by default: {ready_line:?}"
        );
        let scheme = if config.is_some() { "https" } else { "http" };
        *LIVE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(state.clone())
            .or_default() += 1;
        Gateway {
            state,
            process,
            stdout,
            endpoint: format!("{scheme}://{addr}"),
            ready_line,
            log,
            config,
        }
    }

    /// The next line the gateway prints on stdout after the ready line.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.stdout.next(timeout)
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// `openshell ARGS` pointed at this gateway (through the environment,
    /// as a user would set it up).
    pub fn cli<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = openshell(args);
        match &self.config {
            // As a user on the gateway's machine: no flags, the saved config.
            Some(c) => cmd.env("OPENSHELL_CONFIG", c),
            None => cmd.env("OPENSHELL_GATEWAY_ENDPOINT", &self.endpoint),
        };
        cmd
    }

    /// Runs `openshell ARGS` against this gateway and insists it succeeds.
    pub fn ok<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let run = run(self.cli(args));
        assert!(run.success, "{run}\ngateway log:\n{}", self.log());
        run
    }

    /// Runs `openshell ARGS` against this gateway and insists it fails.
    pub fn fails<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let run = run(self.cli(args));
        assert!(!run.success, "expected a failure: {run}");
        run
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit. Returns the exit status and
    /// whatever else the gateway printed on stdout after the ready line.
    pub fn terminate(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        self.process.terminate();
        let Some(status) = self.process.wait_until(Instant::now() + within) else {
            panic!(
                "the gateway still ran {within:?} after SIGTERM; its log:\n{}",
                self.log()
            );
        };
        let mut rest = Vec::new();
        while let Some(line) = self.stdout.next(Duration::from_secs(5)) {
            rest.push(line);
        }
        // A clean exit detaches the sandbox disk itself.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let sandboxes = self.state.join("sandboxes");
        assert!(
            !mounts.contains(&format!(" {} ", sandboxes.display())),
            "{} is still mounted after a clean exit",
            sandboxes.display()
        );
        (status, rest)
    }
}

/// `cmd` run by `sh` after `ulimit -n`, with the same arguments and
/// environment changes.
fn with_nofile(cmd: Command, soft: u64, hard: u64) -> Command {
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c")
        .arg(format!(
            "ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\" \"$@\""
        ))
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh
}

/// What a finished command did.
pub struct Run {
    pub command: String,
    pub success: bool,
    /// The exit code, if it exited normally.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` {}\n--- stdout\n{}--- stderr\n{}",
            self.command,
            if self.success { "succeeded" } else { "failed" },
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` to completion (killing it at the deadline) with its output in
/// temp files, so a chatty child cannot fill a pipe and stall.
pub fn run(mut cmd: Command) -> Run {
    let out = tempfile::tempfile().expect("temp file");
    let err = tempfile::tempfile().expect("temp file");
    let command = format!(
        "openshell {}",
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = KillOnDrop(
        cmd.stdout(out.try_clone().expect("dup"))
            .stderr(err.try_clone().expect("dup"))
            .spawn()
            .expect("spawn openshell"),
    );
    let Some(status) = child.wait_until(Instant::now() + DEADLINE) else {
        panic!("`{command}` still ran after {DEADLINE:?}");
    };
    Run {
        command,
        success: status.success(),
        code: status.code(),
        stdout: read_all(out),
        stderr: read_all(err),
    }
}

fn read_all(mut f: File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    f.rewind().expect("rewind");
    f.read_to_string(&mut s).expect("read output");
    s
}

/// A driver component built by `just drivers`: `$OPENSHELL_WASM_DIR`, else
/// `wasm32-wasip2/release` next to the profile dir of the binary under test.
/// Flags for a gateway with only the process driver (from the fixtures'
/// build) and an in-memory database: `--db-url sqlite::memory: --drivers
/// process --driver-dir <dir>`.
pub fn process_flags() -> Vec<String> {
    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    [
        "--db-url",
        "sqlite::memory:",
        "--drivers",
        "process",
        "--driver-dir",
        &driver_dir,
    ]
    .map(String::from)
    .to_vec()
}

/// `flags` as the `&[&str]` the gateway constructors take.
pub fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("OPENSHELL_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(OPENSHELL)
                .ancestors()
                .nth(2)
                .expect("the binary lives in TARGET/PROFILE/")
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the driver components first with `just drivers`",
        path.display()
    );
    path
}

/// Loads the echo fixture as `echo` with the grants it needs.
pub fn load_echo(gw: &Gateway) -> Run {
    let path = wasm("fixture_echo");
    let path = path.to_str().expect("a UTF-8 target dir");
    gw.ok([
        "plugin", "load", path, "--name", "echo", "--grant", "log", "--grant", "files",
    ])
}

/// The names `sandbox list --names` prints, in order.
pub fn sandbox_names(gw: &Gateway) -> Vec<String> {
    gw.ok(["sandbox", "list", "--names"])
        .stdout
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Says loudly, on the real stderr, that a test skipped and why. libtest
/// captures `eprintln!` of a passing test; a write to the stderr handle is
/// not captured, so the runner's output shows it.
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

/// Milliseconds since the epoch, as the gateway stamps its records.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
