//! The audit of egress decisions: one JSON object per decision in the
//! sandbox's network log (bounded like its output log, kept apart so a
//! flood of refusals never pushes out the main process's output), and a
//! structured line in the gateway's log.

use openshell_core::SandboxId;
use openshell_policy::Decision;
use openshell_proto::v1 as pb;
use serde::Serialize;

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::echo;
use crate::logs::{Logs, Record};
use crate::supervisor::LogThrottle;

/// One decision, as recorded. The sandbox-reported fields (host, binaries)
/// are bounded before they are kept.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub decision: &'static str,
    #[serde(skip)]
    pub allowed: bool,
    /// Allowed, but the dial failed.
    #[serde(skip)]
    pub unreachable: bool,
    pub via: String,
    pub host: String,
    pub port: u32,
    /// The address dialled (allowed connections).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub addr: String,
    pub binary: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub binary_sha256: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rule: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub policy_revision: u64,
}

/// Sandbox-reported text kept at most this long.
const MAX_FIELD: usize = 256;
const MAX_ANCESTORS: usize = 16;

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Entry {
    pub fn new(open: &pb::EgressOpen) -> Self {
        let first = open.binaries.first();
        Self {
            decision: "deny",
            allowed: false,
            unreachable: false,
            via: bounded(&open.via),
            host: bounded(&open.host),
            port: open.port,
            addr: String::new(),
            binary: first.map(|b| bounded(&b.path)).unwrap_or_default(),
            binary_sha256: first.map(|b| bounded(&b.sha256)).unwrap_or_default(),
            ancestors: open
                .binaries
                .iter()
                .skip(1)
                .take(MAX_ANCESTORS)
                .map(|b| bounded(&b.path))
                .collect(),
            rule: String::new(),
            reason: String::new(),
            policy_revision: 0,
        }
    }

    pub fn deny(&mut self, rule: Option<&str>, reason: &str) {
        self.allowed = false;
        self.rule = rule.unwrap_or_default().to_owned();
        self.reason = bounded(reason);
    }

    pub fn decided(&mut self, d: &Decision) {
        match d {
            Decision::Allow { rule, .. } => {
                self.allowed = true;
                self.rule = rule.clone();
                self.reason.clear();
            }
            Decision::Deny { rule, reason } => self.deny(rule.as_deref(), &reason.to_string()),
        }
    }

    pub fn verdict(&self) -> pb::EgressVerdict {
        pb::EgressVerdict {
            allowed: self.allowed,
            rule: self.rule.clone(),
            reason: self.reason.clone(),
            addr: self.addr.clone(),
            unreachable: self.unreachable,
        }
    }
}

pub struct Audit {
    logs: Logs,
    /// Refusals reach the gateway's log at most 10 a minute per sandbox
    /// (the network log keeps every one); allowed connections are debug.
    throttles: std::sync::Mutex<HashMap<SandboxId, Arc<LogThrottle>>>,
}

impl Audit {
    pub fn new(logs: Logs) -> Self {
        Self {
            logs,
            throttles: Default::default(),
        }
    }

    pub fn ensure(&self, sandbox: SandboxId) {
        self.logs.ensure(sandbox);
    }

    pub fn remove(&self, sandbox: SandboxId) {
        self.logs.remove(sandbox);
        self.throttles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sandbox);
    }

    fn throttle(&self, sandbox: SandboxId) -> Arc<LogThrottle> {
        self.throttles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sandbox)
            .or_default()
            .clone()
    }

    /// The log, for SandboxLogs with `network`.
    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    pub fn write(&self, sandbox: SandboxId, e: &Entry) {
        let mut e = e.clone();
        e.decision = match (e.allowed, e.unreachable) {
            (true, _) => "allow",
            (false, true) => "unreachable",
            (false, false) => "deny",
        };
        self.record(sandbox, &e);
    }

    /// An open connection a new policy closed.
    pub fn closed(
        &self,
        sandbox: SandboxId,
        host: &str,
        port: u16,
        binary: Option<&str>,
        revision: u64,
    ) {
        let e = Entry {
            decision: "closed",
            allowed: false,
            unreachable: false,
            via: String::new(),
            host: host.to_owned(),
            port: port.into(),
            addr: String::new(),
            binary: binary.unwrap_or_default().to_owned(),
            binary_sha256: String::new(),
            ancestors: Vec::new(),
            rule: String::new(),
            reason: format!("policy revision {revision} no longer allows it"),
            policy_revision: revision,
        };
        self.record(sandbox, &e);
    }

    fn record(&self, sandbox: SandboxId, e: &Entry) {
        let (host, binary, reason) = (echo(&e.host), echo(&e.binary), echo(&e.reason));
        if e.decision == "allow" {
            tracing::debug!(
                target: "openshell::egress",
                sandbox = %sandbox, decision = e.decision, host, port = e.port, addr = %e.addr,
                binary, rule = %e.rule, revision = e.policy_revision, "egress"
            );
        } else if let Some(dropped) = self.throttle(sandbox).allow() {
            tracing::info!(
                target: "openshell::egress",
                sandbox = %sandbox, decision = e.decision, host, port = e.port, binary,
                rule = %e.rule, reason, revision = e.policy_revision, dropped, "egress"
            );
        }
        let Ok(mut line) = serde_json::to_string(e) else {
            return;
        };
        line.push('\n');
        let mut r = Record::event(line);
        r.source = pb::LogSource::Network;
        self.logs.append(sandbox, &[r]);
    }
}
