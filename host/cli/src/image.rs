//! `openshell image ...`, and the pull a `sandbox create --image` starts
//! with (so the create's progress line shows the pull).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use openshell_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;

use crate::args::{ImageCmd, Output};
use crate::client::{Client, connect, status_error};
use crate::output;

/// Import chunks: large enough to keep the stream busy, well under the
/// gateway's message limit.
pub(crate) const CHUNK: usize = 1 << 20;

pub async fn run(
    endpoint: &crate::client::Target,
    out: Output,
    cmd: ImageCmd,
) -> anyhow::Result<ExitCode> {
    let mut c = connect(endpoint).await?;
    match cmd {
        ImageCmd::Pull { reference } => {
            let image = pull(&mut c, &reference).await?;
            output::images(out, std::slice::from_ref(&image));
        }
        ImageCmd::Import { path, name } => {
            let image = import(&mut c, &path, name.unwrap_or_default()).await?;
            output::images(out, std::slice::from_ref(&image));
        }
        ImageCmd::List => {
            let r = c
                .list_images(pb::ListImagesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            output::images(out, &r.images);
        }
        ImageCmd::Rm { name, force } => {
            let r = c
                .remove_image(pb::RemoveImageRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match out {
                Output::Table => println!(
                    "Removed image: {name} ({} reclaimed)",
                    output::bytes(r.reclaimed_bytes)
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"removed": name, "reclaimed_bytes": r.reclaimed_bytes})
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Pulls `reference` (a no-op for a stored one), with a progress bar on a
/// terminal; returns the stored image.
pub async fn pull(c: &mut Client, reference: &str) -> anyhow::Result<pb::Image> {
    let mut stream = c
        .pull_image(pb::PullImageRequest {
            reference: reference.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = progress_bar(&format!("pulling {reference}"));
    while let Some(p) = stream.message().await.map_err(status_error)? {
        if let Some(image) = p.image {
            bar.finish_and_clear();
            return Ok(image);
        }
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!(
            "pulling {reference}: layer {}/{}",
            p.layers_done, p.layers_total
        ));
    }
    anyhow::bail!("the gateway ended the pull of {reference} without reporting the image")
}

/// A byte progress bar on stderr when it is a terminal, hidden otherwise.
pub(crate) fn progress_bar(message: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message.to_owned());
    bar
}

/// Streams a file as it is, or a directory (an OCI layout) as a tar made
/// on the fly.
async fn import(c: &mut Client, path: &Path, name: String) -> anyhow::Result<pb::Image> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let bar = progress_bar(&format!("importing {}", path.display()));
    let source = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut sink = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        if meta.is_dir() {
            let mut tar = tar::Builder::new(&mut sink);
            tar.follow_symlinks(false);
            tar.append_dir_all(".", &source)
                .with_context(|| format!("cannot read {}", source.display()))?;
            tar.finish()?;
        } else {
            let mut file = std::fs::File::open(&source)
                .with_context(|| format!("cannot read {}", source.display()))?;
            std::io::copy(&mut file, &mut sink)?;
        }
        sink.flush_chunk()
    });
    let mut first = Some(name);
    let counter = bar.clone();
    let chunks = ReceiverStream::new(rx);
    let requests = tokio_stream::StreamExt::map(chunks, move |data| {
        counter.inc(data.len() as u64);
        pb::ImportImageChunk {
            name: first.take().unwrap_or_default(),
            data: data.into(),
        }
    });
    let result = c.import_image(requests).await;
    bar.finish_and_clear();
    // A read error ends the stream early; say that, not what the gateway
    // made of a truncated archive.
    reader.await.context("the reader thread failed")??;
    let r = result.map_err(status_error)?.into_inner();
    r.image
        .context("the gateway did not report the imported image")
}

/// Cuts what is written into chunks for the import stream.
pub(crate) struct ChunkWriter {
    pub(crate) tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub(crate) buf: Vec<u8>,
}

impl ChunkWriter {
    pub(crate) fn flush_chunk(&mut self) -> anyhow::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx
                .blocking_send(chunk)
                .map_err(|_| anyhow::anyhow!("the gateway stopped reading the import"))?;
        }
        Ok(())
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush_chunk().map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
