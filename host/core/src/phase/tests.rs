use super::*;
use proptest::prelude::*;

fn status_in(phase: Phase) -> Status {
    let mut s = Status::provisioning(0);
    let events: Vec<Event> = match phase {
        Phase::Provisioning => vec![],
        Phase::Ready => vec![Event::SupervisorConnected],
        Phase::Error => vec![Event::DriverExited { status: 1 }],
        Phase::Deleting => vec![Event::DeleteRequested],
        Phase::Unknown => vec![Event::SupervisorConnected, Event::GatewayRestarted],
        Phase::Stopped => vec![Event::SupervisorConnected, stop()],
    };
    for e in &events {
        s = apply(&s, e, 1).unwrap();
    }
    assert_eq!(s.phase, phase);
    s
}

fn stop() -> Event {
    Event::StopRequested {
        message: "stopped by request".into(),
    }
}

fn every_event() -> Vec<Event> {
    vec![
        Event::DriverStarting {
            message: "booting".into(),
        },
        Event::DriverProgress {
            message: "50%".into(),
        },
        Event::DriverFailed {
            reason: "ImagePullFailed".into(),
            message: "no such image".into(),
        },
        Event::DriverExited { status: 3 },
        Event::SupervisorConnected,
        Event::SupervisorDisconnected,
        Event::GatewayRestarted,
        Event::DeleteRequested,
        stop(),
        Event::StartRequested,
    ]
}

/// The whole transition table: `None` means rejected.
fn expected(phase: Phase, event: &Event) -> Option<Phase> {
    use Phase::*;
    let e = event.name();
    match (phase, e) {
        (Deleting, "DeleteRequested") => Some(Deleting),
        (Deleting, _) => None,
        (_, "DeleteRequested") => Some(Deleting),
        (Error, _) => None,
        (Ready, "StopRequested") => Some(Stopped),
        (Stopped, "StopRequested" | "GatewayRestarted") => Some(Stopped),
        (_, "StopRequested") => None,
        (Stopped, "StartRequested") => Some(Provisioning),
        (Stopped, _) => None,
        (p, "StartRequested") => Some(p),
        (Ready, "DriverStarting" | "DriverProgress" | "SupervisorConnected") => Some(Ready),
        (Ready, "SupervisorDisconnected") => Some(Provisioning),
        (Ready, "GatewayRestarted") => Some(Unknown),
        (_, "DriverFailed" | "DriverExited") => Some(Error),
        (_, "SupervisorConnected") => Some(Ready),
        (Provisioning | Unknown, "DriverStarting") => Some(Provisioning),
        (p, "DriverProgress" | "SupervisorDisconnected" | "GatewayRestarted") => Some(p),
        other => panic!("table has no row for {other:?}"),
    }
}

#[test]
fn every_phase_and_event_pair_matches_the_table() {
    for phase in Phase::ALL {
        for event in every_event() {
            let got = apply(&status_in(phase), &event, 10).map(|s| s.phase).ok();
            assert_eq!(got, expected(phase, &event), "{phase:?} + {event:?}");
        }
    }
}

#[test]
fn a_driver_cannot_make_a_sandbox_ready() {
    let driver_events = [
        Event::DriverStarting {
            message: "Ready".into(),
        },
        Event::DriverProgress {
            message: "SupervisorConnected".into(),
        },
        Event::DriverFailed {
            reason: "SupervisorConnected".into(),
            message: "ready".into(),
        },
        Event::DriverFailed {
            reason: "Ready".into(),
            message: "True".into(),
        },
        Event::DriverExited { status: 0 },
    ];
    for phase in [Phase::Provisioning, Phase::Unknown] {
        for e in &driver_events {
            let next = apply(&status_in(phase), e, 5).unwrap();
            assert_ne!(next.phase, Phase::Ready, "{e:?}");
            assert_ne!(next.ready.status, ConditionStatus::True);
        }
    }
}

#[test]
fn supervisor_disconnect_demotes_ready_to_provisioning() {
    let s = apply(&status_in(Phase::Ready), &Event::SupervisorDisconnected, 7).unwrap();
    assert_eq!(s.phase, Phase::Provisioning);
    assert_eq!(s.ready.reason, ReadyReason::SupervisorDisconnected);
    assert_eq!(s.ready.last_transition_ms, 7);
}

#[test]
fn a_stopped_sandbox_ignores_its_departing_processes_and_starts_only_when_asked() {
    let stopped = status_in(Phase::Stopped);
    assert_eq!(stopped.ready.reason, ReadyReason::Stopped);
    for late in [
        Event::DriverExited { status: 137 },
        Event::SupervisorDisconnected,
        Event::SupervisorConnected,
    ] {
        assert!(apply(&stopped, &late, 20).is_err(), "{late:?}");
    }
    assert_eq!(
        apply(&stopped, &stop(), 21).unwrap(),
        stopped,
        "a repeated stop changes nothing"
    );
    let started = apply(&stopped, &Event::StartRequested, 22).unwrap();
    assert_eq!(started.phase, Phase::Provisioning);
    assert_eq!(started.ready.reason, ReadyReason::Starting);
    let ready = apply(&started, &Event::SupervisorConnected, 23).unwrap();
    assert_eq!(ready.phase, Phase::Ready);
}

#[test]
fn reconnecting_is_idempotent() {
    let ready = status_in(Phase::Ready);
    let again = apply(&ready, &Event::SupervisorConnected, 99).unwrap();
    assert_eq!(again, ready, "a repeat must not bump the transition time");
}

#[test]
fn driver_reasons_are_sanitised() {
    assert_eq!(driver_reason("ProcessPollFailed"), "ProcessPollFailed");
    for bad in ["", "lower", "Has space", "Semi;colon", &"A".repeat(65)] {
        assert_eq!(driver_reason(bad), "DriverFailed", "{bad:?}");
    }
    let long = "é".repeat(2000);
    let cut = driver_message(&long);
    assert!(cut.len() <= MAX_MESSAGE_LEN);
    assert_eq!(driver_message("a\nb\x1b[31m"), "a b [31m");
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        ".{0,40}".prop_map(|message| Event::DriverStarting { message }),
        ".{0,40}".prop_map(|message| Event::DriverProgress { message }),
        (".{0,70}", ".{0,40}")
            .prop_map(|(reason, message)| Event::DriverFailed { reason, message }),
        any::<i32>().prop_map(|status| Event::DriverExited { status }),
        Just(Event::SupervisorConnected),
        Just(Event::SupervisorDisconnected),
        Just(Event::GatewayRestarted),
        Just(Event::DeleteRequested),
        ".{0,40}".prop_map(|message| Event::StopRequested { message }),
        Just(Event::StartRequested),
    ]
}

proptest! {
    /// Random event sequences never leave the legal graph: the stored phase
    /// always equals the derived one, Deleting and Error are absorbing, and
    /// Ready is only reachable through the supervisor.
    #[test]
    fn random_event_sequences_stay_legal(events in prop::collection::vec(arb_event(), 0..40)) {
        let mut s = Status::provisioning(0);
        for (t, e) in events.iter().enumerate() {
            let before = s.phase;
            match apply(&s, e, t as i64) {
                Ok(next) => {
                    prop_assert_eq!(next.phase, derive_phase(&next.ready));
                    if before == Phase::Deleting { prop_assert_eq!(next.phase, Phase::Deleting); }
                    if before == Phase::Error { prop_assert!(matches!(next.phase, Phase::Error | Phase::Deleting)); }
                    // Stopped is left only by a start or a delete, and
                    // entered only by a stop of a Ready sandbox.
                    if before == Phase::Stopped && next.phase != Phase::Stopped {
                        prop_assert!(matches!(e, Event::StartRequested | Event::DeleteRequested), "{:?}", e);
                    }
                    if next.phase == Phase::Stopped && before != Phase::Stopped {
                        prop_assert_eq!(before, Phase::Ready);
                        prop_assert!(matches!(e, Event::StopRequested { .. }), "{:?}", e);
                    }
                    if next.phase == Phase::Ready && before != Phase::Ready {
                        prop_assert_eq!(e, &Event::SupervisorConnected);
                    }
                    if let Some(d) = &next.driver {
                        prop_assert!(d.message.len() <= MAX_MESSAGE_LEN);
                        prop_assert!(!d.message.chars().any(char::is_control));
                    }
                    s = next;
                }
                Err(r) => prop_assert_eq!(r.phase, before),
            }
        }
    }

}

proptest! {
    /// Fuzzing (issue 8): whatever a driver says, what is stored and shown
    /// is a short CamelCase reason and a bounded, control-free message.
    #[test]
    fn driver_reasons_and_messages_are_always_safe(raw in "\\PC{0,100}|[A-Z][A-Za-z0-9]{0,70}|(?s).{0,2000}") {
        let reason = driver_reason(&raw);
        prop_assert!((1..=64).contains(&reason.len()));
        prop_assert!(reason.starts_with(|c: char| c.is_ascii_uppercase()));
        prop_assert!(reason.chars().all(|c| c.is_ascii_alphanumeric()));
        prop_assert!(reason == raw || reason == "DriverFailed");
        let message = driver_message(&raw);
        prop_assert!(message.len() <= MAX_MESSAGE_LEN);
        prop_assert!(!message.chars().any(char::is_control));
        if raw.len() <= MAX_MESSAGE_LEN && !raw.chars().any(char::is_control) {
            prop_assert_eq!(&message, &raw);
        }
    }
}
