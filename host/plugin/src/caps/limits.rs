//! The host's bounds on what a plugin may hand a capability, shared by the
//! interfaces that take the same kinds of input. Each refusal is
//! `invalid` and names the limit. Interface-specific caps (file and rootfs
//! sizes, VM shape) sit next to their interface.

use crate::bindings::types::CapError;

/// Longest path (a file, a workdir, a rootfs entry) in bytes.
pub const MAX_PATH: usize = 1024;
/// Most environment variables one process or VM gets.
pub const MAX_ENV_VARS: usize = 256;
/// Longest environment key, in bytes.
pub const MAX_ENV_KEY: usize = 256;
/// Longest environment value, in bytes.
pub const MAX_ENV_VALUE: usize = 32 << 10;
/// All keys and values together, in bytes.
pub const MAX_ENV_TOTAL: usize = 256 << 10;

/// Refuses a path longer than [`MAX_PATH`]; `what` names it.
pub fn check_path_len(what: &str, path: &str) -> Result<(), CapError> {
    if path.len() > MAX_PATH {
        return Err(CapError::Invalid(format!(
            "the {what} is {} bytes; the limit is {MAX_PATH}",
            path.len()
        )));
    }
    Ok(())
}

/// Refuses an environment over any of the environment limits. Says
/// nothing about the keys' grammar: each interface checks that.
pub fn check_environment(env: &[(String, String)]) -> Result<(), CapError> {
    if env.len() > MAX_ENV_VARS {
        return Err(CapError::Invalid(format!(
            "{} environment variables; the limit is {MAX_ENV_VARS}",
            env.len()
        )));
    }
    let mut total = 0;
    for (k, v) in env {
        if k.len() > MAX_ENV_KEY {
            return Err(CapError::Invalid(format!(
                "an environment key is {} bytes; the limit is {MAX_ENV_KEY}",
                k.len()
            )));
        }
        if v.len() > MAX_ENV_VALUE {
            return Err(CapError::Invalid(format!(
                "the value of {k} is {} bytes; the limit is {MAX_ENV_VALUE}",
                v.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ENV_TOTAL {
        return Err(CapError::Invalid(format!(
            "the environment is {total} bytes; the limit is {MAX_ENV_TOTAL}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(n: usize, key: usize, value: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("{i:0>key$}"), "v".repeat(value)))
            .collect()
    }

    fn refusal(r: Result<(), CapError>) -> String {
        match r {
            Err(CapError::Invalid(m)) => m,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn an_environment_within_every_limit_is_accepted() {
        check_environment(&vars(MAX_ENV_VARS, 8, 100)).unwrap();
        check_environment(&[]).unwrap();
    }

    #[test]
    fn an_environment_over_a_limit_is_refused_naming_that_limit() {
        let m = refusal(check_environment(&vars(MAX_ENV_VARS + 1, 8, 1)));
        assert!(m.contains(&MAX_ENV_VARS.to_string()), "{m}");
        let m = refusal(check_environment(&vars(1, MAX_ENV_KEY + 1, 1)));
        assert!(m.contains(&MAX_ENV_KEY.to_string()), "{m}");
        let m = refusal(check_environment(&vars(1, 8, MAX_ENV_VALUE + 1)));
        assert!(m.contains(&MAX_ENV_VALUE.to_string()), "{m}");
        let m = refusal(check_environment(&vars(16, 8, MAX_ENV_VALUE)));
        assert!(m.contains(&MAX_ENV_TOTAL.to_string()), "{m}");
    }

    #[test]
    fn a_path_over_the_limit_is_refused_naming_it() {
        check_path_len("path", &"a".repeat(MAX_PATH)).unwrap();
        let m = refusal(check_path_len("workdir", &"a".repeat(MAX_PATH + 1)));
        assert!(
            m.contains("workdir") && m.contains(&MAX_PATH.to_string()),
            "{m}"
        );
    }
}
