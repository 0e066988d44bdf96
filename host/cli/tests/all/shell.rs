//! `sandbox connect` under a real terminal: tmux drives it with send-keys
//! and reads the screen with capture-pane.

use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::OPENSHELL;
use crate::process::process_gateway;

/// A detached tmux session on its own server socket, killed on drop.
struct Tmux {
    socket: String,
    session: &'static str,
}

impl Tmux {
    fn start(dir: &std::path::Path, cols: u32, rows: u32, command: &str) -> Tmux {
        let t = Tmux {
            socket: dir.join("tmux.sock").display().to_string(),
            session: "connect",
        };
        let ok = t
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                t.session,
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
                command,
            ])
            .status()
            .expect("tmux is installed (scripts/setup.sh installs it)");
        assert!(ok.success(), "tmux new-session failed");
        t
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-S", &self.socket]).args(args);
        c
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", self.session];
        args.extend_from_slice(keys);
        assert!(self.cmd(&args).status().unwrap().success());
    }

    fn screen(&self) -> String {
        let out = self
            .cmd(&["capture-pane", "-p", "-t", self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `needle` (after `skip` earlier matches).
    fn wait_for(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.screen();
            if s.matches(needle).count() >= count {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?} x{count}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]).status();
    }
}

#[test]
fn connect_gives_a_terminal_that_follows_resizes_passes_ctrl_c_and_returns_the_code() {
    let dir = TempDir::new().unwrap();
    let gw = process_gateway(dir.path());
    gw.ok(["sandbox", "create", "--name", "sh1"]);

    let command = format!(
        "OPENSHELL_GATEWAY_ENDPOINT={} {OPENSHELL} sandbox connect sh1; echo EXIT=$?; echo MODE=$(stty -a | grep -o -- '-*icanon' | head -1); sleep 60",
        gw.endpoint
    );
    let tmux = Tmux::start(dir.path(), 100, 30, &command);
    tmux.wait_for("@sh1", 1);

    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_for("30 100", 1);

    assert!(
        tmux.cmd(&["resize-window", "-t", tmux.session, "-x", "120", "-y", "40"])
            .status()
            .unwrap()
            .success()
    );
    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_for("40 120", 1);

    tmux.keys(&["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux.keys(&["C-c"]);
    tmux.keys(&["echo after-$((20+22))", "Enter"]);
    tmux.wait_for("after-42", 1);

    tmux.keys(&["exit 7", "Enter"]);
    tmux.wait_for("EXIT=7", 1);
    // Cooked mode again: the terminal was restored (raw mode is -icanon).
    let screen = tmux.wait_for("MODE=", 1);
    assert!(screen.contains("MODE=icanon"), "{screen}");
}
