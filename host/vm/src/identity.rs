//! A VM's identity channel (issue 14, item 4): how a guest learns who it is
//! without the host writing a secret into any file.
//!
//! QEMU serves a virtio-serial port named [`PORT_NAME`] on a unix socket in
//! the sandbox's `net/` dir; the gateway connects to it as soon as QEMU is
//! up and writes [`message`]: the environment (which carries the sandbox id,
//! launch secret and endpoint), the wall clock and a random seed, one
//! `KEY=VALUE` per line, then [`END`]. The guest's init (root, before any
//! sandbox code exists) reads the port, and nothing else in the guest can:
//! the device is root's and is read once. The host keeps the connection
//! open for the VM's life, so a restored VM (warm start) can be told a new
//! identity on the same channel.

use crate::VmError;
use crate::initramfs::env_file;

/// The virtio-serial port's name, as the guest sees it in
/// `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = "org.openshell.identity";

/// The line that ends a message.
pub const END: &str = "OPENSHELL_IDENTITY_END";

/// What the host sends: `env` in the environment file format, then the
/// clock (`OPENSHELL_CLOCK`, Unix seconds) and the seed (`OPENSHELL_SEED`,
/// hex), then [`END`].
pub fn message(
    env: &[(String, String)],
    now_unix: u64,
    seed: &[u8; 32],
) -> Result<Vec<u8>, VmError> {
    if let Some((k, _)) = env
        .iter()
        .find(|(k, _)| k == "OPENSHELL_CLOCK" || k == "OPENSHELL_SEED")
    {
        return Err(VmError::Invalid(format!(
            "{k} is set by the host, not the environment"
        )));
    }
    let mut out = env_file(env)?;
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    out.extend_from_slice(
        format!("OPENSHELL_CLOCK={now_unix}\nOPENSHELL_SEED={hex}\n{END}\n").as_bytes(),
    );
    Ok(out)
}

/// A PEM block as one environment line: its newlines as `\n` (PEM holds
/// no backslash), which the supervisor turns back.
pub fn pem_line(pem: &str) -> String {
    pem.trim_end().replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    #[test]
    fn a_message_is_the_environment_then_clock_seed_and_the_end_line() {
        let m = message(
            &env(&[("OPENSHELL_SANDBOX_SECRET", "s3"), ("A", "x=y")]),
            1700,
            &[0xab; 32],
        )
        .unwrap();
        let text = String::from_utf8(m).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "OPENSHELL_SANDBOX_SECRET=s3",
                "A=x=y",
                "OPENSHELL_CLOCK=1700"
            ]
        );
        assert_eq!(lines[3], format!("OPENSHELL_SEED={}", "ab".repeat(32)));
        assert_eq!(lines[4], END);
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn the_environment_cannot_forge_the_end_line_or_the_hosts_values() {
        // A value cannot hold a newline, so END can only be the host's.
        assert!(message(&env(&[("A", "x\nOPENSHELL_IDENTITY_END")]), 1, &[0; 32]).is_err());
        assert!(message(&env(&[("OPENSHELL_CLOCK", "1")]), 1, &[0; 32]).is_err());
        assert!(message(&env(&[("OPENSHELL_SEED", "00")]), 1, &[0; 32]).is_err());
    }
}
