//! Binary path globs: which executables a rule admits.
//!
//! `*` stays within one path component and `**` crosses them (globset with
//! `literal_separator`), so `/usr/bin/*` does not admit `/usr/bin/sub/tool`.

use globset::{Glob, GlobBuilder, GlobMatcher};

/// A compiled binary glob. Compared by its pattern: the matcher is derived.
#[derive(Debug, Clone)]
pub(crate) struct BinaryGlob {
    glob: Glob,
    matcher: GlobMatcher,
}

impl PartialEq for BinaryGlob {
    fn eq(&self, other: &Self) -> bool {
        self.glob == other.glob
    }
}

impl BinaryGlob {
    /// Compile a glob; the caller has checked that it is absolute.
    pub(crate) fn new(path: &str) -> Result<Self, globset::Error> {
        let glob = GlobBuilder::new(path).literal_separator(true).build()?;
        let matcher = glob.compile_matcher();
        Ok(Self { glob, matcher })
    }

    /// Whether an executable path matches. Paths come from `/proc/<pid>/exe`,
    /// already resolved; one with `.` or `..` components is not, and could
    /// walk a `**` glob out of its directory, so it never matches.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let resolved = path.starts_with('/') && !path.split('/').any(|c| c == "." || c == "..");
        resolved && self.matcher.is_match(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_paths_as_the_table_says() {
        let table = [
            ("/usr/bin/curl", "/usr/bin/curl", true),
            ("/usr/bin/curl", "/usr/bin/curl2", false),
            ("/usr/bin/curl", "/usr/local/bin/curl", false),
            ("/usr/bin/curl", "usr/bin/curl", false),
            ("/usr/bin/*", "/usr/bin/python3", true),
            ("/usr/bin/*", "/usr/bin/sub/tool", false),
            ("/usr/bin/python3*", "/usr/bin/python3.12", true),
            ("/usr/bin/python3*", "/usr/bin/python2", false),
            (
                "/sandbox/.vscode-server/**",
                "/sandbox/.vscode-server/bin/abc/node",
                true,
            ),
            ("/sandbox/.vscode-server/**", "/sandbox/other/node", false),
            ("/opt/**/bin/node", "/opt/a/b/bin/node", true),
            ("/opt/**/bin/node", "/opt/bin/node", true),
            ("/usr/bin/python?", "/usr/bin/python3", true),
            ("/usr/bin/python?", "/usr/bin/python", false),
            ("/usr/bin/python[23]", "/usr/bin/python3", true),
            ("/usr/bin/python[23]", "/usr/bin/python4", false),
            ("/usr/**", "/usr/bin/../../tmp/evil", false),
            ("/usr/**", "/usr/./bin/x", false),
        ];
        for (glob, path, expected) in table {
            assert_eq!(
                BinaryGlob::new(glob).unwrap().matches(path),
                expected,
                "{glob} vs {path}"
            );
        }
    }

    #[test]
    fn globs_compare_by_pattern() {
        assert_eq!(
            BinaryGlob::new("/a/*").unwrap(),
            BinaryGlob::new("/a/*").unwrap()
        );
        assert_ne!(
            BinaryGlob::new("/a/*").unwrap(),
            BinaryGlob::new("/a/**").unwrap()
        );
    }

    #[test]
    fn a_malformed_glob_is_an_error() {
        assert!(BinaryGlob::new("/usr/bin/[abc").is_err());
    }
}
