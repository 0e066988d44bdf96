//! Issue 16: process sandboxes rooted in OCI images, pulled from a real
//! registry on loopback (Debian's `docker-registry`) or imported from an
//! OCI layout or a `docker save` tarball, through the CLI and a real
//! gateway.

use std::path::Path;
use std::time::{Duration, Instant};

use openshell_image::testing::fixture::{Comp, Entry, Layer, TestImage, dir, file, host_userland};
use openshell_image::testing::registry::Registry;
use tempfile::TempDir;

use crate::harness::{Gateway, Run, run, wasm};

/// The issue's image: a userland and the files below in layer 1, a file
/// owned by 1234 (0750) and a root-only 0700 directory in layer 2, a
/// whiteout in layer 3; `User` 1234, `WorkingDir` /home/app.
pub(crate) fn test_image() -> TestImage {
    let mut l1: Vec<Entry> = host_userland(&[
        "/bin/sh",
        "/usr/bin/id",
        "/usr/bin/cat",
        "/usr/bin/stat",
        "/usr/bin/ls",
        "/usr/bin/pwd",
        "/usr/bin/sync",
        "/usr/bin/rm",
    ]);
    l1.extend([
        dir("etc/", 0o755),
        file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n",
            0o644,
        ),
        file("etc/group", b"root:x:0:\napp:x:1234:\n", 0o644),
        file("etc/hello", b"from the image\n", 0o644),
        dir("data/", 0o755),
        file("data/gone", b"whited out above\n", 0o644),
        dir("tmp/", 0o1777),
    ]);
    let l2 = vec![
        dir("home/", 0o755),
        dir("home/app/", 0o755).owner(1234, 1234),
        file("home/app/secret", b"1234's\n", 0o750).owner(1234, 1234),
        dir("root-only/", 0o700),
        file("root-only/file", b"root's\n", 0o600),
    ];
    let l3 = vec![dir("data/", 0o755), file("data/.wh.gone", b"", 0o644)];
    TestImage::new(vec![
        Layer::new(&l1, Comp::Gzip),
        Layer::new(&l2, Comp::Zstd),
        Layer::new(&l3, Comp::None),
    ])
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A process-driver gateway on a state dir under `dir` that may pull from
/// `registry` over plain HTTP.
fn gateway(dir: &Path, registry: Option<&Registry>, extra: &[&str]) -> Gateway {
    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    let mut args = vec!["--drivers", "process", "--driver-dir", &driver_dir];
    if let Some(r) = registry {
        args.extend(["--insecure-registry", &r.addr]);
    }
    args.extend_from_slice(extra);
    Gateway::start(dir, &args)
}

/// A fresh gateway in `dir` with `image` imported (as an OCI layout) under
/// `name`, and a sandbox `sandbox` rooted in it.
fn imported(dir: &Path, image: &TestImage, name: &str, sandbox: &str) -> Gateway {
    let layout = dir.join("layout");
    image.write_oci_layout(&layout, Some(name));
    let gw = gateway(dir, None, &[]);
    gw.ok(["image", "import", layout.to_str().unwrap()]);
    gw.ok(["sandbox", "create", "--name", sandbox, "--image", name]);
    gw
}

pub(crate) fn exec(gw: &Gateway, name: &str, script: &str) -> Run {
    run(gw.cli(["sandbox", "exec", name, "--", "sh", "-c", script]))
}

/// What the issue asks of a sandbox rooted in the test image.
pub(crate) fn check_rooted_in_the_test_image(gw: &Gateway, name: &str) {
    let script = "
        echo \"hello: $(cat /etc/hello)\"
        [ -e /data/gone ] && echo 'gone: present' || echo 'gone: absent'
        echo \"secret: $(stat -c '%u:%g %a' /home/app/secret)\"
        echo \"root-only: $(stat -c '%u:%g %a' /root-only)\"
        echo \"uid: $(id -u) gid: $(id -g)\"
        echo \"pwd: $(pwd)\"
        echo \"greeting: $GREETING\"
        cat /root-only/file 2>/dev/null && echo 'root-only: readable' || echo 'root-only: refused'
        [ -e /usr/lib/os-release ] && echo 'host: visible' || echo 'host: hidden'
    ";
    let run = exec(gw, name, script);
    assert!(run.success, "{run}");
    for want in [
        "hello: from the image",
        "gone: absent",
        "secret: 1234:1234 750",
        "root-only: 0:0 700",
        "uid: 1234 gid: 1234",
        "pwd: /home/app",
        "greeting: hello world",
        "root-only: refused",
        "host: hidden",
    ] {
        assert!(run.stdout.contains(want), "{want:?} missing:\n{run}");
    }
}

pub(crate) fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

/// Files and bytes under the image store's unpacked layers.
fn layers_on_disk(state: &Path) -> (usize, u64) {
    fn walk(dir: &Path, out: &mut (usize, u64)) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            out.0 += 1;
            out.1 += m.len();
            if m.is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = (0, 0);
    walk(&state.join("images/layers"), &mut out);
    out
}

#[test]
fn issue_16_a_pulled_image_roots_a_process_sandbox_with_its_files_owners_and_user() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let image = test_image();
    block_on(registry.push("team/app:v1", &image));
    let dir = TempDir::new().unwrap();
    let gw = gateway(dir.path(), Some(&registry), &[]);
    let reference = registry.reference("team/app:v1");

    gw.ok([
        "sandbox", "create", "--name", "pulled", "--image", &reference,
    ]);
    check_rooted_in_the_test_image(&gw, "pulled");
    let sb = json(&gw.ok(["sandbox", "get", "pulled", "-o", "json"]));
    assert_eq!(sb["image"], reference.as_str(), "{sb}");
    assert_eq!(sb["image_digest"], image.digest().as_str(), "{sb}");
    let get = gw.ok(["sandbox", "get", "pulled"]);
    assert!(get.stdout.contains(&image.digest()), "{get}");

    // Item 4: a second sandbox of the image adds only its own layer.
    let state = dir.path().join("state");
    let before = layers_on_disk(&state);
    gw.ok([
        "sandbox", "create", "--name", "second", "--image", &reference,
    ]);
    exec(
        &gw,
        "second",
        "echo mine > /home/app/new 2>/dev/null; echo x > /tmp/x",
    );
    assert_eq!(layers_on_disk(&state), before, "the layers are shared");
    eprintln!(
        "issue 16 item 4: the image's layers hold {} entries, {} bytes; a second sandbox added none",
        before.0, before.1
    );

    let list = json(&gw.ok(["image", "list", "-o", "json"]));
    let users = &list["images"][0]["sandboxes"];
    assert_eq!(users.as_array().map(Vec::len), Some(2), "{list}");
    let refused = gw.fails(["image", "rm", &reference]);
    assert!(refused.stderr.contains("use image"), "{refused}");

    // Deleting both and then the image leaves an empty store.
    gw.ok(["sandbox", "delete", "pulled", "second"]);
    gw.ok(["image", "rm", &reference]);
    let left = std::fs::read_dir(state.join("images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "every layer garbage collected");
}

#[test]
fn issue_16_an_image_imported_from_an_oci_layout_or_a_docker_save_tarball_behaves_the_same() {
    let dir = TempDir::new().unwrap();
    let image = test_image();
    let layout = dir.path().join("layout");
    image.write_oci_layout(&layout, Some("example.com/team/app:layout"));
    let tarball = dir.path().join("saved.tar");
    image.write_docker_save(&tarball, &["example.com/team/app:saved"]);
    let gw = gateway(dir.path(), None, &[]);

    let imported = gw.ok(["image", "import", layout.to_str().unwrap(), "-o", "json"]);
    assert_eq!(
        json(&imported)["images"][0]["digest"],
        image.digest().as_str()
    );
    gw.ok(["image", "import", tarball.to_str().unwrap()]);
    let names = gw.ok(["image", "list"]).stdout;
    for name in ["example.com/team/app:layout", "example.com/team/app:saved"] {
        assert!(names.contains(name), "{name} not listed:\n{names}");
    }
    for (sandbox, image) in [
        ("from-layout", "example.com/team/app:layout"),
        ("from-saved", "example.com/team/app:saved"),
    ] {
        gw.ok(["sandbox", "create", "--name", sandbox, "--image", image]);
        check_rooted_in_the_test_image(&gw, sandbox);
    }
}

#[test]
fn issue_16_a_file_written_in_an_image_sandbox_survives_a_sigkilled_gateway() {
    let dir = TempDir::new().unwrap();
    let image = test_image();
    let gw = imported(dir.path(), &image, "example.com/team/app:v1", "kept");
    let wrote = exec(
        &gw,
        "kept",
        "echo in-the-layer > /home/app/note && echo in-sandbox > /sandbox/f",
    );
    assert!(wrote.success, "{wrote}");

    crate::restart::sigkill(gw.pid());
    drop(gw);
    let gw = gateway(dir.path(), None, &[]);
    let started = Instant::now();
    loop {
        let sb = json(&gw.ok(["sandbox", "get", "kept", "-o", "json"]));
        if sb["phase"] == "Ready" {
            assert_eq!(sb["image_digest"], image.digest().as_str(), "{sb}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not Ready after the restart: {sb}\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let read = exec(&gw, "kept", "cat /home/app/note /sandbox/f; id -u");
    assert_eq!(read.stdout, "in-the-layer\nin-sandbox\n1234\n", "{read}");
}

/// Issue 17: what sandbox code writes over its image lands in the
/// overlay's upper layer, in the sandbox's state dir, so it counts against
/// the sandbox's own disk size like anything else it stores.
#[test]
fn issue_17_writes_over_an_image_count_against_the_sandboxs_disk_size() {
    let mut l1 = host_userland(&["/bin/sh", "/usr/bin/dd", "/usr/bin/stat", "/usr/bin/sync"]);
    l1.extend([
        dir("home/", 0o755),
        dir("home/app/", 0o755).owner(1234, 1234),
    ]);
    let image = TestImage::new(vec![Layer::new(&l1, Comp::Gzip)]);
    let tmp = TempDir::new().unwrap();
    let layout = tmp.path().join("layout");
    image.write_oci_layout(&layout, Some("example.com/filler:v1"));
    let gw = gateway(tmp.path(), None, &[]);
    gw.ok(["image", "import", layout.to_str().unwrap()]);
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "over",
        "--image",
        "example.com/filler:v1",
        "--disk-gib",
        "1",
    ]);
    let stored = crate::resources::fill_until_refused(&gw, "over", "/home/app/fill", 1100);
    assert!(
        (900..=1024).contains(&stored),
        "{stored} MiB stored over the image under a 1 GiB disk"
    );
    let alive = exec(&gw, "over", "echo alive");
    assert_eq!(alive.stdout, "alive\n", "{alive}");
}

/// Item 5: each way a create's image can fail fails the create with a
/// message naming the cause, and leaves the image store and the sandbox
/// table as they were.
#[test]
fn issue_16_every_image_failure_fails_the_create_clearly_and_changes_nothing() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let Some(private) = Registry::start(Some(("alice", "right"))) else {
        return;
    };
    let good = test_image();
    block_on(registry.push("team/app:v1", &good));
    block_on(private.push("team/app:v1", &good));
    // An index with only an arm64 image.
    let arm = TestImage::for_arch(good_layers(), "arm64");
    block_on(registry.push("team/arm:only", &arm));
    block_on(registry.push_index("team/arm:index", &[(&arm, "arm64")]));
    // A layer that escapes its root, and one with an id past the range.
    let escape = TestImage::new(vec![Layer::new(
        &[file("../../escaped", b"x", 0o644)],
        Comp::None,
    )]);
    block_on(registry.push("team/escape:v1", &escape));
    let big_uid = TestImage::new(vec![Layer::new(
        &[file("f", b"x", 0o644).owner(70000, 0)],
        Comp::None,
    )]);
    block_on(registry.push("team/uid:v1", &big_uid));
    let corrupt = TestImage::new(vec![Layer::new(
        &[file("only-in-corrupt", b"x", 0o644)],
        Comp::Gzip,
    )]);
    block_on(registry.push("team/corrupt:v1", &corrupt));
    let layer_digest = openshell_image::testing::fixture::sha(&corrupt.layers[0].blob);
    // Same length: the registry serves it whole, and only its digest tells.
    let tampered = vec![b'x'; corrupt.layers[0].blob.len()];
    std::fs::write(registry.blob_data(&layer_digest), tampered).unwrap();

    let dir = TempDir::new().unwrap();
    let gw = gateway(
        dir.path(),
        Some(&registry),
        &["--insecure-registry", &private.addr],
    );
    // One good sandbox and one stored image, which must stay as they are.
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "bystander",
        "--image",
        &registry.reference("team/app:v1"),
    ]);
    let sandboxes = gw.ok(["sandbox", "list", "--names"]).stdout;
    let images = gw.ok(["image", "list", "-o", "json"]).stdout;
    let layers = layers_on_disk(&dir.path().join("state"));

    let dead = format!(
        "127.0.0.1:{}",
        openshell_image::testing::registry::free_port()
    );
    let cases = [
        ("UPPER/Case::bad", "not a valid image reference"),
        (&*format!("{}/team/app:nope", registry.addr), "has no image"),
        (&*format!("{dead}/team/app:v1"), "cannot be reached"),
        (
            &*private.reference("team/app:v1"),
            "refused anonymous access",
        ),
        (
            &*registry.reference("team/arm:index"),
            "no image for linux/amd64",
        ),
        (&*registry.reference("team/escape:v1"), "outside the layer"),
        (&*registry.reference("team/uid:v1"), "70000"),
        (&*registry.reference("team/corrupt:v1"), "digest"),
    ];
    for (reference, why) in cases {
        let failed = gw.fails(["sandbox", "create", "--image", reference, "--", "true"]);
        assert!(
            failed.stderr.contains(why),
            "{reference}: {why:?} missing from the error:\n{failed}"
        );
        assert_eq!(
            gw.ok(["sandbox", "list", "--names"]).stdout,
            sandboxes,
            "{reference}"
        );
        assert_eq!(
            gw.ok(["image", "list", "-o", "json"]).stdout,
            images,
            "{reference}"
        );
        assert_eq!(
            layers_on_disk(&dir.path().join("state")),
            layers,
            "{reference}"
        );
    }
    // A registry not listed as insecure is HTTPS only; wrong credentials
    // are told apart from none.
    let dir2 = TempDir::new().unwrap();
    let strict = gateway(
        dir2.path(),
        None,
        &[
            "--insecure-registry",
            &private.addr,
            "--registry-auth",
            "alice:wrong",
        ],
    );
    let failed = strict.fails(["image", "pull", &registry.reference("team/app:v1")]);
    assert!(failed.stderr.contains("plain HTTP"), "{failed}");
    let failed = strict.fails(["image", "pull", &private.reference("team/app:v1")]);
    assert!(
        failed.stderr.contains("refused these credentials"),
        "{failed}"
    );
    assert_eq!(
        strict.ok(["image", "list", "-o", "json"]).stdout,
        r#"{
  "images": []
}
"#
    );
    // The bystander still runs from its image.
    check_rooted_in_the_test_image(&gw, "bystander");
}

/// A one-layer image with `programs`, a passwd naming only root, and
/// `extra`; its config sets no `User`, so sandbox code is the image's root.
pub(crate) fn rootless_image(programs: &[&str], extra: Vec<Entry>) -> TestImage {
    let mut l1 = host_userland(programs);
    l1.extend([
        dir("etc/", 0o755),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        dir("root/", 0o700),
    ]);
    l1.extend(extra);
    let layers = vec![Layer::new(&l1, Comp::Gzip)];
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| openshell_image::testing::fixture::sha(&l.tar))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    TestImage::with_config(layers, config)
}

fn good_layers() -> Vec<Layer> {
    test_image().layers
}

/// Attack, from sandbox code that is root of an image (no `User`): it owns
/// the image's files, and nothing of its supervisor, its network or the
/// host.
#[test]
fn issue_16_root_of_an_image_owns_its_files_but_not_its_supervisor_network_or_namespaces() {
    let image = rootless_image(
        &["/bin/sh", "/usr/bin/id", "/usr/bin/cat", "/usr/bin/unshare"],
        vec![],
    );
    let dir = TempDir::new().unwrap();
    let gw = imported(dir.path(), &image, "example.com/rooty:v1", "rooty");
    let script = "
        echo \"uid: $(id -u) home: $HOME pwd: $(pwd)\"
        echo written > /etc/mine && echo 'image files: writable'
        kill -9 1 2>/dev/null && echo 'init: killed' || echo 'init: refused'
        kill -9 2 2>/dev/null && echo 'supervisor: killed' || echo 'supervisor: refused'
        echo x > /run/openshell/planted 2>/dev/null && echo 'run dir: writable' || echo 'run dir: refused'
        cat /proc/2/environ >/dev/null 2>&1 && echo 'environ: read' || echo 'environ: refused'
        unshare -n true 2>/dev/null && echo 'netns: made' || echo 'netns: refused'
        unshare -m true 2>/dev/null && echo 'mountns: made' || echo 'mountns: refused'
        unshare -U true 2>/dev/null && echo 'userns: made' || echo 'userns: refused'
    ";
    let run = exec(&gw, "rooty", script);
    for want in [
        "uid: 0 home: /root pwd: /sandbox",
        "image files: writable",
        "init: refused",
        "supervisor: refused",
        "run dir: refused",
        "environ: refused",
        "netns: refused",
        "mountns: refused",
        "userns: refused",
    ] {
        assert!(run.stdout.contains(want), "{want:?} missing:\n{run}");
    }
    // The sandbox still serves.
    let again = exec(&gw, "rooty", "cat /etc/mine");
    assert_eq!(again.stdout, "written\n", "{again}");
}
