//! Plugin host tests against real components built from `drivers/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openshell_core::Resources;
use openshell_plugin::{Capability, DriverSpec, PluginHost, PluginHostConfig};
use tokio::sync::mpsc;

mod children;

pub(crate) fn wasm(crate_name: &str) -> PathBuf {
    let dir = std::env::var_os("OPENSHELL_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
                .join("wasm32-wasip2/release")
        });
    let p = dir.join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        p.is_file(),
        "{} is missing: run `just drivers`",
        p.display()
    );
    p
}

fn host(state: &Path) -> PluginHost {
    let (tx, _rx) = mpsc::unbounded_channel();
    PluginHost::new(PluginHostConfig::new(state), tx).unwrap()
}

fn spec(id: &str) -> DriverSpec {
    DriverSpec {
        id: id.into(),
        name: "sb".into(),
        environment: vec![],
        resources: Resources::default(),
        uid_slot: Some(7),
        image: None,
    }
}

#[tokio::test]
async fn neither_files_nor_a_workdir_can_escape_the_sandbox_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let host = host(tmp.path());
    let bytes = std::fs::read(wasm("fixture-escape")).unwrap();
    let (plugin, _) = host
        .install(
            "escape",
            &bytes,
            &[Capability::Files, Capability::Image, Capability::Process],
        )
        .await
        .unwrap();

    // A secret next to the sandbox dirs, and a symlink inside the sandbox
    // pointing at it.
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("passwd"), "secret").unwrap();
    let id = "00000000-0000-4000-8000-000000000001";
    let sb_dir = host.sandbox_dir(id);
    std::fs::create_dir_all(&sb_dir).unwrap();
    std::os::unix::fs::symlink(&outside, sb_dir.join("link")).unwrap();

    let absolute = outside.join("escape.txt");
    let mut spec = spec(id);
    spec.environment
        .push(("ESCAPE_ABSOLUTE".into(), absolute.to_str().unwrap().into()));
    let out = plugin
        .create(&spec, "secret", &[])
        .await
        .expect("every escape is refused, so the fixture succeeds");
    assert_eq!(
        out.events,
        [openshell_core::Event::DriverProgress {
            message: "all escapes refused".into()
        }]
    );
    assert!(!tmp.path().join("escape.txt").exists());
    assert!(!absolute.exists());
    assert!(!tmp.path().join("sandboxes/b").exists());
}

#[tokio::test]
async fn a_calls_files_are_confined_to_its_own_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let host = host(tmp.path());
    let bytes = std::fs::read(wasm("fixture-echo")).unwrap();
    let (plugin, _) = host
        .install("echo", &bytes, &[Capability::Log, Capability::Files])
        .await
        .unwrap();
    for id in ["a", "b"] {
        plugin.create(&spec(id), "s", &[]).await.unwrap();
    }
    for id in ["a", "b"] {
        let f = host.sandbox_dir(id).join("hello.txt");
        assert_eq!(std::fs::read_to_string(f).unwrap(), "sb");
    }
}

#[tokio::test]
async fn a_restarted_host_loads_the_compiled_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(wasm("fixture-echo")).unwrap();
    let grants = [Capability::Log, Capability::Files];
    let path = {
        let host = host(tmp.path());
        let (p, _) = host.install("echo", &bytes, &grants).await.unwrap();
        p.path.clone()
    };
    let cached: Vec<_> = std::fs::read_dir(tmp.path().join("plugins/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].ends_with(".cwasm"));

    let host = Arc::new(host(tmp.path()));
    let p = host.load_stored("echo", &path, &grants).await.unwrap();
    assert_eq!(p.info.name, "fixture-echo");
    // Still usable, and a corrupted cache entry is recompiled, not trusted.
    let entry = tmp.path().join("plugins/cache").join(&cached[0]);
    std::fs::write(&entry, b"garbage").unwrap();
    let p = host.load_stored("echo", &path, &grants).await.unwrap();
    assert_eq!(p.info.name, "fixture-echo");
}
