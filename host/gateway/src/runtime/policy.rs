//! Network policies: which one a sandbox gets at create, putting the
//! stored one in force (create, recovery), and replacing it live. The
//! document is parsed here before it is stored; the egress engine only
//! ever sees a parsed policy.

use openshell_core::{PolicySource, Sandbox, StoredPolicy};
use openshell_policy::Policy;

use super::ComputeRuntime;
use crate::error::ApiError;

/// The largest policy document accepted (a big policy is a few KiB).
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// Parses a document a user sent.
pub fn parse(yaml: &str) -> Result<Policy, ApiError> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(ApiError::TooLarge {
            what: "the policy",
            len: yaml.len(),
            limit: MAX_POLICY_BYTES,
            hint: ": split it into fewer, broader rules",
        });
    }
    Policy::parse(yaml).map_err(|e| ApiError::Policy(Box::new(e)))
}

impl ComputeRuntime {
    /// The policy a new sandbox stores: the one it was given (checked), or
    /// the gateway's default as it is now, or none (nothing reachable).
    pub(super) fn policy_for_create(
        &self,
        given: Option<StoredPolicy>,
    ) -> Result<Option<StoredPolicy>, ApiError> {
        match given {
            Some(p) => {
                parse(&p.yaml)?;
                Ok(Some(StoredPolicy {
                    revision: 1,
                    source: PolicySource::Create,
                    ..p
                }))
            }
            None => Ok(self.default_policy.as_ref().map(|yaml| StoredPolicy {
                yaml: yaml.clone(),
                revision: 1,
                source: PolicySource::Default,
            })),
        }
    }

    /// Puts a stored sandbox's policy in force. A stored document this
    /// build cannot parse (written by another version) allows nothing, and
    /// says so in the sandbox's log.
    pub(super) fn install_policy(&self, sb: &Sandbox) {
        let (policy, revision) = match &sb.spec.policy {
            None => (Policy::deny_all(), 0),
            Some(p) => match Policy::parse(&p.yaml) {
                Ok(policy) => (policy, p.revision),
                Err(e) => {
                    let msg = format!(
                        "its stored policy (revision {}) no longer parses, so nothing is reachable: {e}; set a new one with `openshell policy set`",
                        p.revision
                    );
                    tracing::warn!(sandbox = %sb.id, "{msg}");
                    self.logs.event(sb.id, msg);
                    (Policy::deny_all(), p.revision)
                }
            },
        };
        self.egress.install(sb.id, policy, revision);
    }

    /// Replaces a sandbox's policy: stored (with a revision check), then
    /// in force, with the connections it no longer allows closed. The
    /// same text again changes nothing.
    pub async fn set_policy(
        &self,
        name_or_id: &str,
        yaml: &str,
        expected_revision: u64,
    ) -> Result<(Sandbox, StoredPolicy), ApiError> {
        let policy = parse(yaml)?;
        let sb = self.find(name_or_id).await?;
        let rules = policy.rule_keys().count();
        let mut mismatch = None;
        let mut changed = false;
        let stored = self
            .store
            .modify_sandbox(sb.id, |s| {
                let current = s.spec.policy.as_ref().map_or(0, |p| p.revision);
                if expected_revision != 0 && current != expected_revision {
                    mismatch = Some(current);
                    return false;
                }
                mismatch = None;
                changed = false;
                if s.spec.policy.as_ref().is_some_and(|p| p.yaml == yaml) {
                    return false;
                }
                s.spec.policy = Some(StoredPolicy {
                    yaml: yaml.to_owned(),
                    revision: current + 1,
                    source: PolicySource::Set,
                });
                s.updated_at_ms = super::now_ms();
                changed = true;
                true
            })
            .await?
            .ok_or_else(|| ApiError::SandboxNotFound {
                name: name_or_id.to_owned(),
            })?;
        if let Some(current) = mismatch {
            return Err(ApiError::PolicyRevision {
                name: sb.name.to_string(),
                current,
                expected: expected_revision,
            });
        }
        let in_force = stored
            .spec
            .policy
            .clone()
            .expect("the closure stored a policy or found this one");
        if changed {
            let closed = self.egress.install(stored.id, policy, in_force.revision);
            self.logs.event(
                stored.id,
                format!(
                    "policy revision {} in force ({} rules); {closed} connection(s) it no longer allows closed",
                    in_force.revision, rules
                ),
            );
            self.watch.notify(stored.id);
        }
        Ok((stored, in_force))
    }

    /// A sandbox's policy in force; `None`: it has none (nothing is
    /// reachable).
    pub async fn policy(&self, name_or_id: &str) -> Result<Option<StoredPolicy>, ApiError> {
        Ok(self.find(name_or_id).await?.spec.policy)
    }

    /// The egress engine.
    pub fn egress(&self) -> &std::sync::Arc<crate::egress::Egress> {
        &self.egress
    }
}
