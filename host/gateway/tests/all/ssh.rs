//! SshTunnel and GetSshHostKey over the gateway's real TCP socket, against
//! a real process sandbox. (`ssh` and `scp` themselves run in the CLI
//! tests; here the client speaks the SSH version exchange by hand.)

use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::ssh_tunnel_frame::Frame as T;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::harness::TestGateway;
use crate::process::{process_gateway, ready};

fn data(b: &[u8]) -> pb::SshTunnelFrame {
    pb::SshTunnelFrame {
        frame: Some(T::Data(b.to_vec().into())),
    }
}

#[tokio::test]
async fn a_tunnel_reaches_the_sandboxs_ssh_server_and_the_host_key_is_the_one_it_reported() {
    let mut gw = process_gateway().await;
    let sb = ready(&mut gw, "tun", 0).await;

    let key = gw
        .client
        .get_ssh_host_key(pb::GetSshHostKeyRequest { name: "tun".into() })
        .await
        .unwrap()
        .into_inner()
        .host_key;
    assert!(key.starts_with("ssh-ed25519 AAAA"), "{key}");
    let by_id = gw
        .client
        .get_ssh_host_key(pb::GetSshHostKeyRequest { name: sb.id })
        .await
        .unwrap()
        .into_inner()
        .host_key;
    assert_eq!(by_id, key);

    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SshTunnelFrame {
        frame: Some(T::Sandbox("tun".into())),
    })
    .await
    .unwrap();
    tx.send(data(b"SSH-2.0-test\r\n")).await.unwrap();
    let mut stream = gw
        .client
        .ssh_tunnel(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let f = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the server speaks within 10 s")
            .unwrap()
            .expect("the tunnel stays open");
        if let Some(T::Data(b)) = f.frame {
            got.extend(b);
        }
    }
    assert!(
        got.starts_with(b"SSH-2.0-"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Closing our half ends the SSH session, and then the stream, cleanly.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the tunnel closes within 10 s");
    assert!(end.is_ok(), "{end:?}");
    assert_eq!(gw.runtime().supervisors().relays().pending(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn without_a_supervisor_there_is_no_host_key_and_no_tunnel() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.create("nosup", "echo").await.unwrap();

    let err = gw
        .client
        .get_ssh_host_key(pb::GetSshHostKeyRequest {
            name: "nosup".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("not connected"), "{err}");

    let tunnel = |first: T| {
        let mut c = gw.client.clone();
        async move {
            let frames = tokio_stream::iter([pb::SshTunnelFrame { frame: Some(first) }]);
            c.ssh_tunnel(frames).await.map(|_| ())
        }
    };
    let err = tunnel(T::Sandbox("nosup".into())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("not Ready"), "{err}");
    let err = tunnel(T::Data(b"SSH-2.0-x\r\n".to_vec().into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    gw.stop().await;
}
