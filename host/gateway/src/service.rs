//! The `openshell.v1.OpenShell` service: request validation and translation
//! only; every decision is in the runtime.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use openshell_proto::v1 as pb;
use openshell_proto::v1::open_shell_server::OpenShell;
use prost::Message;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;

/// Largest CreateSandbox request accepted (the environment is the bulk).
pub const MAX_CREATE_BYTES: usize = 256 * 1024;
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

pub struct Service {
    pub runtime: Arc<ComputeRuntime>,
    /// Flips to true when the gateway shuts down; open watches end.
    pub shutdown: watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSandboxEvent, Status>> + Send>>;
type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullImageProgress, Status>> + Send>>;

/// Largest archive ImportImage accepts.
pub const MAX_IMPORT_BYTES: u64 = 64 << 30;

fn image_info(image: &openshell_image::Image, sandboxes: Vec<String>) -> pb::Image {
    pb::Image {
        names: image.names.clone(),
        digest: image.digest.to_string(),
        size: image.size,
        layers: image.layers.len() as u32,
        sandboxes,
    }
}

fn plugin_info(p: &openshell_plugin::Plugin, sandboxes: u64, loaded_at_ms: i64) -> pb::Plugin {
    pb::Plugin {
        name: p.name.clone(),
        version: p.info.version.clone(),
        description: p.info.description.clone(),
        isolation: p.info.isolation.into(),
        digest: p.digest.clone(),
        grants: p.grants.iter().map(|g| g.as_str().into()).collect(),
        imports: p.imports.iter().map(|g| g.as_str().into()).collect(),
        sandboxes,
        loaded_at_ms,
    }
}

#[tonic::async_trait]
impl OpenShell for Service {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            status: "SERVING".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            drivers: self.runtime.driver_names(),
        }))
    }

    async fn create_sandbox(
        &self,
        req: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        let req = req.into_inner();
        // The policy is bounded on its own (runtime::policy::MAX_POLICY_BYTES).
        let len = req.encoded_len().saturating_sub(req.policy.len());
        if len > MAX_CREATE_BYTES {
            return Err(to_status(ApiError::TooLarge {
                what: "the request",
                len,
                limit: MAX_CREATE_BYTES,
                hint: ": pass fewer or smaller environment variables",
            }));
        }
        let mut spec = convert::spec(req.spec);
        spec.policy = (!req.policy.is_empty()).then_some(openshell_core::StoredPolicy {
            yaml: req.policy,
            revision: 1,
            source: openshell_core::PolicySource::Create,
        });
        let sb = self
            .runtime
            .create(&req.name, spec, &req.request_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateSandboxResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
        }))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::GetSandboxResponse>, Status> {
        let sb = self
            .runtime
            .find(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
        }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let req = req.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            l if l > MAX_LIST_LIMIT => {
                return Err(to_status(ApiError::BadField(format!(
                    "limit {l} is out of range: use 1 to {MAX_LIST_LIMIT} (0 means {DEFAULT_LIST_LIMIT})"
                ))));
            }
            l => l,
        };
        let (page, total) = self
            .runtime
            .list(limit, req.offset)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: page
                .iter()
                .map(|sb| convert::sandbox(sb, self.runtime.isolation(sb)))
                .collect(),
            total,
        }))
    }

    async fn delete_sandbox(
        &self,
        req: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let sb = self
            .runtime
            .delete(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteSandboxResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
        }))
    }

    type WatchSandboxStream = WatchStream;

    async fn watch_sandbox(
        &self,
        req: Request<pb::WatchSandboxRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        let runtime = self.runtime.clone();
        // Subscribe before the first read, so no change falls in between.
        let mut changes = runtime.subscribe();
        let first = runtime.find(&req.name).await.map_err(to_status)?;
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let id = first.id;
            let mut last = Some(first);
            let mut sent_rev = -1;
            loop {
                match last.take() {
                    None => {
                        let _ = tx
                            .send(Ok(pb::WatchSandboxEvent {
                                event: Some(pb::watch_sandbox_event::Event::Deleted(
                                    pb::SandboxDeleted {
                                        id: id.to_string(),
                                        name: String::new(),
                                    },
                                )),
                            }))
                            .await;
                        return;
                    }
                    Some(sb) => {
                        if sb.revision != sent_rev {
                            sent_rev = sb.revision;
                            let ev = pb::WatchSandboxEvent {
                                event: Some(pb::watch_sandbox_event::Event::Sandbox(
                                    convert::sandbox(&sb, runtime.isolation(&sb)),
                                )),
                            };
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                        if req.until_settled && sb.status.phase.is_settled() {
                            return;
                        }
                    }
                }
                // Wait for a change to this sandbox, the client leaving, or shutdown.
                loop {
                    tokio::select! {
                        r = changes.recv() => match r {
                            Ok(changed) if changed != id => continue,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        _ = tx.closed() => return,
                        _ = shutdown.changed() => {
                            let _ = tx.send(Err(to_status(ApiError::ShuttingDown))).await;
                            return;
                        }
                    }
                }
                match runtime.get(id).await {
                    Ok(found) => last = found,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ExecSandboxStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::ExecServerMessage, Status>>;

    async fn exec_sandbox(
        &self,
        req: Request<tonic::Streaming<pb::ExecClientMessage>>,
    ) -> Result<Response<Self::ExecSandboxStream>, Status> {
        let out = crate::exec::exec(self.runtime.clone(), req.into_inner()).await?;
        Ok(Response::new(out))
    }

    type SshTunnelStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::SshTunnelFrame, Status>>;

    async fn ssh_tunnel(
        &self,
        req: Request<tonic::Streaming<pb::SshTunnelFrame>>,
    ) -> Result<Response<Self::SshTunnelStream>, Status> {
        let out = crate::ssh::tunnel(self.runtime.clone(), req.into_inner()).await?;
        Ok(Response::new(out))
    }

    async fn upload_files(
        &self,
        req: Request<tonic::Streaming<pb::UploadFilesMessage>>,
    ) -> Result<Response<pb::UploadFilesResponse>, Status> {
        let r = crate::files::upload(self.runtime.clone(), req.into_inner()).await?;
        Ok(Response::new(r))
    }

    type DownloadFilesStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::DownloadFilesChunk, Status>>;

    async fn download_files(
        &self,
        req: Request<pb::DownloadFilesRequest>,
    ) -> Result<Response<Self::DownloadFilesStream>, Status> {
        let out = crate::files::download(self.runtime.clone(), req.into_inner()).await?;
        Ok(Response::new(out))
    }

    type ForwardTcpStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::ForwardTcpFrame, Status>>;

    async fn forward_tcp(
        &self,
        req: Request<tonic::Streaming<pb::ForwardTcpFrame>>,
    ) -> Result<Response<Self::ForwardTcpStream>, Status> {
        let out = crate::ssh::forward(self.runtime.clone(), req.into_inner()).await?;
        Ok(Response::new(out))
    }

    type SandboxLogsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::LogRecord, Status>>;

    async fn sandbox_logs(
        &self,
        req: Request<pb::SandboxLogsRequest>,
    ) -> Result<Response<Self::SandboxLogsStream>, Status> {
        let out = crate::sandbox_logs::stream(self.runtime.clone(), req.into_inner())
            .await
            .map_err(to_status)?;
        Ok(Response::new(out))
    }

    async fn get_ssh_host_key(
        &self,
        req: Request<pb::GetSshHostKeyRequest>,
    ) -> Result<Response<pb::GetSshHostKeyResponse>, Status> {
        let host_key = crate::ssh::host_key(&self.runtime, &req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetSshHostKeyResponse { host_key }))
    }

    async fn load_plugin(
        &self,
        req: Request<pb::LoadPluginRequest>,
    ) -> Result<Response<pb::LoadPluginResponse>, Status> {
        let req = req.into_inner();
        let (plugin, replaced) = self
            .runtime
            .load_plugin(&req.name, &req.component, &req.grants)
            .await
            .map_err(to_status)?;
        let users = self
            .runtime
            .plugin_users(&plugin.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LoadPluginResponse {
            plugin: Some(plugin_info(&plugin, users, crate::runtime::now_ms())),
            replaced,
        }))
    }

    async fn list_plugins(
        &self,
        _: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        let mut out = Vec::new();
        for p in self.runtime.loaded_plugins() {
            let users = self
                .runtime
                .plugin_users(&p.name)
                .await
                .map_err(to_status)?;
            let loaded_at = self
                .runtime
                .plugin_record(&p.name)
                .await
                .map_err(to_status)?
                .map_or(0, |r| r.loaded_at_ms);
            out.push(plugin_info(&p, users, loaded_at));
        }
        Ok(Response::new(pb::ListPluginsResponse { plugins: out }))
    }

    type PullImageStream = PullStream;

    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let reference = req.into_inner().reference;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let progress = move |p: openshell_image::PullProgress| {
                // Progress is advisory: a slow client misses some, never the end.
                let _ = progress_tx.try_send(Ok(pb::PullImageProgress {
                    layers_done: p.layers_done as u32,
                    layers_total: p.layers_total as u32,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    image: None,
                }));
            };
            let last = match runtime.pull_image(&reference, &progress).await {
                Ok(image) => Ok(pb::PullImageProgress {
                    layers_done: image.layers.len() as u32,
                    layers_total: image.layers.len() as u32,
                    bytes_done: image.size,
                    bytes_total: image.size,
                    image: Some(image_info(&image, Vec::new())),
                }),
                Err(e) => Err(to_status(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn import_image(
        &self,
        req: Request<tonic::Streaming<pb::ImportImageChunk>>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        use tokio::io::AsyncWriteExt;
        let mut chunks = req.into_inner();
        let dir = self.runtime.image_upload_dir().map_err(to_status)?;
        let upload = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&dir)
            .map_err(|e| to_status(ApiError::ImageUpload(e)))?;
        let (file, path) = upload.into_parts();
        // Removed on every way out (the path guard), the file closed first.
        let staged = path;
        let mut file = tokio::fs::File::from_std(file);
        let mut name = None;
        let mut total = 0u64;
        while let Some(chunk) = chunks.message().await? {
            if name.is_none() {
                name = Some(chunk.name.clone()).filter(|n| !n.is_empty());
            }
            total += chunk.data.len() as u64;
            if total > MAX_IMPORT_BYTES {
                return Err(to_status(ApiError::TooLarge {
                    what: "the image archive",
                    len: usize::try_from(total).unwrap_or(usize::MAX),
                    limit: usize::try_from(MAX_IMPORT_BYTES).unwrap_or(usize::MAX),
                    hint: ": import a smaller image",
                }));
            }
            file.write_all(&chunk.data)
                .await
                .map_err(|e| to_status(ApiError::ImageUpload(e)))?;
        }
        file.flush()
            .await
            .map_err(|e| to_status(ApiError::ImageUpload(e)))?;
        drop(file);
        let image = self
            .runtime
            .import_image(staged.to_path_buf(), name)
            .await
            .map_err(|e| crate::error::to_status_naming(e, &staged, "the uploaded archive"))?;
        Ok(Response::new(pb::ImportImageResponse {
            image: Some(image_info(&image, Vec::new())),
        }))
    }

    async fn list_images(
        &self,
        _: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self.runtime.list_images().await.map_err(to_status)?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images
                .into_iter()
                .map(|(image, users)| image_info(&image, users))
                .collect(),
        }))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let (image, reclaimed) = self
            .runtime
            .remove_image(&req.name, req.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RemoveImageResponse {
            image: Some(image_info(&image, Vec::new())),
            reclaimed_bytes: reclaimed,
        }))
    }

    async fn unload_plugin(
        &self,
        req: Request<pb::UnloadPluginRequest>,
    ) -> Result<Response<pb::UnloadPluginResponse>, Status> {
        let req = req.into_inner();
        self.runtime
            .unload_plugin(&req.name, req.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UnloadPluginResponse {}))
    }

    async fn stop_sandbox(
        &self,
        req: Request<pb::StopSandboxRequest>,
    ) -> Result<Response<pb::StopSandboxResponse>, Status> {
        let name = req.into_inner().name;
        let sb = self
            .runtime
            .stop(&name, "stopped by request")
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StopSandboxResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<pb::StartSandboxRequest>,
    ) -> Result<Response<pb::StartSandboxResponse>, Status> {
        let sb = self
            .runtime
            .start(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StartSandboxResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
        }))
    }

    async fn get_sandbox_stats(
        &self,
        req: Request<pb::GetSandboxStatsRequest>,
    ) -> Result<Response<pb::GetSandboxStatsResponse>, Status> {
        let (sb, u) = self
            .runtime
            .stats(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetSandboxStatsResponse {
            sandbox: Some(convert::sandbox(&sb, self.runtime.isolation(&sb))),
            stats: Some(convert::stats(&u)),
        }))
    }

    async fn set_sandbox_policy(
        &self,
        req: Request<pb::SetSandboxPolicyRequest>,
    ) -> Result<Response<pb::SetSandboxPolicyResponse>, Status> {
        let req = req.into_inner();
        let (_, p) = self
            .runtime
            .set_policy(&req.name, &req.yaml, req.expected_revision)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SetSandboxPolicyResponse {
            policy: Some(convert::policy(Some(&p))),
        }))
    }

    async fn get_sandbox_policy(
        &self,
        req: Request<pb::GetSandboxPolicyRequest>,
    ) -> Result<Response<pb::GetSandboxPolicyResponse>, Status> {
        let p = self
            .runtime
            .policy(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetSandboxPolicyResponse {
            policy: Some(convert::policy(p.as_ref())),
        }))
    }
}
