//! File transfers: a relay that runs our own file helper (this binary,
//! re-executed as `openshell-supervisor __files ...`) the way every command
//! starts ([`crate::spawn`]): as the sandbox's user, under its limits and
//! system-call filter. So an upload writes only what sandbox code could
//! write, and a download reads only what it could read, whatever symlinks
//! sandbox code planted; the supervisor itself never opens a sandbox path.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use openshell_files::{Limits, TransferError, Unpack};
use openshell_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::Config;
use crate::spawn;

/// The first argument that makes this binary the file helper.
pub const HELPER_ARG: &str = "__files";

/// The helper's command line for a transfer.
fn command(t: &pb::FilesTransfer) -> spawn::Command {
    let mut argv: Vec<OsString> = vec!["/proc/self/exe".into(), HELPER_ARG.into()];
    argv.push(if t.upload { "unpack" } else { "pack" }.into());
    argv.push(if t.overwrite { "overwrite" } else { "keep" }.into());
    argv.push(t.max_bytes.to_string().into());
    argv.push(t.max_entries.to_string().into());
    argv.push(if t.path.is_empty() { "." } else { &t.path }.into());
    spawn::Command {
        argv,
        env: Default::default(),
        workdir: None,
        tty: None,
    }
}

pub async fn serve(
    cfg: &Config,
    t: pb::FilesTransfer,
    inbound: tonic::Streaming<pb::RelayFrame>,
    tx: mpsc::Sender<pb::RelayFrame>,
) {
    crate::exec::run_command(cfg, &command(&t), 0, inbound, tx).await
}

/// `__files unpack|pack overwrite|keep MAX_BYTES MAX_ENTRIES PATH`: the
/// helper's main, synchronous, on stdin and stdout.
pub fn helper_main(args: &[OsString]) -> ExitCode {
    let result = (|| {
        let [op, overwrite, max_bytes, max_entries, path] = args else {
            return Err(usage());
        };
        let num = |v: &OsString| v.to_str().and_then(|v| v.parse().ok()).ok_or_else(usage);
        let limits = Limits {
            max_bytes: num(max_bytes)?,
            max_entries: num(max_entries)?,
        };
        let path = Path::new(path);
        if op == "unpack" {
            let how = Unpack {
                overwrite: overwrite == "overwrite",
                limits,
                // Sandbox code may set them on its own files anyway.
                keep_special_bits: true,
            };
            let s = openshell_files::unpack(std::io::stdin().lock(), path, how, &mut |_| {})?;
            println!(r#"{{"entries":{},"bytes":{}}}"#, s.entries, s.bytes);
            Ok(())
        } else if op == "pack" {
            let mut out = std::io::BufWriter::with_capacity(128 * 1024, std::io::stdout().lock());
            openshell_files::pack(path, &mut out, limits, &mut |_| {})?;
            out.flush().map_err(|source| TransferError::Io {
                path: "stdout".into(),
                source,
            })?;
            Ok(())
        } else {
            Err(usage())
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", crate::report::chain(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn usage() -> TransferError {
    TransferError::BadEntry {
        path: String::new(),
        why: "is not what the file helper was asked for (a bug: usage is unpack|pack overwrite|keep MAX_BYTES MAX_ENTRIES PATH)",
    }
}
