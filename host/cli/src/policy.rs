//! `openshell policy ...` and the policy file a create sends.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use openshell_proto::v1 as pb;
use serde_json::json;

use crate::args::{Output, PolicyCmd};
use crate::client::{connect, status_error};

/// A policy file's text; its checking is the gateway's (and `check`'s).
pub fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read policy {}", path.display()))
}

fn show(out: Output, p: &pb::SandboxPolicy) {
    if out == Output::Json {
        let v = json!({
            "revision": p.revision,
            "source": p.source,
            "rules": p.rules,
            "yaml": p.yaml,
        });
        println!("{v}");
        return;
    }
    eprintln!(
        "revision {} ({}); rules: {}",
        p.revision,
        p.source,
        if p.rules.is_empty() {
            "none: nothing is reachable".to_owned()
        } else {
            p.rules.join(", ")
        }
    );
    print!("{}", p.yaml);
}

pub async fn run(
    endpoint: &crate::client::Target,
    out: Output,
    cmd: PolicyCmd,
) -> anyhow::Result<ExitCode> {
    if let PolicyCmd::Check { file } = &cmd {
        let text = read(file)?;
        return match openshell_policy::Policy::parse(&text) {
            Ok(p) => {
                let rules: Vec<&str> = p.rule_keys().collect();
                if out == Output::Json {
                    println!("{}", json!({ "valid": true, "rules": rules }));
                } else {
                    eprintln!(
                        "{}: valid; {} rule(s): {}",
                        file.display(),
                        rules.len(),
                        rules.join(", ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                if out == Output::Json {
                    println!("{}", json!({ "valid": false, "error": e.to_string() }));
                } else {
                    eprintln!("{}: {e}", file.display());
                }
                Ok(ExitCode::from(1))
            }
        };
    }
    let mut c = connect(endpoint).await?;
    match cmd {
        PolicyCmd::Set {
            name,
            file,
            expected_revision,
        } => {
            let r = c
                .set_sandbox_policy(pb::SetSandboxPolicyRequest {
                    name,
                    yaml: read(&file)?,
                    expected_revision: expected_revision.unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(p) = r.policy {
                if out == Output::Json {
                    show(out, &p);
                } else {
                    eprintln!(
                        "revision {} in force; rules: {}",
                        p.revision,
                        p.rules.join(", ")
                    );
                }
            }
        }
        PolicyCmd::Get { name } => {
            let r = c
                .get_sandbox_policy(pb::GetSandboxPolicyRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(p) = r.policy {
                show(out, &p);
            }
        }
        PolicyCmd::Check { .. } => unreachable!("answered above without a gateway"),
    }
    Ok(ExitCode::SUCCESS)
}
