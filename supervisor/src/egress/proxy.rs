//! The HTTP proxy sandbox code is pointed at: `CONNECT host:port` (any
//! TCP, TLS included, end to end) and absolute-form requests
//! (`GET http://host/path`), each connection handed to the gateway. A
//! refusal answers at once: 403 with a JSON body naming the rule and the
//! destination, so a client fails fast and says why.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{EgressError, Refused, Uplink};

/// A request head larger than this is refused (431).
const MAX_HEAD: usize = 32 * 1024;
/// A request head must arrive within this.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Client connections served at once; past it a new one waits in the
/// listen queue. Bounds what sandbox code can make the supervisor hold
/// (each holds a head buffer; on a relay, at most 4 frames of 32 KiB each way).
const MAX_CLIENTS: usize = 1024;

/// Serves the proxy until the process ends.
pub async fn serve(listener: TcpListener, uplink: Uplink) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors: let some close.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let uplink = uplink.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            if let Err(e) = handle(stream, peer, &uplink).await {
                tracing::debug!(%peer, "proxy connection: {e}");
            }
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
struct Ask {
    host: String,
    port: u16,
    /// CONNECT: nothing to forward; else the head rewritten to origin
    /// form, to send upstream first.
    head: Option<Vec<u8>>,
}

/// A request we answer ourselves.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: &'static str,
    message: String,
}

fn refuse(status: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Splits `host:port` (a bracketed IPv6 literal too); `default` if no port.
fn authority(a: &str, default: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default?,
            None => return None,
        };
        (h.to_owned(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (a.to_owned(), default?),
        }
    };
    (!host.is_empty() && port != 0).then_some((host, port))
}

/// Reads what a head asks for. `Ok(None)`: the head is not complete yet.
fn parse(buf: &[u8]) -> Result<Option<(Ask, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(refuse(
                "400 Bad Request",
                format!("not an HTTP request: {e}"),
            ));
        }
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(target, None)
            .ok_or_else(|| refuse("400 Bad Request", "CONNECT needs host:port"))?;
        return Ok(Some((
            Ask {
                host,
                port,
                head: None,
            },
            len,
        )));
    }
    let Some(rest) = target.strip_prefix("http://") else {
        let why = if target.starts_with("https://") {
            "use CONNECT for https:// (set HTTPS_PROXY)"
        } else {
            "this is a proxy: send an absolute URL (http://host/path) or CONNECT"
        };
        return Err(refuse("400 Bad Request", why));
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let auth = auth.rsplit_once('@').map_or(auth, |(_, a)| a);
    let (host, port) =
        authority(auth, Some(80)).ok_or_else(|| refuse("400 Bad Request", "bad host in URL"))?;
    let mut head = format!("{method} {path} HTTP/1.{}\r\n", req.version.unwrap_or(1)).into_bytes();
    for h in req.headers.iter() {
        // Ours, not the origin's; and one request per connection: after
        // it the connection is a byte pipe to this destination, so a
        // second request (for another host) must not ride it.
        if h.name.eq_ignore_ascii_case("proxy-connection")
            || h.name.eq_ignore_ascii_case("proxy-authorization")
            || h.name.eq_ignore_ascii_case("connection")
            || h.name.eq_ignore_ascii_case("keep-alive")
        {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some((
        Ask {
            host,
            port,
            head: Some(head),
        },
        len,
    )))
}

async fn answer(client: &mut TcpStream, r: &Refusal, body: String) -> std::io::Result<()> {
    let out = format!(
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        r.status,
        body.len()
    );
    client.write_all(out.as_bytes()).await?;
    client.shutdown().await
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

async fn handle(mut client: TcpStream, peer: SocketAddr, uplink: &Uplink) -> std::io::Result<()> {
    let local = client.local_addr()?;
    let mut buf = Vec::with_capacity(4096);
    // A client that never finishes its head holds nothing for long.
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let (ask, used) = loop {
        let mut chunk = [0u8; 4096];
        let Ok(n) = tokio::time::timeout_at(deadline, client.read(&mut chunk)).await else {
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        // A head ends in a blank line: parse only once a line ended (a head
        // sent a byte at a time is not parsed once per byte).
        if !chunk[..n].contains(&b'\n') && buf.len() < MAX_HEAD {
            continue;
        }
        match parse(&buf) {
            Ok(Some(done)) => break done,
            Ok(None) if buf.len() < MAX_HEAD => continue,
            Ok(None) => {
                let r = refuse(
                    "431 Request Header Fields Too Large",
                    "the request head is too large",
                );
                let body = format!(
                    "{{\"error\":\"bad_request\",\"message\":\"{}\"}}",
                    r.message
                );
                return answer(&mut client, &r, body).await;
            }
            Err(r) => {
                let body = format!(
                    "{{\"error\":\"bad_request\",\"message\":\"{}\"}}",
                    json_escape(&r.message)
                );
                return answer(&mut client, &r, body).await;
            }
        }
    };
    let binaries = tokio::task::spawn_blocking(move || super::callers::of_connection(peer, local))
        .await
        .unwrap_or_default();
    let via = if ask.head.is_some() { "http" } else { "proxy" };
    let dest = format!("{}:{}", ask.host, ask.port);
    let (reply, mut first) = match ask.head {
        None => (
            b"HTTP/1.1 200 Connection Established\r\n\r\n".to_vec(),
            Vec::new(),
        ),
        Some(head) => (Vec::new(), head),
    };
    first.extend_from_slice(&buf[used..]);
    let open = super::Open {
        host: &ask.host,
        port: ask.port,
        via,
        binaries,
    };
    let Refused { mut client, error } = match super::carry(uplink, client, open, reply, first).await
    {
        Ok(verdict) => {
            tracing::debug!(%dest, addr = %verdict.addr, rule = %verdict.rule, "egress allowed");
            return Ok(());
        }
        Err(refused) => refused,
    };
    let (status, kind, rule) = match &error {
        EgressError::Denied { rule, .. } => ("403 Forbidden", "policy_denied", rule.clone()),
        _ => ("502 Bad Gateway", "egress_unavailable", String::new()),
    };
    let message = match &error {
        EgressError::Denied { reason, .. } | EgressError::Unreachable { reason } => reason.clone(),
        other => crate::report::chain(other),
    };
    let body = format!(
        "{{\"error\":\"{kind}\",\"destination\":\"{}\",\"rule\":\"{}\",\"message\":\"{}\"}}",
        json_escape(&dest),
        json_escape(&rule),
        json_escape(&message)
    );
    answer(&mut client, &refuse(status, message), body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_names_its_authority() {
        let (ask, used) = parse(b"CONNECT api.test:443 HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(
            (ask.host.as_str(), ask.port, ask.head),
            ("api.test", 443, None)
        );
        assert_eq!(used, 42, "the rest (`rest`) is not the head's");
        let (ask, _) = parse(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((ask.host.as_str(), ask.port), ("::1", 8443));
        assert_eq!(
            parse(b"CONNECT api.test HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            "400 Bad Request"
        );
        assert_eq!(
            parse(b"CONNECT api.test:0 HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            "400 Bad Request"
        );
    }

    #[test]
    fn absolute_form_is_rewritten_to_origin_form_without_proxy_headers() {
        let (ask, _) = parse(
            b"GET http://user@Web.Test:8080/a?b=1 HTTP/1.1\r\nHost: web.test:8080\r\nProxy-Connection: keep-alive\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((ask.host.as_str(), ask.port), ("Web.Test", 8080));
        assert_eq!(
            String::from_utf8(ask.head.unwrap()).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: web.test:8080\r\nConnection: close\r\n\r\n"
        );
        let (ask, _) = parse(b"GET http://web.test HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(ask.port, 80);
        assert!(ask.head.unwrap().starts_with(b"GET / HTTP/1.0\r\n"));
    }

    #[test]
    fn what_a_proxy_cannot_serve_is_refused_with_the_fix() {
        assert!(
            parse(b"GET /x HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .message
                .contains("absolute URL")
        );
        assert!(
            parse(b"GET https://a/ HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .message
                .contains("CONNECT")
        );
        assert!(parse(b"\x16\x03\x01garbage\r\n\r\n").is_err());
        assert_eq!(parse(b"GET http://a/ HTTP/1.1\r\nHost:").unwrap(), None);
    }
}
