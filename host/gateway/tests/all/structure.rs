//! The gateway crate's structure, checked: dependencies between its
//! top-level modules form no cycle, and only the error module (and the token
//! interceptor in `server.rs`) builds a `tonic::Status`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`supervisor/relay.rs` →
/// `supervisor`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Code without `#[cfg(test)]` modules (tests may build anything).
fn non_test(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap()
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_gateways_modules_depend_on_each_other_without_a_cycle() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        let entry = deps.entry(m.clone()).or_default();
        for (i, _) in non_test(&text).match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != m {
                entry.insert(name);
            }
        }
    }
    assert!(deps.len() >= 8, "found only {:?}", deps.keys());
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("module cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_owned());
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, path, done);
        }
        path.pop();
        done.insert(m.to_owned());
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        visit(m, &deps, &mut Vec::new(), &mut done);
    }
}

#[test]
fn only_the_error_module_builds_a_grpc_status() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut offenders = Vec::new();
    for f in &files {
        let m = module_of(&src, f);
        if m == "error" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in non_test(&text).lines().enumerate() {
            let builds = line.contains("Status::new(")
                || [
                    "::internal(",
                    "::unavailable(",
                    "::invalid_argument(",
                    "::not_found(",
                    "::deadline_exceeded(",
                    "::resource_exhausted(",
                    "::failed_precondition(",
                    "::already_exists(",
                    "::aborted(",
                ]
                .iter()
                .any(|c| line.contains(&format!("Status{c}")));
            // The token interceptor answers before any handler runs.
            let interceptor = m == "server" && line.contains("Status::unauthenticated(");
            if (builds || line.contains("Status::unauthenticated(")) && !interceptor {
                offenders.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}
