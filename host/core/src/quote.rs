//! Naming a user's bad input inside an error message without letting the
//! input make the message unbounded or unreadable.

/// `raw` in double quotes with Rust's debug escapes, cut after whole
/// escapes once the quoted text would pass `max` characters (then `…`).
/// Escaping first and cutting second bounds the message: one exotic char
/// can escape to ten (`\u{11d3f}`), so cutting the input is not enough.
pub fn excerpt(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(max.min(raw.len()) + 4);
    out.push('"');
    let mut used = 0;
    for c in raw.chars() {
        let escaped = c.escape_debug();
        let len = escaped.len();
        if used + len > max {
            out.push('…');
            break;
        }
        used += len;
        out.extend(escaped);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::excerpt;
    use proptest::prelude::*;

    #[test]
    fn short_input_is_quoted_and_escaped_whole() {
        assert_eq!(excerpt("ab\"c\n", 40), r#""ab\"c\n""#);
    }

    #[test]
    fn long_input_is_cut_between_escapes() {
        assert_eq!(excerpt("\u{11d3f}\u{11d3f}", 12), "\"\\u{11d3f}…\"");
    }

    proptest! {
        #[test]
        fn an_excerpt_never_passes_its_bound(raw in "\\PC{0,300}|.{0,300}", max in 0usize..100) {
            prop_assert!(excerpt(&raw, max).chars().count() <= max + 3);
        }
    }
}
