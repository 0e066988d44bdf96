//! The russh callbacks for one connection: every user and auth method is
//! accepted (see the module docs of [`super`]), session channels are opened,
//! and their requests (pty, env, shell, exec, sftp) recorded or started.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use openshell_core::validate;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId};

use super::channel::{SessionChannel, login_shell, window};
use crate::Config;
use crate::spawn;

/// OpenSSH's SFTP server, as Debian installs it; the sandbox sees the
/// host's /usr.
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// One SSH connection: its session channels and what runs in them.
pub(super) struct Connection {
    pub(super) cfg: Arc<Config>,
    pub(super) channels: HashMap<ChannelId, SessionChannel>,
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    // Every user and method is accepted: see the module docs.
    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Requests and data arrive through the callbacks below; the channel
        // object itself is not needed.
        self.channels.insert(channel.id(), SessionChannel::new());
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.stdin = None;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.channels.get(&channel).and_then(|c| c.stdin.as_ref()) {
            let _ = tx.send(data.to_vec());
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(ch) if ch.running.is_none() => {
                let term = if term.is_empty() || term.len() > 64 || term.contains('\0') {
                    "xterm-256color"
                } else {
                    term
                };
                ch.pty = Some((term.to_owned(), window(row_height, col_width)));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ws = window(row_height, col_width);
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if let Some((_, size)) = &mut ch.pty {
            *size = ws;
        }
        if let Some(master) = ch.running.as_ref().and_then(|r| r.master.as_ref()) {
            spawn::resize(master, ws);
        }
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(ch) if validate::env_var(name, value).is_ok() => {
                ch.env.insert(name.to_owned(), value.to_owned());
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path = self.cfg.child_env.get("PATH").map_or("", String::as_str);
        let argv = login_shell(path);
        self.start(channel, argv, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if data.contains(&0) {
            return session.channel_failure(channel);
        }
        let argv = vec!["sh".into(), "-c".into(), OsString::from_vec(data.to_vec())];
        self.start(channel, argv, session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" && std::path::Path::new(SFTP_SERVER).is_file() {
            self.start(channel, vec![SFTP_SERVER.into()], session)
        } else {
            tracing::info!(name, "ssh: refused a subsystem this sandbox does not have");
            session.channel_failure(channel)
        }
    }
}
