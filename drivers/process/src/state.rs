//! What the process driver remembers between calls, stored by the host as
//! `outcome.state`.
//!
//! A tiny hand-written JSON object (`{"launches":3}`) rather than serde: the
//! state is one counter, and serde_json would triple the component's size.

/// The driver's memory of one sandbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LaunchState {
    /// How many times this driver has spawned the sandbox's supervisor.
    pub launches: u32,
}

const PREFIX: &str = "{\"launches\":";
const SUFFIX: &str = "}";

impl LaunchState {
    pub fn encode(self) -> Vec<u8> {
        format!("{PREFIX}{}{SUFFIX}", self.launches).into_bytes()
    }

    /// Reads back what [`encode`](Self::encode) wrote. Empty state (a new
    /// sandbox) is the default; anything unreadable is `None`.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self::default());
        }
        let launches = std::str::from_utf8(bytes)
            .ok()?
            .trim()
            .strip_prefix(PREFIX)?
            .strip_suffix(SUFFIX)?
            .trim()
            .parse()
            .ok()?;
        Some(Self { launches })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_state_is_a_new_sandbox() {
        assert_eq!(LaunchState::decode(b""), Some(LaunchState::default()));
    }

    #[test]
    fn encoded_state_decodes_to_itself() {
        let state = LaunchState { launches: 42 };
        assert_eq!(state.encode(), b"{\"launches\":42}");
        assert_eq!(LaunchState::decode(&state.encode()), Some(state));
    }

    #[test]
    fn garbage_is_unreadable() {
        for garbage in [
            &b"echo-v1"[..],
            b"{\"launches\":-1}",
            b"{\"launches\":}",
            b"\xff",
        ] {
            assert_eq!(LaunchState::decode(garbage), None, "{garbage:?}");
        }
    }
}
