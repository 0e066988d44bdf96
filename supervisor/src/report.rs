//! How an error becomes text: a log line, or a bounded message on the wire.
//!
//! Errors here keep their cause as `#[source]` and say only their own
//! context in `Display`; [`chain`] joins the two, so nothing is said twice.

use std::error::Error;
use std::fmt::Write;

/// The most a message sent to the gateway may carry (`RelayOpenFailed`, an
/// exec's stderr line): a cause chain can quote peer input at any length.
pub const MAX_WIRE_MESSAGE: usize = 1024;

/// An error and its causes, `outer: inner: innermost`. A gRPC status as a
/// cause is shown as its message and code, not its metadata.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let _ = match cause.downcast_ref::<tonic::Status>() {
            Some(s) => write!(out, ": {} ({:?})", s.message(), s.code()),
            None => write!(out, ": {cause}"),
        };
        next = cause.source();
    }
    out
}

/// [`chain`], cut to [`MAX_WIRE_MESSAGE`] bytes on a character boundary.
pub fn wire(e: &(dyn Error + 'static)) -> String {
    bounded(chain(e))
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_WIRE_MESSAGE {
        let mut end = MAX_WIRE_MESSAGE - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("relay")]
    struct WithStatus(#[source] tonic::Status);

    #[test]
    fn a_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn a_status_cause_shows_its_message_and_code_only() {
        let mut s = tonic::Status::unavailable("gone");
        s.metadata_mut()
            .insert("x-private", "secret".parse().unwrap());
        let text = chain(&WithStatus(s));
        assert_eq!(text, "relay: gone (Unavailable)");
    }

    #[test]
    fn wire_messages_are_bounded_on_a_character_boundary() {
        let e = Outer(std::io::Error::other("é".repeat(MAX_WIRE_MESSAGE)));
        let m = wire(&e);
        assert!(m.len() <= MAX_WIRE_MESSAGE, "{}", m.len());
        assert!(m.starts_with("outer: é") && m.ends_with('…'));
        let short = Outer(std::io::Error::other("short"));
        assert_eq!(wire(&short), "outer: short");
    }
}
