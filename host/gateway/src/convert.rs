//! Proto messages to and from domain types.

use openshell_core::{
    ConditionStatus, Lifetime, Phase, Resources, Sandbox, SandboxImage, SandboxSpec,
};
use openshell_proto::v1 as pb;

pub fn phase(p: Phase) -> pb::SandboxPhase {
    match p {
        Phase::Provisioning => pb::SandboxPhase::Provisioning,
        Phase::Ready => pb::SandboxPhase::Ready,
        Phase::Error => pb::SandboxPhase::Error,
        Phase::Deleting => pb::SandboxPhase::Deleting,
        Phase::Unknown => pb::SandboxPhase::Unknown,
        Phase::Stopped => pb::SandboxPhase::Stopped,
    }
}

fn status_str(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

pub fn sandbox(s: &Sandbox, isolation: &str) -> pb::Sandbox {
    pb::Sandbox {
        isolation: isolation.to_owned(),
        id: s.id.to_string(),
        name: s.name.to_string(),
        spec: Some(pb::SandboxSpec {
            driver: s.spec.driver.clone(),
            environment: s.spec.environment.clone().into_iter().collect(),
            resources: Some(pb::Resources {
                vcpus: s.spec.resources.vcpus,
                memory_mib: s.spec.resources.memory_mib,
                max_processes: s.spec.resources.max_processes,
            }),
            image: s
                .spec
                .image
                .as_ref()
                .map(|i| i.reference.clone())
                .unwrap_or_default(),
            image_digest: s
                .spec
                .image
                .as_ref()
                .map(|i| i.digest.clone())
                .unwrap_or_default(),
            disk_gib: s.spec.resources.disk_gib,
            ttl_seconds: s.spec.lifetime.ttl_secs,
            idle_timeout_seconds: s.spec.lifetime.idle_timeout_secs,
        }),
        expires_at_ms: match s.spec.lifetime.ttl_secs {
            0 => 0,
            ttl => s
                .created_at_ms
                .saturating_add(i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX)),
        },
        phase: phase(s.status.phase).into(),
        conditions: s
            .status
            .conditions()
            .into_iter()
            .map(|c| pb::Condition {
                r#type: c.kind,
                status: status_str(c.status).into(),
                reason: c.reason,
                message: c.message,
                last_transition_time_ms: c.last_transition_ms,
            })
            .collect(),
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        revision: s.revision,
        policy_revision: s.spec.policy.as_ref().map_or(0, |p| p.revision),
    }
}

/// The spec as asked; the driver, the image's digest and the disk size
/// (0: the default) are resolved later. A digest sent in `image_digest` is
/// output only and ignored.
pub fn spec(p: Option<pb::SandboxSpec>) -> SandboxSpec {
    let p = p.unwrap_or_default();
    let r = p.resources.unwrap_or_default();
    SandboxSpec {
        driver: p.driver,
        environment: p.environment.into_iter().collect(),
        resources: Resources {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            max_processes: r.max_processes,
            disk_gib: p.disk_gib,
        },
        image: (!p.image.is_empty()).then(|| SandboxImage {
            reference: p.image,
            digest: String::new(),
        }),
        lifetime: Lifetime {
            ttl_secs: p.ttl_seconds,
            idle_timeout_secs: p.idle_timeout_seconds,
        },
        // Set by the create from CreateSandboxRequest.policy.
        policy: None,
    }
}

/// A stored policy for the API; `None` is the deny-all "none".
pub fn policy(p: Option<&openshell_core::StoredPolicy>) -> pb::SandboxPolicy {
    let Some(p) = p else {
        return pb::SandboxPolicy {
            source: "none".into(),
            ..Default::default()
        };
    };
    pb::SandboxPolicy {
        yaml: p.yaml.clone(),
        revision: p.revision,
        source: p.source.as_str().into(),
        rules: openshell_policy::Policy::parse(&p.yaml)
            .map(|pol| pol.rule_keys().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

pub fn stats(u: &openshell_plugin::stats::Usage) -> pb::SandboxStats {
    pb::SandboxStats {
        source: u.source.to_owned(),
        cpu_usage_ns: u.cpu_ns,
        cpu_limit_millis: u.cpu_limit_millis,
        memory_bytes: u.memory_bytes,
        memory_limit_bytes: u.memory_limit_bytes,
        pids: u.pids,
        pids_limit: u.pids_limit,
        disk_bytes: u.disk_bytes,
        disk_limit_bytes: u.disk_limit_bytes,
    }
}
