//! Proto messages to and from domain types.

use openshell_core::{ConditionStatus, Phase, Resources, Sandbox, SandboxImage, SandboxSpec};
use openshell_proto::v1 as pb;

pub fn phase(p: Phase) -> pb::SandboxPhase {
    match p {
        Phase::Provisioning => pb::SandboxPhase::Provisioning,
        Phase::Ready => pb::SandboxPhase::Ready,
        Phase::Error => pb::SandboxPhase::Error,
        Phase::Deleting => pb::SandboxPhase::Deleting,
        Phase::Unknown => pb::SandboxPhase::Unknown,
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
        }),
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
    }
}

/// The spec as asked; the driver (and the image's digest) are resolved
/// later. A digest sent in `image_digest` is output only and ignored.
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
        },
        image: (!p.image.is_empty()).then(|| SandboxImage {
            reference: p.image,
            digest: String::new(),
        }),
    }
}
