//! Pulls from a real registry on loopback.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use openshell_image::{ImageError, PullOptions, PullProgress};

use crate::fixture::{self, TestImage, standard_layers};
use crate::registry::{Registry, free_port};
use crate::{is_root, listing, new_store};

fn insecure(registry: &Registry) -> PullOptions {
    PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..PullOptions::default()
    }
}

fn quiet(_: PullProgress) {}

/// A registry holding the standard image as `team/app:v1`.
async fn registry_with_standard(auth: Option<(&str, &str)>) -> Option<(Registry, TestImage)> {
    if !is_root() {
        return None;
    }
    let registry = Registry::start(auth)?;
    let image = TestImage::standard();
    registry.push("team/app:v1", &image).await;
    Some((registry, image))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_stores_what_an_import_of_the_same_image_stores() {
    let Some((registry, image)) = registry_with_standard(None).await else {
        return;
    };
    let (pdir, pulled) = new_store();
    let progress = Mutex::new(Vec::new());
    let started = Instant::now();
    let p = pulled
        .pull(
            &registry.reference("team/app:v1"),
            &insecure(&registry),
            &|p| progress.lock().unwrap().push(p),
        )
        .await
        .unwrap();
    eprintln!(
        "pull of the 3-layer test image over loopback: {:?}",
        started.elapsed()
    );
    assert_eq!(p.names, vec![registry.reference("team/app:v1")]);
    assert_eq!(p.digest.to_string(), image.digest());

    let layout = tempfile::tempdir().unwrap();
    image.write_oci_layout(layout.path(), None);
    let (idir, imported) = new_store();
    let i = imported.import(layout.path(), Some("team/app:v1")).unwrap();
    assert_eq!(
        (&p.digest, &p.layers, &p.config, p.size),
        (&i.digest, &i.layers, &i.config, i.size)
    );
    for sub in ["layers", "blobs"] {
        assert_eq!(
            listing(&pdir.path().join("images").join(sub)),
            listing(&idir.path().join("images").join(sub)),
            "{sub} differ"
        );
    }

    let progress = progress.into_inner().unwrap();
    let last = *progress.last().unwrap();
    let total: u64 = image.layers.iter().map(|l| l.blob.len() as u64).sum();
    assert_eq!(
        last,
        PullProgress {
            layers_done: 3,
            layers_total: 3,
            bytes_done: total,
            bytes_total: total
        }
    );
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pulls_at_once_download_each_blob_once() {
    let Some((registry, image)) = registry_with_standard(None).await else {
        return;
    };
    let (_d, store) = new_store();
    let reference = registry.reference("team/app:v1");
    let opts = insecure(&registry);
    let (a, b) = tokio::join!(
        store.pull(&reference, &opts, &quiet),
        store.pull(&reference, &opts, &quiet)
    );
    assert_eq!(a.unwrap().digest, b.unwrap().digest);
    let gets = registry.blob_gets();
    for (digest, _) in image.blobs().iter().rev().skip(1) {
        assert_eq!(
            gets.get(digest),
            Some(&1),
            "{digest} fetched {:?} times",
            gets.get(digest)
        );
    }
    // And a third pull of the tag fetches no blob at all.
    store.pull(&reference, &opts, &quiet).await.unwrap();
    assert_eq!(registry.blob_gets(), gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_digest_needs_no_registry_but_a_tag_is_resolved_again() {
    let Some((registry, image)) = registry_with_standard(None).await else {
        return;
    };
    let (_d, store) = new_store();
    let opts = insecure(&registry);
    let by_digest = registry.reference(&format!("team/app@{}", image.digest()));
    let tag = registry.reference("team/app:v1");
    store.pull(&by_digest, &opts, &quiet).await.unwrap();
    store.pull(&tag, &opts, &quiet).await.unwrap();
    drop(registry);
    let again = store.pull(&by_digest, &opts, &quiet).await.unwrap();
    assert_eq!(again.digest.to_string(), image.digest());
    assert!(matches!(
        store.pull(&tag, &opts, &quiet).await,
        Err(ImageError::Unreachable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_resolved_to_its_amd64_image_or_no_platform() {
    let Some((registry, amd64)) = registry_with_standard(None).await else {
        return;
    };
    let arm64 = TestImage::for_arch(standard_layers(), "arm64");
    registry.push("team/app:arm64", &arm64).await;
    let index = registry
        .push_index("team/app:multi", &[(&arm64, "arm64"), (&amd64, "amd64")])
        .await;
    registry
        .push_index("team/app:armonly", &[(&arm64, "arm64")])
        .await;
    let (dir, store) = new_store();
    let opts = insecure(&registry);

    let before = listing(&dir.path().join("images"));
    match store
        .pull(&registry.reference("team/app:armonly"), &opts, &quiet)
        .await
    {
        Err(ImageError::NoPlatform {
            wanted, available, ..
        }) => {
            assert_eq!(wanted, "linux/amd64");
            assert_eq!(available, vec!["linux/arm64".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&dir.path().join("images")), before);
    // A single-platform image for another platform is refused too.
    assert!(matches!(
        store
            .pull(&registry.reference("team/app:arm64"), &opts, &quiet)
            .await,
        Err(ImageError::NoPlatform { .. })
    ));

    let got = store
        .pull(&registry.reference("team/app:multi"), &opts, &quiet)
        .await
        .unwrap();
    assert_eq!(got.digest.to_string(), amd64.digest());
    let pinned = registry.reference(&format!("team/app@{}", fixture::sha(&index)));
    let got = store.pull(&pinned, &opts, &quiet).await.unwrap();
    assert_eq!(got.digest.to_string(), amd64.digest());
    assert!(got.names.contains(&pinned));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nobody_listens_on_is_unreachable() {
    if !is_root() {
        return;
    }
    let (_d, store) = new_store();
    let addr = format!("127.0.0.1:{}", free_port());
    for opts in [
        PullOptions::default(),
        PullOptions {
            insecure_registries: vec![addr.clone()],
            ..PullOptions::default()
        },
    ] {
        match store
            .pull(&format!("{addr}/team/app:v1"), &opts, &quiet)
            .await
        {
            Err(ImageError::Unreachable { registry, .. }) => assert_eq!(registry, addr),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_registry_not_listed_insecure_is_refused() {
    let Some((registry, _)) = registry_with_standard(None).await else {
        return;
    };
    let (_d, store) = new_store();
    match store
        .pull(
            &registry.reference("team/app:v1"),
            &PullOptions::default(),
            &quiet,
        )
        .await
    {
        Err(ImageError::InsecureRefused { registry: r }) => assert_eq!(r, registry.addr),
        other => panic!("{other:?}"),
    }
    let other = PullOptions {
        insecure_registries: vec!["127.0.0.1:1".into()],
        ..PullOptions::default()
    };
    assert!(matches!(
        store
            .pull(&registry.reference("team/app:v1"), &other, &quiet)
            .await,
        Err(ImageError::InsecureRefused { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_takes_the_right_credentials_only() {
    let Some((registry, image)) = registry_with_standard(Some(("alice", "right"))).await else {
        return;
    };
    let (dir, store) = new_store();
    let reference = registry.reference("team/app:v1");
    let with = |auth: Option<(&str, &str)>| PullOptions {
        auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        ..insecure(&registry)
    };
    let before = listing(&dir.path().join("images"));
    match store
        .pull(&reference, &with(Some(("alice", "wrong"))), &quiet)
        .await
    {
        Err(ImageError::Unauthorized {
            with_credentials, ..
        }) => assert!(with_credentials),
        other => panic!("{other:?}"),
    }
    match store.pull(&reference, &with(None), &quiet).await {
        Err(ImageError::Unauthorized {
            with_credentials, ..
        }) => assert!(!with_credentials),
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&dir.path().join("images")), before);
    let got = store
        .pull(&reference, &with(Some(("alice", "right"))), &quiet)
        .await
        .unwrap();
    assert_eq!(got.digest.to_string(), image.digest());

    // The same credentials from a docker config.json.
    let (_d2, store2) = new_store();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    let auth = "YWxpY2U6cmlnaHQ="; // base64("alice:right")
    std::fs::write(
        cfg.path(),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let opts = PullOptions {
        docker_config: Some(cfg.path().to_path_buf()),
        ..insecure(&registry)
    };
    assert_eq!(
        store2.pull(&reference, &opts, &quiet).await.unwrap().digest,
        got.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_corrupted_in_the_registry_is_a_digest_mismatch_and_changes_nothing() {
    let Some((registry, image)) = registry_with_standard(None).await else {
        return;
    };
    let blob = fixture::sha(&image.layers[2].blob);
    let data = registry.blob_data(&blob);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let (dir, store) = new_store();
    let before = listing(&dir.path().join("images"));
    match store
        .pull(
            &registry.reference("team/app:v1"),
            &insecure(&registry),
            &quiet,
        )
        .await
    {
        Err(ImageError::DigestMismatch { expected, .. }) => assert_eq!(expected.to_string(), blob),
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&dir.path().join("images")), before);
    // The good layers pulled before the bad one were not kept either.
    store.gc(&HashSet::new()).unwrap();
    assert_eq!(listing(&dir.path().join("images")), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_that_is_not_one_is_refused_before_any_network() {
    if !is_root() {
        return;
    }
    let (_d, store) = new_store();
    match store
        .pull("Not A Reference", &PullOptions::default(), &quiet)
        .await
    {
        Err(e @ ImageError::InvalidReference { .. }) => {
            assert!(e.to_string().contains("Not A Reference"))
        }
        other => panic!("{other:?}"),
    }
}
