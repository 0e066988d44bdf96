//! The sandbox record and the spec a user asks for.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::name::SandboxName;
use crate::phase::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SandboxId(pub Uuid);

impl SandboxId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Uuid::parse_str(raw).ok().map(Self)
    }
}

impl Default for SandboxId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Resource limits; zero means "the driver's default" (the gateway's, for
/// the disk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub max_processes: u32,
    /// GiB the sandbox may store on the host (its state dir's quota on the
    /// sandbox disk; `SandboxSpec.disk_gib` on the wire), resolved at
    /// create: what it asked for, or the gateway's default. 0 in a stored
    /// record: no size (the gateway had no sandbox disk, or the record
    /// predates sizes and gets the gateway's default when one has a disk).
    #[serde(default)]
    pub disk_gib: u32,
}

/// What the user asked for. Immutable after create.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Name of the driver plugin that runs this sandbox.
    pub driver: String,
    pub environment: BTreeMap<String, String>,
    pub resources: Resources,
    /// The image the sandbox is rooted in; `None`: the driver's default
    /// root (the host's system directories for a process sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SandboxImage>,
    /// When the gateway ends the sandbox on its own (see [`crate::lifetime`]).
    #[serde(default, skip_serializing_if = "Lifetime::is_unset")]
    pub lifetime: Lifetime,
    /// The network policy in force; `None`: nothing is reachable. The
    /// gateway validates the document before it stores it, and replaces it
    /// as a whole (with a revision check) on a policy change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<StoredPolicy>,
}

/// A network policy as a sandbox keeps it: the document the user wrote
/// (parsed again at each gateway start), its revision and where it came
/// from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub yaml: String,
    /// 1 for the policy a sandbox was created with, one more per change.
    pub revision: u64,
    pub source: PolicySource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// Given at create.
    Create,
    /// The gateway's default policy, copied in at create.
    Default,
    /// Set on the running sandbox.
    Set,
}

impl PolicySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Default => "default",
            Self::Set => "set",
        }
    }
}

/// A sandbox's lifetimes, in whole seconds; 0: none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    /// Counted from create: at `created_at + ttl` the sandbox is deleted,
    /// whatever its phase.
    #[serde(default)]
    pub ttl_secs: u64,
    /// A Ready sandbox with no relay (exec, SSH) open or closed for this
    /// long is stopped; a start restarts the clock.
    #[serde(default)]
    pub idle_timeout_secs: u64,
}

impl Lifetime {
    pub fn is_unset(&self) -> bool {
        *self == Lifetime::default()
    }
}

/// An image as a sandbox records it: the reference the user gave and the
/// manifest digest it resolved to at create, which every later launch
/// uses (so a restart runs exactly the same image).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxImage {
    pub reference: String,
    pub digest: String,
}

/// How strongly a sandbox is separated from its host, reported honestly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Isolation {
    /// Not yet known (the driver has not launched anything).
    Unknown,
    /// Namespaces and cgroups on the host kernel.
    Process,
    /// Own kernel, hardware virtualisation.
    VmKvm,
    /// Own kernel, software emulation: no hardware isolation.
    VmTcg,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Unknown => "unknown",
            Isolation::Process => "process",
            Isolation::VmKvm => "vm-kvm",
            Isolation::VmTcg => "vm-tcg",
        }
    }
}

/// A sandbox as the gateway stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sandbox {
    pub id: SandboxId,
    pub name: SandboxName,
    pub spec: SandboxSpec,
    pub status: Status,
    /// Client token that makes a retried create return this sandbox.
    pub request_id: Option<String>,
    /// Opaque state the driver plugin asked the host to keep for it.
    pub driver_state: Vec<u8>,
    /// Incremented by every stored change; the store compares and swaps on it.
    pub revision: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Which host uid range the sandbox runs on, allocated at create and
    /// unique among stored sandboxes, so one that is stopped or restarting
    /// keeps its range. Set once and held until the record is deleted (the
    /// gateway deletes it after the sandbox's files are gone). `None` only for
    /// records stored before slots existed, until they are backfilled.
    pub uid_slot: Option<u32>,
}

impl Sandbox {
    /// A fresh record, Provisioning, not yet stored (revision 0).
    pub fn new(
        name: SandboxName,
        spec: SandboxSpec,
        request_id: Option<String>,
        now_ms: i64,
    ) -> Self {
        Self {
            id: SandboxId::new(),
            name,
            spec,
            status: Status::provisioning(now_ms),
            request_id,
            driver_state: Vec::new(),
            revision: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            uid_slot: None,
        }
    }
}
