//! Issue 16: a sandbox rooted in an image: the layers stacked read-only
//! under a writable layer of its own, image ids shifted by one inside.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::harness::Sandbox;

/// Copies a host program and the shared libraries `ldd` names into `root`,
/// at the same paths: enough userland for a test image.
fn install_program(root: &Path, program: &str) {
    let ldd = Command::new("ldd").arg(program).output().unwrap();
    let libs = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    for path in libs.iter().map(String::as_str).chain([program]) {
        let real = fs::canonicalize(path).unwrap();
        let to = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&real, &to).unwrap();
    }
}

/// Three layers, as the image store leaves them: raw image ids, overlayfs
/// whiteouts and opaque markers.
fn layers(base: &Path) -> Vec<PathBuf> {
    let [l1, l2, l3] = ["l1", "l2", "l3"].map(|n| base.join(n));
    install_program(&l1, "/bin/sh");
    install_program(&l1, "/usr/bin/stat");
    fs::create_dir_all(l1.join("etc")).unwrap();
    fs::write(l1.join("etc/hello"), "from the image\n").unwrap();
    fs::create_dir_all(l1.join("data/old")).unwrap();
    fs::write(l1.join("data/gone"), "whited out above\n").unwrap();
    fs::write(l1.join("data/old/hidden"), "under an opaque dir\n").unwrap();

    fs::create_dir_all(l2.join("home/app")).unwrap();
    fs::write(l2.join("home/app/secret"), "1234's\n").unwrap();
    chown(l2.join("home/app/secret"), Some(1234), Some(1234)).unwrap();
    fs::set_permissions(
        l2.join("home/app/secret"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();

    fs::create_dir_all(l3.join("data/old")).unwrap();
    let whiteout = Command::new("mknod")
        .arg(l3.join("data/gone"))
        .args(["c", "0", "0"])
        .status()
        .unwrap();
    assert!(whiteout.success());
    let opaque = Command::new("setfattr")
        .args(["-n", "user.overlay.opaque", "-v", "y"])
        .arg(l3.join("data/old"))
        .status();
    assert!(
        opaque.is_ok_and(|s| s.success()),
        "setfattr (package attr) is needed"
    );
    vec![l1, l2, l3]
}

fn image_sandbox(script: &str, layers: &[PathBuf]) -> Sandbox {
    let mut sandbox = Sandbox::new(script);
    let state = sandbox.dir.path().join("state");
    sandbox.set(
        "image",
        json!({
            "layers": layers,
            "upper": state.join("upper"),
            "work": state.join("work"),
        }),
    );
    sandbox
}

#[test]
fn issue_16_an_image_root_shows_its_layers_with_ids_shifted_and_writes_land_in_the_sandboxs_layer()
{
    let images = tempfile::tempdir().unwrap();
    let layers = layers(images.path());
    let script = "
        read line < /etc/hello; echo \"hello: $line\"
        [ -e /data/gone ] && echo 'gone: present' || echo 'gone: absent'
        [ -e /data/old/hidden ] && echo 'opaque: leaks' || echo 'opaque: hidden'
        echo \"secret: $(stat -c '%u:%g %a' /home/app/secret)\"
        echo \"etc: $(stat -c '%u' /etc)\"
        echo \"root: $(stat -c '%u' /)\"
        echo new > /etc/written
        echo appended >> /etc/hello
        [ -e /usr/lib/os-release ] && echo 'host usr: visible' || echo 'host usr: not visible'
    ";
    let sandbox = image_sandbox(script, &layers);
    let out = sandbox.run();
    assert_eq!(out.code, Some(0), "{out:?}");
    let text = out.stdout_text();
    for want in [
        "hello: from the image",
        "gone: absent",
        "opaque: hidden",
        "secret: 1235:1235 750",
        "etc: 1",
        "root: 1",
        "host usr: not visible",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text}");
    }
    // Writes went to the sandbox's own layer, owned as inside; the shared
    // layer is untouched.
    let upper = sandbox.dir.path().join("state/upper");
    let written = fs::metadata(upper.join("etc/written")).unwrap();
    assert_eq!(
        written.uid(),
        sandbox.uid_base,
        "the writer was the sandbox's root"
    );
    let copied = fs::metadata(upper.join("etc/hello")).unwrap();
    assert_eq!(
        copied.uid(),
        sandbox.uid_base + 1,
        "a copy-up keeps the image's owner"
    );
    assert_eq!(
        fs::read_to_string(layers[0].join("etc/hello")).unwrap(),
        "from the image\n"
    );
    assert!(!layers[0].join("etc/written").exists());
}

#[test]
fn issue_16_two_sandboxes_share_the_layers_and_each_keeps_its_own_writes() {
    let images = tempfile::tempdir().unwrap();
    let layers = layers(images.path());
    let first = image_sandbox("echo one > /mine; read x < /mine; echo $x", &layers);
    let second = image_sandbox("[ -e /mine ] && echo leaked || echo clean", &layers);
    let out = first.run();
    assert_eq!(
        (out.code, out.stdout_text()),
        (Some(0), "one".into()),
        "{out:?}"
    );
    let out = second.run();
    assert_eq!(
        (out.code, out.stdout_text()),
        (Some(0), "clean".into()),
        "{out:?}"
    );
    // Relaunching the first keeps its layer (a restart or a resume).
    let again = first.run();
    assert_eq!(again.code, Some(0), "{again:?}");
    let upper = first.dir.path().join("state/upper/mine");
    assert_eq!(fs::read_to_string(upper).unwrap(), "one\n");
}

#[test]
fn issue_16_an_image_with_a_symlink_where_the_sandbox_mounts_is_refused() {
    let images = tempfile::tempdir().unwrap();
    let mut layers = layers(images.path());
    let evil = images.path().join("evil");
    fs::create_dir_all(&evil).unwrap();
    std::os::unix::fs::symlink("/etc", evil.join("sandbox")).unwrap();
    layers.push(evil);
    let out = image_sandbox("echo ran", &layers).run();
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("symlink at /sandbox"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{out:?}");
}
