//! Who is calling: the process that owns the client end of a connection
//! to our proxy, and its ancestors, each as the executable it runs (the
//! path the kernel reports, and the file's SHA-256). Never argv: a process
//! sets its own.
//!
//! The socket is found in this network namespace's TCP table by its two
//! addresses, its owner by scanning open descriptors for its inode. Hashes
//! are cached by (device, inode, ctime), so a binary is read once until it
//! changes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

use openshell_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// Ancestors reported at most.
const MAX_DEPTH: usize = 16;

/// The first read of a TCP table asks for this much (150 bytes a socket).
const TABLE_READ: usize = 1 << 20;

/// The calling process and its ancestors up to (not including) us, or
/// empty if the socket's owner cannot be found (it already closed).
pub fn of_connection(client: SocketAddr, server: SocketAddr) -> Vec<pb::EgressBinary> {
    let inode = diag::inode(client, server, Proto::Tcp)
        .or_else(|| socket_inode(client, server, &["/proc/net/tcp", "/proc/net/tcp6"]));
    of_socket(inode)
}

/// As [`of_connection`], for a connected UDP socket (a resolver's query:
/// glibc and musl connect theirs to the name server).
pub fn of_datagram(client: SocketAddr, server: SocketAddr) -> Vec<pb::EgressBinary> {
    let inode = diag::inode(client, server, Proto::Udp)
        .or_else(|| socket_inode(client, server, &["/proc/net/udp", "/proc/net/udp6"]));
    of_socket(inode)
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

fn of_socket(inode: Option<u64>) -> Vec<pb::EgressBinary> {
    let Some(inode) = inode else {
        return Vec::new();
    };
    // A socket held by two processes (inherited, or passed) could be
    // used by either: no caller can be named, so no binary rule matches.
    let Some(pid) = sole_owner(inode) else {
        return Vec::new();
    };
    let found = chain(pid);
    // Someone else's code inside an allowed binary (a tracer, a preloaded
    // library) is not that binary.
    if found.is_empty() || !untampered(pid) {
        return Vec::new();
    }
    found
}

/// Neither traced nor started with a preloaded library.
fn untampered(pid: u32) -> bool {
    let traced = std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| {
        s.lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .is_none_or(|v| v.trim() != "0")
    });
    let preloaded = std::fs::read(format!("/proc/{pid}/environ")).map_or(true, |env| {
        env.split(|b| *b == 0)
            .any(|v| v.starts_with(b"LD_PRELOAD=") || v.starts_with(b"LD_AUDIT="))
    });
    !traced && !preloaded
}

/// The exe chain from `pid` up to our own process (exclusive).
pub fn chain(mut pid: u32) -> Vec<pb::EgressBinary> {
    let me = std::process::id();
    let mut out = Vec::new();
    while out.len() < MAX_DEPTH && pid > 1 && pid != me {
        out.push(binary(pid));
        match parent(pid) {
            Some(p) => pid = p,
            None => break,
        }
    }
    out
}

fn binary(pid: u32) -> pb::EgressBinary {
    let exe = format!("/proc/{pid}/exe");
    let path = std::fs::read_link(&exe)
        .map(|p| {
            let s = p.to_string_lossy().into_owned();
            s.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(s)
        })
        .unwrap_or_default();
    let sha256 = File::open(&exe).ok().and_then(hash).unwrap_or_default();
    pb::EgressBinary { path, sha256 }
}

type FileKey = (u64, u64, i64, i64);

fn hash(mut f: File) -> Option<String> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, String>>> = OnceLock::new();
    let m = f.metadata().ok()?;
    let key = (m.dev(), m.ino(), m.ctime(), m.ctime_nsec());
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(h) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Some(h.clone());
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return None,
        }
    }
    let h = hex::encode(hasher.finalize());
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() > 4096 {
        c.clear();
    }
    c.insert(key, h.clone());
    Some(h)
}

/// The parent pid, from `/proc/PID/stat` (after the command's closing
/// parenthesis, which the command itself may contain).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The socket's inode by an exact lookup (sock_diag): one hash probe in
/// the kernel, where `/proc/net/tcp` walks every TCP socket of the host.
mod diag {
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    /// nlmsghdr + inet_diag_req_v2.
    const REQ_LEN: usize = 16 + 56;
    /// Where inet_diag_msg's inode sits in a reply (after the nlmsghdr).
    const INODE_AT: usize = 16 + 68;

    /// The sockid of `local` → `remote` as the kernel writes it: ports and
    /// addresses in network order, IPv4 in the first word.
    fn sockid(out: &mut [u8], local: SocketAddr, remote: SocketAddr) {
        out[0..2].copy_from_slice(&local.port().to_be_bytes());
        out[2..4].copy_from_slice(&remote.port().to_be_bytes());
        for (at, ip) in [(4, local.ip()), (20, remote.ip())] {
            match ip {
                IpAddr::V4(v4) => out[at..at + 4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => out[at..at + 16].copy_from_slice(&v6.octets()),
            }
        }
        // Interface 0 (any), then the cookie INET_DIAG_NOCOOKIE.
        out[40..48].copy_from_slice(&[0xff; 8]);
    }

    pub fn inode(client: SocketAddr, server: SocketAddr, proto: super::Proto) -> Option<u64> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .ok()?;
        let mut req = [0u8; REQ_LEN];
        req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        req[16] = match client.ip() {
            IpAddr::V4(_) => nix::libc::AF_INET as u8,
            IpAddr::V6(_) => nix::libc::AF_INET6 as u8,
        };
        req[17] = match proto {
            super::Proto::Tcp => nix::libc::IPPROTO_TCP as u8,
            super::Proto::Udp => nix::libc::IPPROTO_UDP as u8,
        };
        // Every state.
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        // TCP finds a socket by its own end first; UDP finds the socket
        // that would receive a datagram from `idiag_src` (so, for the
        // client's socket, the server's end goes first).
        match proto {
            super::Proto::Tcp => sockid(&mut req[24..72], client, server),
            super::Proto::Udp => sockid(&mut req[24..72], server, client),
        }
        sendto(
            fd.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .ok()?;
        let mut reply = [0u8; 512];
        let n = recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty()).ok()?;
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if n < INODE_AT + 4 || kind != SOCK_DIAG_BY_FAMILY {
            // NLMSG_ERROR: no such socket (or no sock_diag here).
            return None;
        }
        let inode = u32::from_ne_bytes(reply[INODE_AT..INODE_AT + 4].try_into().ok()?);
        (inode != 0).then_some(u64::from(inode))
    }
}

/// The inode of the socket whose local end is `client` and remote end is
/// `server`, from the kernel's tables (where sock_diag is missing).
fn socket_inode(client: SocketAddr, server: SocketAddr, tables: &[&str]) -> Option<u64> {
    let mut buf = vec![0u8; TABLE_READ];
    for &table in tables {
        let Some(len) = read_table(table, &mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if same(f[1], client) && same(f[2], server) {
                return f[9].parse().ok().filter(|i| *i != 0);
            }
        }
    }
    None
}

/// Reads a TCP table in large reads: the kernel walks the table again for
/// every read(2), so std's small growing reads cost milliseconds on a busy
/// one. `None` if it cannot be read (or fills `buf`: the rest is lost, and
/// the caller is then not found).
fn read_table(path: &str, buf: &mut [u8]) -> Option<usize> {
    let mut f = File::open(path).ok()?;
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => return Some(len),
            Ok(n) => len += n,
            Err(_) => return None,
        }
    }
    None
}

/// Whether a `/proc/net/tcp*` address (`HEXIP:HEXPORT`, the IP as 32-bit
/// words in host order) is `want`; an IPv4-mapped IPv6 entry matches its
/// IPv4 address.
fn same(field: &str, want: SocketAddr) -> bool {
    let Some((ip, port)) = field.split_once(':') else {
        return false;
    };
    if u16::from_str_radix(port, 16).ok() != Some(want.port()) {
        return false;
    }
    let words: Option<Vec<u32>> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let got = match words.as_deref() {
        Some([w]) => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
        Some([a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return false,
    };
    let want_ip = match want.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    got == want_ip
}

/// The one process holding a descriptor for socket `inode` (not us);
/// `None` if none does, or more than one.
fn sole_owner(inode: u64) -> Option<u32> {
    let link = format!("socket:[{inode}]");
    let me = std::process::id();
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link.as_str()));
        if holds {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A python client whose connected socket `script` (run after it
    /// connects to `port`) may share; what the chain names for it.
    fn caller_of(script: &str) -> Vec<pb::EgressBinary> {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let code = format!(
            "import socket,os,sys,time\ns=socket.create_connection(('127.0.0.1',{}))\n{script}\nprint('ready', flush=True)\ntime.sleep(30)\n",
            addr.port()
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &code])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (_conn, peer) = server.accept().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        let found = of_connection(peer, addr);
        let _ = child.kill();
        let _ = child.wait();
        found
    }

    #[test]
    fn a_socket_shared_with_another_process_names_no_caller() {
        assert!(!caller_of("").is_empty(), "a lone client is named");
        // The forked child holds the same socket: either could be using it.
        let shared = caller_of(
            "p=os.getpid()\nif os.fork() == 0:\n    while os.getppid() == p: time.sleep(0.05)\n    os._exit(0)",
        );
        assert!(shared.is_empty(), "{shared:?}");
    }

    #[test]
    fn sock_diag_and_the_tcp_table_agree_on_a_socket() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let local = client.local_addr().unwrap();
        let by_diag = diag::inode(local, addr, Proto::Tcp).expect("sock_diag finds it");
        let tables = ["/proc/net/tcp", "/proc/net/tcp6"];
        assert_eq!(Some(by_diag), socket_inode(local, addr, &tables));
        // A socket that does not exist is not found, nor a TCP one as UDP.
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag::inode(other, addr, Proto::Tcp), None);
        assert_eq!(diag::inode(local, addr, Proto::Udp), None);
    }

    #[test]
    fn a_connected_udp_socket_is_found_both_ways() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(addr).unwrap();
        let local = client.local_addr().unwrap();
        let by_diag = diag::inode(local, addr, Proto::Udp).expect("sock_diag finds it");
        let tables = ["/proc/net/udp", "/proc/net/udp6"];
        assert_eq!(Some(by_diag), socket_inode(local, addr, &tables));
        assert_eq!(diag::inode(local, addr, Proto::Tcp), None);
    }

    #[test]
    fn proc_net_addresses_decode_in_host_order() {
        let a: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        assert!(same("0100007F:0C38", a));
        assert!(!same("0100007F:0C39", a));
        assert!(!same("0200007F:0C38", a));
        // ::ffff:127.0.0.1 in tcp6.
        assert!(same("0000000000000000FFFF00000100007F:0C38", a));
        assert!(!same("garbage", a));
    }

    #[test]
    fn our_own_connection_is_traced_to_this_test_binary() {
        // A client socket held by a child process: its chain names the
        // child's executable (not argv) with a hash of the file.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket,sys,time; s=socket.create_connection(('127.0.0.1',{})); print(s.getsockname()[1], flush=True); time.sleep(30)",
                    addr.port()
                ),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (_conn, peer) = server.accept().unwrap();
        let found = of_connection(peer, addr);
        let _ = child.kill();
        let _ = child.wait();
        let first = found.first().expect("the caller is found");
        assert!(first.path.contains("python3"), "{found:?}");
        assert_eq!(first.sha256.len(), 64, "{found:?}");
        let real = std::fs::canonicalize("/proc/self/exe").unwrap();
        // Its parent is this test process, where the chain stops.
        assert!(
            found.iter().all(|b| std::path::Path::new(&b.path) != real),
            "{found:?}"
        );
    }
}
