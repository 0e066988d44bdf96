//! `openshell plugin ...`.

use std::process::ExitCode;

use anyhow::Context;
use openshell_proto::v1 as pb;

use crate::args::{Output, PluginCmd};
use crate::client::{connect, status_error};
use crate::output;

pub async fn run(
    endpoint: &crate::client::Target,
    out: Output,
    cmd: PluginCmd,
) -> anyhow::Result<ExitCode> {
    let mut c = connect(endpoint).await?;
    match cmd {
        PluginCmd::Load { path, name, grants } => {
            let component =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let name = match name {
                Some(n) => n,
                None => path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(|s| s.replace('_', "-"))
                    .context("cannot derive a plugin name from the path; pass --name")?,
            };
            let r = c
                .load_plugin(pb::LoadPluginRequest {
                    name,
                    component: component.into(),
                    grants,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let p = r.plugin.unwrap_or_default();
            output::plugins(out, std::slice::from_ref(&p));
            if out == Output::Table && r.replaced {
                eprintln!("replaced the previous build of {}", p.name);
            }
        }
        PluginCmd::List => {
            let r = c
                .list_plugins(pb::ListPluginsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            output::plugins(out, &r.plugins);
        }
        PluginCmd::Unload { name, force } => {
            c.unload_plugin(pb::UnloadPluginRequest {
                name: name.clone(),
                force,
            })
            .await
            .map_err(status_error)?;
            if out == Output::Table {
                println!("Unloaded plugin: {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
