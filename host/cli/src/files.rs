//! `openshell sandbox upload` and `download`: a tree packed or unpacked
//! here (`openshell_files`), streamed through the gateway as tar.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use openshell_files::{Limits, Summary, Unpack};
use openshell_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, status_error};
use crate::image::{CHUNK, ChunkWriter};

/// What this side moves at most; the gateway holds the sandbox's side to
/// the same.
const LIMITS: Limits = Limits {
    max_bytes: 8 << 30,
    max_entries: 200_000,
};

/// Transfers smaller than this show no progress bar.
const QUIET_BELOW: u64 = 1 << 20;

fn bar(message: String, total: Option<u64>) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(t) => (
            indicatif::ProgressBar::new(t),
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
        ),
        None => (
            indicatif::ProgressBar::no_length(),
            "{msg} {bytes} {bytes_per_sec}",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar
}

/// Copies `src` here into sandbox `name` at `dst` (its working directory
/// when empty).
pub async fn upload(
    c: &mut Client,
    name: &str,
    src: &Path,
    dst: &str,
    overwrite: bool,
) -> anyhow::Result<pb::UploadFilesResponse> {
    let size = openshell_files::measure(src, LIMITS)
        .with_context(|| format!("cannot upload {}", src.display()))?;
    let progress = if size.bytes >= QUIET_BELOW {
        bar(format!("uploading {}", src.display()), Some(size.bytes))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let source = src.to_owned();
    let counter = progress.clone();
    let packer = tokio::task::spawn_blocking(move || -> anyhow::Result<Summary> {
        let mut sink = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let s = openshell_files::pack(&source, &mut sink, LIMITS, &mut |n| counter.inc(n))
            .with_context(|| format!("cannot upload {}", source.display()))?;
        sink.flush_chunk()?;
        Ok(s)
    });
    let start = pb::UploadFilesMessage {
        msg: Some(pb::upload_files_message::Msg::Start(pb::UploadFilesStart {
            sandbox: name.to_owned(),
            path: dst.to_owned(),
            overwrite,
        })),
    };
    let data = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |d| pb::UploadFilesMessage {
        msg: Some(pb::upload_files_message::Msg::Data(d.into())),
    });
    let requests = tokio_stream::StreamExt::chain(tokio_stream::once(start), data);
    let call = c.upload_files(requests);
    tokio::pin!(call);
    // A local read error must fail the upload, not end the stream early
    // (which the sandbox would take for a truncated archive): dropping the
    // call resets it, and the gateway ends the helper.
    let mut packer = packer;
    let mut packed = None;
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            p = &mut packer, if packed.is_none() => {
                let p = p.context("the packing thread failed")?;
                if let Err(e) = p {
                    progress.finish_and_clear();
                    return Err(e);
                }
                packed = Some(());
            }
        }
    };
    progress.finish_and_clear();
    if packed.is_none() {
        // The gateway answered first (an error, most likely): say that.
        packer.abort();
    }
    Ok(result.map_err(status_error)?.into_inner())
}

/// Copies `src` out of sandbox `name` to `dst` here; `-` writes the tar
/// stream to stdout.
pub async fn download(
    c: &mut Client,
    name: &str,
    src: &str,
    dst: &Path,
    overwrite: bool,
) -> anyhow::Result<Summary> {
    let mut stream = c
        .download_files(pb::DownloadFilesRequest {
            sandbox: name.to_owned(),
            path: src.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let to_stdout = dst == Path::new("-");
    let target = dst.to_owned();
    let unpacker = tokio::task::spawn_blocking(move || -> anyhow::Result<Summary> {
        let reader = ChannelReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        };
        if to_stdout {
            let mut reader = reader;
            let n = std::io::copy(&mut reader, &mut std::io::stdout().lock())?;
            return Ok(Summary {
                bytes: n,
                ..Summary::default()
            });
        }
        let how = Unpack {
            overwrite,
            limits: LIMITS,
            // Nothing from a sandbox becomes a set-uid file here.
            keep_special_bits: false,
        };
        openshell_files::unpack(reader, &target, how, &mut |_| {})
            .with_context(|| format!("cannot download into {}", target.display()))
    });
    let mut progress: Option<indicatif::ProgressBar> = None;
    let mut received = 0u64;
    let failed = loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                received += chunk.data.len() as u64;
                if received >= QUIET_BELOW && !to_stdout {
                    progress
                        .get_or_insert_with(|| bar(format!("downloading {src}"), None))
                        .set_position(received);
                }
                if tx.send(chunk.data.to_vec()).await.is_err() {
                    // The unpacker stopped: its error says why.
                    break None;
                }
            }
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    if let Some(s) = failed {
        // An incomplete stream: what was staged is removed by the unpacker
        // when its reader fails.
        drop(tx);
        let _ = unpacker.await;
        return Err(status_error(s));
    }
    drop(tx);
    unpacker.await.context("the unpacking thread failed")?
}

/// A blocking reader over chunks from the download stream; a closed
/// channel is the end of the stream.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.chunk = c;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// `DIR[:DST]` of `sandbox create --upload`: DST is the part after the
/// last `:` when it is an absolute path, so local paths may hold colons.
pub fn parse_upload(spec: &str) -> (PathBuf, String) {
    match spec.rsplit_once(':') {
        Some((src, dst)) if dst.starts_with('/') && !src.is_empty() => (src.into(), dst.into()),
        _ => (spec.into(), String::new()),
    }
}

/// What an upload or download moved, for people.
pub fn said(entries: u64, bytes: u64) -> String {
    let size = indicatif::HumanBytes(bytes);
    match entries {
        1 => format!("1 entry, {size}"),
        n => format!("{n} entries, {size}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_spec_splits_at_the_last_colon_before_an_absolute_path() {
        assert_eq!(parse_upload("proj"), ("proj".into(), String::new()));
        assert_eq!(
            parse_upload("proj:/work/p"),
            ("proj".into(), "/work/p".into())
        );
        assert_eq!(parse_upload("a:b:/dst"), ("a:b".into(), "/dst".into()));
        assert_eq!(parse_upload("a:b"), ("a:b".into(), String::new()));
    }
}
