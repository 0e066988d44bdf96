//! Running the real launcher on throwaway sandboxes.
//!
//! Each [`Sandbox`] has its own temporary directory (state, work and run
//! dirs inside), a unique sandbox id and a unique uid range, so tests can
//! run in parallel and can look for "their" processes by host uid. Every
//! wait has a deadline, and a running launcher is SIGKILLed on drop, so a
//! failing test neither hangs nor leaves a sandbox behind.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// The binary under test.
pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_openshell-sandbox-launch");

/// How long any one launch may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The environment given to every sandbox unless a test changes it.
pub const PATH: &str = "/usr/bin:/bin";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One sandbox's directories and config.
pub struct Sandbox {
    pub dir: TempDir,
    pub id: String,
    pub uid_base: u32,
    config: Value,
}

impl Sandbox {
    /// A sandbox running `/bin/sh -c <script>`, with no limits and an
    /// isolated network.
    pub fn new(script: &str) -> Sandbox {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(
            n < 100,
            "raise the per-process sandbox count in the harness"
        );
        let pid = std::process::id();
        // 65536-id slots from slot 1000 up (far above any real host user),
        // distinct per test process and per sandbox in it.
        let slot = 1000 + (pid % 500) * 100 + n;
        let dir = tempfile::Builder::new()
            .prefix("openshell-launch-test-")
            .tempdir()
            .unwrap();
        for (name, mode) in [("state", 0o700), ("work", 0o700), ("run", 0o755)] {
            let path = dir.path().join(name);
            fs::create_dir(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        let id = format!("test-{pid}-{n}");
        let config = json!({
            "sandbox_id": id,
            "hostname": format!("box-{n}"),
            "state_dir": dir.path().join("state"),
            "workdir": dir.path().join("work"),
            "run_dir": dir.path().join("run"),
            "program": "/bin/sh",
            "args": ["-c", script],
            "env": [["PATH", PATH]],
            "uid_base": slot * 65536,
            "isolate_network": true,
            "memory_mib": 0,
            "max_processes": 0,
            "cpu_millis": 0,
        });
        Sandbox {
            dir,
            id,
            uid_base: slot * 65536,
            config,
        }
    }

    pub fn set(&mut self, field: &str, value: Value) -> &mut Sandbox {
        self.config[field] = value;
        self
    }

    pub fn remove(&mut self, field: &str) -> &mut Sandbox {
        self.config.as_object_mut().unwrap().remove(field);
        self
    }

    pub fn hostname(&self) -> &str {
        self.config["hostname"].as_str().unwrap()
    }

    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Puts a file in the workdir, for the program to find under `/sandbox`.
    pub fn add_file(&self, name: &str, content: &str) {
        fs::write(self.workdir().join(name), content).unwrap();
    }

    /// `openshell-sandbox-launch --config <this sandbox's config>`.
    pub fn command(&self) -> Command {
        let path = self.dir.path().join("config.json");
        fs::write(&path, self.config.to_string()).unwrap();
        let mut cmd = Command::new(LAUNCHER);
        cmd.arg("--config").arg(path);
        cmd
    }

    /// Runs the launcher to the end.
    pub fn run(&self) -> Outcome {
        self.run_command(self.command())
    }

    pub fn run_command(&self, mut cmd: Command) -> Outcome {
        let started = self.start_command(cmd.stdin(Stdio::null()));
        started.wait()
    }

    /// Starts the launcher; the program's stdout arrives line by line.
    pub fn start(&self) -> Running {
        self.start_command(self.command().stdin(Stdio::null()))
    }

    pub fn start_command(&self, cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (stderr_tx, stderr) = mpsc::channel();
        let mut pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = stderr_tx.send(text);
        });
        Running {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Runs `cmd` (this sandbox's launcher, maybe wrapped) whose program
    /// must print `up` and then wait; returns the program's
    /// `/proc/<pid>/cgroup` as the host sees it (inside, the cgroup
    /// namespace shows `/`), then stops it and returns its outcome too.
    pub fn host_view_of_cgroup(&self, cmd: &mut Command) -> (String, Outcome) {
        let mut running = self.start_command(cmd.stdin(Stdio::null()));
        running.wait_for_line("up");
        let program = processes_with_uid(self.uid_base);
        let view = program
            .iter()
            .find_map(|pid| fs::read_to_string(format!("/proc/{pid}/cgroup")).ok())
            .unwrap_or_default();
        running.signal("TERM");
        (view, running.wait())
    }

    /// The cgroup directories this sandbox gets, one per controller.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| {
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join("openshell")
                    .join(&self.id)
            })
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Only non-empty after a launcher was SIGKILLed mid-run.
        for dir in self.cgroup_dirs() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A launcher that is still running; SIGKILLed on drop.
pub struct Running {
    pub child: Child,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Waits for the program to print `line` on stdout.
    pub fn wait_for_line(&mut self, line: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.seen.iter().any(|seen| seen == line) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(next) => self.seen.push(next),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "the program never printed {line:?}; stdout so far: {:?}, stderr: {}",
                        self.seen,
                        self.stderr.recv_timeout(DEADLINE).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// Sends `signal` (a name like `TERM`) to the launcher.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the launcher to exit.
    pub fn wait(mut self) -> Outcome {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the launcher did not exit within {DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(5));
        };
        let stderr = self.stderr.recv_timeout(DEADLINE).unwrap_or_default();
        // The reader thread may still be behind: read on to end-of-file
        // (every writer is gone with the sandbox), not just what has arrived.
        let mut stdout = std::mem::take(&mut self.seen);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_secs(1))) {
                Ok(line) => stdout.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the sandbox's stdout stayed open after the launcher exited: {stdout:?}")
                }
            }
        }
        Outcome {
            code: status.code(),
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a launch ended.
#[derive(Debug)]
pub struct Outcome {
    /// The launcher's exit code (`None` if a signal killed the launcher).
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Outcome {
    pub fn stdout_text(&self) -> String {
        self.stdout.join("\n")
    }
}

/// Pids of live host processes any of whose uids is `uid`.
///
/// Zombies are not counted: they hold no memory, files or namespaces. When
/// the launcher is SIGKILLed, the sandbox's init dies at once but is
/// orphaned, and stays a zombie until the host's PID 1 (or a subreaper)
/// gets round to reaping it, which takes seconds in some containers.
pub fn processes_with_uid(uid: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // The process may be gone by now.
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if status.lines().any(|line| line.starts_with("State:\tZ")) {
            continue;
        }
        let uids = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .unwrap_or_default();
        if uids.split_whitespace().any(|u| u == uid.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `condition` every 10 ms until it holds (true) or `limit` passes
/// (false). The limit is a hang guard, not a measurement: make it generous.
#[must_use = "assert on the outcome: a wait whose result is dropped cannot fail"]
pub fn within(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A filesystem mounted on a fresh temporary directory, unmounted on drop.
/// Tests mount real cgroup hierarchies this way (a second view of a v1
/// controller, or the unified hierarchy) and point `cgroup_root` at it.
pub struct Mount {
    dir: Option<TempDir>,
    layers: usize,
}

impl Mount {
    /// `mount -t <fs_type> -o <options> none <fresh dir>`.
    pub fn new(fs_type: &str, options: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("openshell-launch-mount-")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs_type]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        let out = cmd.arg("none").arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "cannot mount {fs_type} ({options}) at {:?}: {}",
            dir.path(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir: Some(dir),
            layers: 1,
        }
    }

    /// Mounts an empty tmpfs over it: mountinfo still lists the cgroup
    /// mount, but the path no longer reaches it.
    pub fn cover_with_tmpfs(&mut self) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "none"])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs over {:?}",
            self.path()
        );
        self.layers += 1;
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let dir = self.dir.take().unwrap();
        let unmounted = (0..self.layers).all(|_| {
            Command::new("umount")
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !unmounted {
            // Deleting the directory recursively would rmdir cgroups in the
            // mounted hierarchy: leak it instead.
            eprintln!("cannot unmount {:?}; leaving it", dir.path());
            std::mem::forget(dir);
        }
    }
}
