//! The API port's connection accounting, with no I/O: who may connect,
//! which connection is closed to make room, and when to log.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::{ConnectionLimits, LOG_INTERVAL};

/// Whom a connection counts against: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 /64, the smallest block a site is usually given.
pub(crate) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// A live connection as the accounting sees it.
pub(crate) trait Live {
    /// Since when it has had no request in flight; `None` while it has one.
    fn idle_since(&self) -> Option<Instant>;
    /// Asks it to close (it is forgotten at once; its release is a no-op).
    fn close(&self);
}

/// Why a new connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer's live share is full and every one of them has a request in
    /// flight: none is idle to make room.
    PeerFull,
    /// Every connection slot is live; none is handshaking to make room.
    GatewayFull,
}

/// The outcome of [`Admission::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<H> {
    /// Handshaking as `id`; `evicted` is the handle of the handshake closed
    /// to make room, if any.
    Accepted {
        id: u64,
        evicted: Option<H>,
    },
    Refused(Refusal),
}

struct Handshake<H> {
    id: u64,
    /// It has sent something: it is a client at work, not an idle socket.
    heard: bool,
    handle: H,
}

struct Peer<H, L> {
    /// Oldest first.
    handshaking: VecDeque<Handshake<H>>,
    live: Vec<(u64, L)>,
}

impl<H, L: Live> Peer<H, L> {
    /// The one to close for room: the oldest silent handshake, else the
    /// oldest.
    fn victim(&self) -> usize {
        self.handshaking.iter().position(|h| !h.heard).unwrap_or(0)
    }

    /// The live connection idle the longest, if any is idle.
    fn idlest(&self) -> Option<usize> {
        self.live
            .iter()
            .enumerate()
            .filter_map(|(i, (_, l))| l.idle_since().map(|t| (i, t)))
            .min_by_key(|(_, t)| *t)
            .map(|(i, _)| i)
    }
}

/// The connection accounting: each handshaking connection carries a handle
/// `H` (in the gateway, the sender whose drop closes it), each live one an
/// `L` that says whether it is idle and can be asked to close.
///
/// A peer's live share is fair, not first come: when it is full, a new
/// connection takes the place of the peer's connection idle the longest,
/// so idle sockets (which any local user can open, token or not: the token
/// is checked per request) never lock out a client at work. Only a share
/// full of requests in flight refuses newcomers, and a request needs the
/// token when auth is on.
pub(crate) struct Admission<H, L> {
    limits: ConnectionLimits,
    peers: HashMap<IpAddr, Peer<H, L>>,
    handshaking: usize,
    live: usize,
    next_id: u64,
}

impl<H, L: Live> Admission<H, L> {
    pub(crate) fn new(limits: ConnectionLimits) -> Self {
        Admission {
            limits,
            peers: HashMap::new(),
            handshaking: 0,
            live: 0,
            next_id: 0,
        }
    }

    /// A new connection from `peer`, keyed by [`peer_key`] by the caller.
    pub(crate) fn admit(&mut self, peer: IpAddr, handle: H) -> Admit<H> {
        let l = self.limits;
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.live.len() >= l.per_peer && p.idlest().is_none())
        {
            return Admit::Refused(Refusal::PeerFull);
        }
        let own = self.peers.get(&peer).map_or(0, |p| p.handshaking.len());
        let evicted = if own >= l.handshake_per_peer {
            // A peer over its handshake share makes room from its own.
            self.evict_from(peer)
        } else if self.handshaking >= l.handshake_total || self.handshaking + self.live >= l.total {
            // Room comes from whoever holds the most handshakes.
            let heaviest = self
                .peers
                .iter()
                .filter(|(_, p)| !p.handshaking.is_empty())
                .max_by_key(|(_, p)| p.handshaking.len())
                .map(|(k, _)| *k);
            match heaviest {
                Some(k) => self.evict_from(k),
                None => return Admit::Refused(Refusal::GatewayFull),
            }
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.handshaking += 1;
        self.peers
            .entry(peer)
            .or_insert_with(|| Peer {
                handshaking: VecDeque::new(),
                live: Vec::new(),
            })
            .handshaking
            .push_back(Handshake {
                id,
                heard: false,
                handle,
            });
        Admit::Accepted { id, evicted }
    }

    fn evict_from(&mut self, peer: IpAddr) -> Option<H> {
        let p = self.peers.get_mut(&peer)?;
        let i = p.victim();
        let h = p.handshaking.remove(i)?;
        self.handshaking -= 1;
        Some(h.handle)
    }

    /// The handshake `id` has received its first bytes.
    pub(crate) fn heard(&mut self, peer: IpAddr, id: u64) {
        if let Some(h) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.handshaking.iter_mut().find(|h| h.id == id))
        {
            h.heard = true;
        }
    }

    /// The handshake `id` finished: it becomes live as `live`, closing the
    /// peer's idlest connection if its share is full. `false` (the caller
    /// closes it) if it was evicted meanwhile or the share is full of
    /// connections with requests in flight.
    pub(crate) fn establish(&mut self, peer: IpAddr, id: u64, live: L) -> bool {
        let per_peer = self.limits.per_peer;
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        let Some(i) = p.handshaking.iter().position(|h| h.id == id) else {
            return false;
        };
        p.handshaking.remove(i);
        self.handshaking -= 1;
        let admitted = if p.live.len() < per_peer {
            true
        } else if let Some(v) = p.idlest() {
            let (_, old) = p.live.swap_remove(v);
            old.close();
            self.live -= 1;
            true
        } else {
            false
        };
        if admitted {
            p.live.push((id, live));
            self.live += 1;
        }
        self.forget_if_idle(peer);
        admitted
    }

    /// Closes every live connection idle for `timeout` or longer; returns
    /// how many.
    pub(crate) fn expire_idle(&mut self, now: Instant, timeout: Duration) -> usize {
        let mut closed = 0;
        let mut emptied = Vec::new();
        for (peer, p) in &mut self.peers {
            p.live.retain(|(_, l)| {
                let expired = l
                    .idle_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
                if expired {
                    l.close();
                    closed += 1;
                }
                !expired
            });
            if p.live.is_empty() && p.handshaking.is_empty() {
                emptied.push(*peer);
            }
        }
        for peer in emptied {
            self.peers.remove(&peer);
        }
        self.live -= closed;
        closed
    }

    /// The connection `id` closed; `live` says which phase it was in. An id
    /// that was evicted or expired is already forgotten.
    pub(crate) fn release(&mut self, peer: IpAddr, id: u64, live: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if live {
            if let Some(i) = p.live.iter().position(|(l, _)| *l == id) {
                p.live.swap_remove(i);
                self.live -= 1;
            }
        } else if let Some(i) = p.handshaking.iter().position(|h| h.id == id) {
            p.handshaking.remove(i);
            self.handshaking -= 1;
        }
        self.forget_if_idle(peer);
    }

    /// Keeps the map as small as the set of connected peers.
    fn forget_if_idle(&mut self, peer: IpAddr) {
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.live.is_empty() && p.handshaking.is_empty())
        {
            self.peers.remove(&peer);
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.handshaking, self.live)
    }
}

/// Says when to log a recurring problem: the first time, then at most once
/// per [`LOG_INTERVAL`], with how many were left unsaid in between.
#[derive(Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed since the last line)` when a line is due at `now`.
    pub(crate) fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            per_peer: 2,
            total: 6,
            handshake_per_peer: 3,
            handshake_total: 4,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A live connection whose idleness the test sets.
    #[derive(Clone, Default)]
    struct Fake(Rc<(Cell<Option<Instant>>, Cell<bool>)>);

    impl Fake {
        fn busy() -> Self {
            Fake::default()
        }
        fn idle_since(t: Instant) -> Self {
            let f = Fake::default();
            f.0.0.set(Some(t));
            f
        }
        fn closed(&self) -> bool {
            self.0.1.get()
        }
    }

    impl Live for Fake {
        fn idle_since(&self) -> Option<Instant> {
            self.0.0.get()
        }
        fn close(&self) {
            self.0.1.set(true);
        }
    }

    type Table = Admission<u64, Fake>;

    fn accept(a: &mut Table, peer: &str, handle: u64) -> (u64, Option<u64>) {
        match a.admit(ip(peer), handle) {
            Admit::Accepted { id, evicted } => (id, evicted),
            Admit::Refused(why) => panic!("{peer} was refused: {why:?}"),
        }
    }

    #[test]
    fn a_peer_over_its_handshake_share_closes_its_own_oldest_silent_handshake() {
        let mut a = Table::new(limits());
        let (first, _) = accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        // The oldest has spoken, so the next silent one goes.
        a.heard(ip("10.0.0.1"), first);
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(2));
        assert_eq!(a.counts(), (3, 0));
    }

    #[test]
    fn when_every_handshake_has_spoken_the_oldest_is_closed() {
        let mut a = Table::new(limits());
        for h in 1..=3 {
            let (id, _) = accept(&mut a, "10.0.0.1", h);
            a.heard(ip("10.0.0.1"), id);
        }
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(1));
    }

    #[test]
    fn a_full_handshake_budget_takes_room_from_the_heaviest_peer_not_the_newcomer() {
        let mut a = Table::new(limits());
        accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        accept(&mut a, "10.0.0.2", 4);
        // Total handshake budget (4) is full: the flooder loses one.
        assert_eq!(accept(&mut a, "10.0.0.3", 5).1, Some(1));
        assert_eq!(a.counts(), (4, 0));
    }

    #[test]
    fn a_peer_whose_live_share_is_all_at_work_is_refused_at_once() {
        let mut a = Table::new(limits());
        for h in 0..2 {
            let (id, _) = accept(&mut a, "10.0.0.1", h);
            assert!(a.establish(ip("10.0.0.1"), id, Fake::busy()));
        }
        assert_eq!(
            a.admit(ip("10.0.0.1"), 9),
            Admit::Refused(Refusal::PeerFull)
        );
        // Another peer is unaffected.
        accept(&mut a, "10.0.0.2", 10);
    }

    #[test]
    fn handshakes_finishing_past_a_share_all_at_work_are_closed() {
        let mut a = Table::new(limits());
        let ids: Vec<u64> = (0..3).map(|h| accept(&mut a, "10.0.0.1", h).0).collect();
        assert!(a.establish(ip("10.0.0.1"), ids[0], Fake::busy()));
        assert!(a.establish(ip("10.0.0.1"), ids[1], Fake::busy()));
        assert!(!a.establish(ip("10.0.0.1"), ids[2], Fake::busy()));
        assert_eq!(a.counts(), (0, 2));
    }

    #[test]
    fn when_every_slot_is_live_new_connections_are_refused_and_nothing_waits() {
        let mut a = Table::new(ConnectionLimits {
            total: 4,
            ..limits()
        });
        for peer in ["10.0.0.1", "10.0.0.2"] {
            for h in 0..2 {
                let (id, _) = accept(&mut a, peer, h);
                assert!(a.establish(ip(peer), id, Fake::busy()));
            }
        }
        assert_eq!(
            a.admit(ip("10.0.0.3"), 9),
            Admit::Refused(Refusal::GatewayFull)
        );
        assert_eq!(a.counts(), (0, 4));
        a.release(ip("10.0.0.1"), 0, true);
        accept(&mut a, "10.0.0.3", 10);
    }

    #[test]
    fn an_evicted_handshake_can_neither_go_live_nor_be_released_twice() {
        let mut a = Table::new(limits());
        let (id, _) = accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(1));
        assert!(!a.establish(ip("10.0.0.1"), id, Fake::busy()));
        a.release(ip("10.0.0.1"), id, false);
        assert_eq!(a.counts(), (3, 0));
    }

    #[test]
    fn releasing_everything_forgets_the_peer() {
        let mut a = Table::new(limits());
        let (h, _) = accept(&mut a, "10.0.0.1", 1);
        let (l, _) = accept(&mut a, "10.0.0.1", 2);
        assert!(a.establish(ip("10.0.0.1"), l, Fake::busy()));
        a.release(ip("10.0.0.1"), h, false);
        a.release(ip("10.0.0.1"), l, true);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.peers.is_empty());
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            peer_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(peer_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn a_full_live_share_makes_room_by_closing_the_peers_idlest_connection() {
        let mut a = Table::new(limits());
        let now = Instant::now();
        let older = Fake::idle_since(now - Duration::from_secs(30));
        let newer = Fake::idle_since(now - Duration::from_secs(5));
        let (x, _) = accept(&mut a, "10.0.0.1", 1);
        assert!(a.establish(ip("10.0.0.1"), x, newer.clone()));
        let (y, _) = accept(&mut a, "10.0.0.1", 2);
        assert!(a.establish(ip("10.0.0.1"), y, older.clone()));
        // Full, but idle: the newcomer is let in and the idlest goes.
        let (z, _) = accept(&mut a, "10.0.0.1", 3);
        assert!(a.establish(ip("10.0.0.1"), z, Fake::busy()));
        assert!(older.closed() && !newer.closed());
        assert_eq!(a.counts(), (0, 2));
        // The closed one's own release later changes nothing.
        a.release(ip("10.0.0.1"), y, true);
        assert_eq!(a.counts(), (0, 2));
    }

    #[test]
    fn connections_idle_past_the_timeout_expire_and_busy_ones_stay() {
        let mut a = Table::new(limits());
        let now = Instant::now();
        let stale = Fake::idle_since(now - Duration::from_secs(301));
        let fresh = Fake::idle_since(now - Duration::from_secs(10));
        let busy = Fake::busy();
        for (h, (peer, live)) in [
            ("10.0.0.1", &stale),
            ("10.0.0.1", &fresh),
            ("10.0.0.2", &busy),
        ]
        .into_iter()
        .enumerate()
        {
            let (id, _) = accept(&mut a, peer, h as u64);
            assert!(a.establish(ip(peer), id, live.clone()));
        }
        assert_eq!(a.expire_idle(now, Duration::from_secs(300)), 1);
        assert!(stale.closed() && !fresh.closed() && !busy.closed());
        assert_eq!(a.counts(), (0, 2));
        // An idle peer with nothing left is forgotten.
        assert_eq!(a.expire_idle(now, Duration::from_secs(1)), 1);
        assert_eq!(a.peers.len(), 1);
    }

    #[test]
    fn a_recurring_problem_is_logged_once_per_interval_with_a_count() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.due(start), Some(0));
        assert_eq!(t.due(start + Duration::from_secs(1)), None);
        assert_eq!(t.due(start + Duration::from_secs(2)), None);
        assert_eq!(
            t.due(start + LOG_INTERVAL + Duration::from_secs(1)),
            Some(2)
        );
    }
}
