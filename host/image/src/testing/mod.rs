//! For tests here and in other crates (feature `testing`): an image
//! builder ([`fixture`]) and a real registry on loopback ([`registry`]).
#![allow(clippy::unwrap_used, reason = "test support: a failure is the test's")]

pub mod fixture;
pub mod registry;

/// Whether a test can run; if not, why, loudly on the real stderr (and
/// under CI, where setup must have provided it, a failure).
pub fn can_run(need: &str, ok: bool) -> bool {
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("this test needs {need}, which CI must have (scripts/setup.sh)");
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!! SKIPPED: this test needs {need} !!!\n"
        );
    }
    ok
}
