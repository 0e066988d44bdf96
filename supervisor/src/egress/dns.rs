//! The sandbox's resolver, and connections that ignore the proxy.
//!
//! Sandbox code's `/etc/resolv.conf` names [`STUB_ADDR`]. A question for a
//! name goes to the gateway (`LookupEgress`), which answers from the
//! sandbox's policy: a name no rule names is NXDOMAIN (never looked up
//! outside), an allowed one comes back with the ports its rules allow.
//! We answer it with an address of our own on the sandbox's loopback
//! (127.80.0.0/16: all of 127/8 is local to `lo`, so no address needs
//! adding) and listen there on exactly those ports. A client that connects
//! to that address, proxy variables or not, is relayed as egress to the
//! *name*, decided by the gateway like a proxied connection (binary
//! rules included). Any other port of that address, and every address
//! that is not ours, is refused by the kernel at once: the sandbox's
//! network namespace has nothing but `lo` (a VM guest has no route but the
//! gateway's).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use super::{EgressError, Uplink};

/// Where the stub listens, inside the sandbox.
pub const STUB_ADDR: &str = "127.0.0.53:53";

/// What sandbox code's `/etc/resolv.conf` says: only the stub, no search
/// domains (a short name is not tried under anyone's domain).
pub const RESOLV_CONF: &str = "# openshell: names resolve through this sandbox's policy\nnameserver 127.0.0.53\noptions timeout:2 attempts:2\n";

/// Names handed out at most (65,534 addresses fit 127.80/16; a sandbox
/// that looks up more is answered SERVFAIL past this).
const MAX_NAMES: usize = 4096;
/// Listeners at most, over all names.
const MAX_LISTENERS: usize = 8192;
/// Questions answered at once; past it a question is dropped (the client
/// asks again).
const MAX_QUESTIONS: usize = 64;
/// Captured connections served at once; past it new ones wait in the
/// listen queue.
const MAX_CLIENTS: usize = 1024;
/// Short: a policy change reaches clients that cache.
const TTL: u32 = 5;
/// The gateway resolves within 5 s.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(8);

/// The stub and the listeners behind the addresses it hands out.
pub struct Stub {
    uplink: Uplink,
    names: Mutex<Names>,
    clients: Arc<Semaphore>,
}

#[derive(Default)]
struct Names {
    by_name: HashMap<String, Given>,
    listeners: usize,
}

/// A name's address and a listener per allowed port.
struct Given {
    ip: Ipv4Addr,
    ports: BTreeMap<u16, AbortHandle>,
}

/// The `n`th address handed out (from 127.80.0.1).
fn nth(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n + 1).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 80, 0, 0)) | (n & 0xffff))
}

/// How a question is answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Address(Ipv4Addr),
    /// The name exists, but not with this type (AAAA: we hand out IPv4).
    NoData,
    NxDomain,
    ServFail,
    Refused,
}

impl Stub {
    pub fn new(uplink: Uplink) -> Arc<Self> {
        Arc::new(Self {
            uplink,
            names: Mutex::default(),
            clients: Arc::new(Semaphore::new(MAX_CLIENTS)),
        })
    }

    /// Answers questions on `socket` until the process ends.
    pub async fn serve(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let questions = Arc::new(Semaphore::new(MAX_QUESTIONS));
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = questions.clone().try_acquire_owned() else {
                continue;
            };
            let (packet, stub, socket) = (buf[..n].to_vec(), self.clone(), socket.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let local = socket.local_addr().ok();
                if let Some(reply) = stub.reply(&packet, from, local).await {
                    let _ = socket.send_to(&reply, from).await;
                }
            });
        }
    }

    /// The reply to one datagram; `None` for what is not a question.
    async fn reply(
        self: &Arc<Self>,
        packet: &[u8],
        from: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Option<Vec<u8>> {
        let ask = Message::from_vec(packet).ok()?;
        if ask.message_type() != MessageType::Query {
            return None;
        }
        let mut reply = Message::new();
        reply
            .set_id(ask.id())
            .set_message_type(MessageType::Response)
            .set_op_code(ask.op_code())
            .set_recursion_desired(ask.recursion_desired())
            .set_recursion_available(true);
        reply.add_queries(ask.queries().iter().cloned());
        let answer = match ask.queries() {
            [q] => {
                let name = q.name().to_ascii();
                let binaries = match local {
                    Some(local) => tokio::task::spawn_blocking(move || {
                        super::callers::of_datagram(from, local)
                    })
                    .await
                    .unwrap_or_default(),
                    None => Vec::new(),
                };
                let answer = self.answer(&name, q.query_type(), binaries).await;
                if let Answer::Address(ip) = answer {
                    reply.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
                }
                answer
            }
            // One question per message is all anyone sends.
            _ => Answer::Refused,
        };
        reply.set_response_code(match answer {
            Answer::Address(_) | Answer::NoData => ResponseCode::NoError,
            Answer::NxDomain => ResponseCode::NXDomain,
            Answer::ServFail => ResponseCode::ServFail,
            Answer::Refused => ResponseCode::Refused,
        });
        reply.to_vec().ok()
    }

    async fn answer(
        self: &Arc<Self>,
        name: &str,
        kind: RecordType,
        binaries: Vec<pb::EgressBinary>,
    ) -> Answer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Answer::NxDomain;
        }
        let found = match self.lookup(&name, binaries).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(%name, "cannot ask the gateway: {}", crate::report::chain(&e));
                return Answer::ServFail;
            }
        };
        if found.ports.is_empty() {
            tracing::debug!(%name, reason = %found.reason, "no address");
            return if found.temporary {
                Answer::ServFail
            } else {
                Answer::NxDomain
            };
        }
        let ports: Vec<u16> = found
            .ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok().filter(|p| *p != 0))
            .collect();
        // Listeners follow the policy's ports on every question, whatever
        // its type: a port a new policy adds is served from the next one.
        let ip = match self.give(&name, &ports) {
            Some(ip) => ip,
            None => return Answer::ServFail,
        };
        match kind {
            RecordType::A => Answer::Address(ip),
            _ => Answer::NoData,
        }
    }

    async fn lookup(
        &self,
        name: &str,
        binaries: Vec<pb::EgressBinary>,
    ) -> Result<pb::EgressLookupResult, EgressError> {
        let super::Link { channel, token, .. } = self.uplink.link()?;
        let ask = pb::EgressLookup {
            name: name.to_owned(),
            binaries,
            token,
        };
        let mut client = SupervisorClient::new(channel);
        match tokio::time::timeout(LOOKUP_TIMEOUT, client.lookup_egress(ask)).await {
            Ok(Ok(found)) => Ok(found.into_inner()),
            Ok(Err(status)) => Err(EgressError::Relay(status)),
            Err(_) => Err(EgressError::NoVerdict),
        }
    }

    /// The name's address, with a listener on each of `ports` (and none on
    /// a port no longer allowed). `None` past the bounds.
    fn give(self: &Arc<Self>, name: &str, ports: &[u16]) -> Option<Ipv4Addr> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let Names { by_name, listeners } = &mut *names;
        if !by_name.contains_key(name) {
            if by_name.len() >= MAX_NAMES {
                tracing::warn!("{MAX_NAMES} names handed out: {name} gets SERVFAIL");
                return None;
            }
            let ip = nth(by_name.len());
            by_name.insert(
                name.to_owned(),
                Given {
                    ip,
                    ports: BTreeMap::new(),
                },
            );
        }
        let given = by_name.get_mut(name)?;
        given.ports.retain(|port, task| {
            let keep = ports.contains(port);
            if !keep {
                task.abort();
                *listeners -= 1;
            }
            keep
        });
        for &port in ports {
            if given.ports.contains_key(&port) {
                continue;
            }
            if *listeners >= MAX_LISTENERS {
                tracing::warn!("{MAX_LISTENERS} listeners open: {name}:{port} is not served");
                continue;
            }
            let addr = SocketAddr::from((given.ip, port));
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, "cannot listen for {name}:{port}: {e}");
                    continue;
                }
            };
            let task = tokio::spawn(self.clone().accept(listener, name.to_owned(), port));
            given.ports.insert(port, task.abort_handle());
            *listeners += 1;
        }
        Some(given.ip)
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, name: String, port: u16) {
        loop {
            let Ok(slot) = self.clients.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (uplink, name) = (self.uplink.clone(), name.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let _ = stream.set_nodelay(true);
                relay(stream, peer, &uplink, &name, port).await;
            });
        }
    }
}

/// One captured connection: to the gateway as egress to `name:port`, or
/// reset at once if it is refused.
async fn relay(client: TcpStream, peer: SocketAddr, uplink: &Uplink, name: &str, port: u16) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    let binaries = tokio::task::spawn_blocking(move || super::callers::of_connection(peer, local))
        .await
        .unwrap_or_default();
    let open = super::Open {
        host: name,
        port,
        via: "dns",
        binaries,
    };
    match super::carry(uplink, client, open, Vec::new(), Vec::new()).await {
        Ok(verdict) => tracing::debug!(%name, port, addr = %verdict.addr, "egress allowed"),
        Err(super::Refused { client, error }) => {
            tracing::debug!(%name, port, "egress refused: {}", crate::report::chain(&error));
            reset(client);
        }
    }
}

/// Closes with a reset, so the client fails at once (no orderly end a
/// client could take for an empty answer).
fn reset(client: TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &linger);
    drop(client);
}

/// Points `/etc/resolv.conf` at the stub: a file of ours in `/run` (the
/// sandbox root's, which sandbox code cannot write; a VM guest's tmpfs),
/// bound over the sandbox's own (created first where `/etc` is writable,
/// as an image's is). Sandbox code may not unmount it; a resolver it names
/// itself is simply unreachable.
pub fn install_resolv_conf() -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    const TARGET: &str = "/etc/resolv.conf";
    let ours = std::path::Path::new("/run/openshell-resolv.conf");
    std::fs::write(ours, RESOLV_CONF).map_err(|e| format!("cannot write {ours:?}: {e}"))?;
    std::fs::set_permissions(ours, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("cannot make {ours:?} readable: {e}"))?;
    match std::fs::symlink_metadata(TARGET) {
        Ok(m) if m.is_file() => {}
        // A symlink would be followed by the bind, out of `/etc`: replace
        // it where we may, as we create a missing one.
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(TARGET)
                .and_then(|()| std::fs::write(TARGET, ""))
                .map_err(|e| format!("{TARGET} is a symlink and cannot be replaced: {e}"))?;
        }
        Ok(_) => return Err(format!("{TARGET} is not a file")),
        Err(_) => std::fs::write(TARGET, "")
            .map_err(|e| format!("{TARGET} is missing and cannot be created: {e}"))?,
    }
    nix::mount::mount(
        Some(ours),
        TARGET,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("cannot bind {ours:?} over {TARGET}: {e}"))?;
    // Read-only for everyone, root of a nested namespace included.
    nix::mount::mount(
        None::<&str>,
        TARGET,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND
            | nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make {TARGET} read-only: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_handed_out_in_127_80() {
        assert_eq!(nth(0), Ipv4Addr::new(127, 80, 0, 1));
        assert_eq!(nth(255), Ipv4Addr::new(127, 80, 1, 0));
        assert_eq!(nth(MAX_NAMES - 1), Ipv4Addr::new(127, 80, 16, 0));
        assert!(nth(MAX_NAMES - 1).is_loopback());
    }

    /// With no gateway, every question is SERVFAIL (the client retries,
    /// never takes an answer we did not have), and garbage gets nothing.
    #[tokio::test]
    async fn without_a_gateway_questions_fail_and_garbage_is_dropped() {
        let (_tx, uplink) = Uplink::new();
        let stub = Stub::new(uplink);
        let mut ask = Message::new();
        ask.set_id(7).add_query(hickory_proto::op::Query::query(
            "allowed.test.".parse().unwrap(),
            RecordType::A,
        ));
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let reply = stub
            .reply(&ask.to_vec().unwrap(), from, None)
            .await
            .expect("a reply");
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.id(), 7);
        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert!(reply.answers().is_empty());
        assert_eq!(stub.reply(b"\x00\x01garbage", from, None).await, None);
    }
}
