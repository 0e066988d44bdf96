//! Issue 17: VM sandboxes rooted in images. The image's disk (ext4, built
//! once per image) is shared read-only; each sandbox writes to a disk of
//! its own that persists across gateway restarts.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openshell_image::testing::registry::Registry;

use crate::harness::Gateway;
use openshell_image::testing::fixture::TestImage;

use crate::images::{
    block_on, check_rooted_in_the_test_image, exec, json, rootless_image, test_image,
};
use crate::vm::{short_dir, start_vm_gateway, start_with_drivers, vm_runtime};

/// Bytes a file takes on the host's disk (sparse files count their data).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn sandbox_dir(gw: &Gateway, state: &Path, name: &str) -> PathBuf {
    let sb = json(&gw.ok(["sandbox", "get", name, "-o", "json"]));
    state.join("sandboxes").join(sb["id"].as_str().unwrap())
}

fn disks(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("images/disks/sha256"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A VM gateway on a fresh short dir with `image` imported as `name`, and
/// a sandbox `sandbox` rooted in it (created with `create` flags too).
pub(crate) fn vm_with_image(
    rt: &Path,
    image: &TestImage,
    name: &str,
    sandbox: &str,
    create: &[&str],
) -> (tempfile::TempDir, Gateway) {
    let dir = short_dir();
    let layout = dir.path().join("layout");
    image.write_oci_layout(&layout, Some(name));
    let gw = start_vm_gateway(dir.path(), rt, &[]);
    gw.ok(["image", "import", layout.to_str().unwrap()]);
    let mut args = vec!["sandbox", "create", "--name", sandbox, "--image", name];
    args.extend_from_slice(create);
    gw.ok(args);
    (dir, gw)
}

#[test]
fn issue_17_a_pulled_image_roots_a_vm_sandbox_and_two_vms_share_its_disk() {
    let test = "issue_17 a pulled image roots a VM sandbox";
    let Some(rt) = vm_runtime(test) else { return };
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let image = test_image();
    block_on(registry.push("team/app:v1", &image));
    let dir = short_dir();
    let gw = start_vm_gateway(dir.path(), &rt, &["--insecure-registry", &registry.addr]);
    let reference = registry.reference("team/app:v1");

    // Item 1: files, whiteout, owners, modes and User, as on the process
    // driver (the same checks).
    gw.ok([
        "sandbox", "create", "--name", "pulled", "--image", &reference,
    ]);
    check_rooted_in_the_test_image(&gw, "pulled");
    let sb = json(&gw.ok(["sandbox", "get", "pulled", "-o", "json"]));
    assert_eq!(sb["image_digest"], image.digest().as_str(), "{sb}");

    // Item 4: a second VM of the image adds only its own disk's writes.
    let state = dir.path().join("state");
    let base = disks(&state);
    assert_eq!(base.len(), 1, "one disk per image: {base:?}");
    let base_bytes = allocated(&base[0]);
    gw.ok([
        "sandbox", "create", "--name", "second", "--image", &reference,
    ]);
    let wrote = exec(
        &gw,
        "second",
        "echo mine > /home/app/new && sync && cat /etc/hello",
    );
    assert_eq!(wrote.stdout, "from the image\n", "{wrote}");
    assert_eq!(disks(&state), base, "the second VM reuses the image's disk");
    assert_eq!(allocated(&base[0]), base_bytes, "and never writes to it");
    let own = sandbox_dir(&gw, &state, "second").join("disk.ext4");
    let own_bytes = allocated(&own);
    let size = std::fs::metadata(&own).unwrap().len();
    assert!(
        own_bytes < size / 8,
        "the sandbox's own disk is sparse: {own_bytes} of {size} bytes"
    );
    eprintln!(
        "issue 17 item 4: the image's disk takes {} KiB; the second VM's own disk ({} GiB) takes {} KiB",
        base_bytes >> 10,
        size >> 30,
        own_bytes >> 10
    );
    let first = exec(&gw, "pulled", "cat /home/app/new 2>&1 || echo absent");
    assert!(
        first.stdout.contains("absent"),
        "disks are per sandbox: {first}"
    );

    gw.ok(["sandbox", "delete", "pulled", "second"]);
    gw.ok(["image", "rm", &reference]);
    assert!(disks(&state).is_empty(), "the disk goes with the image");
}

/// Item 3 and the durability rule (host/vm/src/disk.rs): what the guest
/// synced survives the gateway's SIGKILL; the VM comes back on its disk.
#[test]
fn issue_17_a_synced_write_in_a_vm_survives_a_sigkilled_gateway() {
    let test = "issue_17 a synced write survives a SIGKILLed gateway";
    let Some(rt) = vm_runtime(test) else { return };
    let (dir, gw) = vm_with_image(&rt, &test_image(), "example.com/team/app:v1", "kept", &[]);
    let wrote = exec(
        &gw,
        "kept",
        "echo in-the-image > /home/app/note && echo in-sandbox > /sandbox/f && sync",
    );
    assert!(wrote.success, "{wrote}");
    let state = dir.path().join("state");
    let disk = sandbox_dir(&gw, &state, "kept").join("disk.ext4");
    let ino = std::fs::metadata(&disk).unwrap().ino();

    crate::restart::sigkill(gw.pid());
    drop(gw);
    let gw = start_vm_gateway(dir.path(), &rt, &[]);
    let started = Instant::now();
    loop {
        let sb = json(&gw.ok(["sandbox", "get", "kept", "-o", "json"]));
        if sb["phase"] == "Ready" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not Ready after the restart: {sb}\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::metadata(&disk).unwrap().ino(),
        ino,
        "the same disk, not a new one"
    );
    let read = exec(&gw, "kept", "cat /home/app/note /sandbox/f; id -u");
    assert_eq!(read.stdout, "in-the-image\nin-sandbox\n1234\n", "{read}");
}

/// Item 5: a VM's own disk is its `--disk-gib` (less the host's headroom),
/// so filling it is ENOSPC in the guest; the sandbox and gateway go on.
#[test]
fn issue_17_writing_past_disk_gib_in_a_vm_is_enospc_and_everything_keeps_serving() {
    let test = "issue_17 writing past --disk-gib in a VM";
    let Some(rt) = vm_runtime(test) else { return };
    let (dir, gw) = vm_with_image(
        &rt,
        &test_image(),
        "example.com/team/app:v1",
        "full",
        &["--disk-gib", "1"],
    );
    let fill = exec(
        &gw,
        "full",
        "cat /dev/zero > /sandbox/big; echo \"status $?\"; ls -s /sandbox/big",
    );
    assert!(
        fill.stderr.contains("No space left on device"),
        "ENOSPC expected: {fill}"
    );
    let kib: u64 = fill
        .stdout
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size: {fill}"));
    assert!(
        (512 << 10..1 << 20).contains(&kib),
        "the guest filled about its 768 MiB disk, not the host: {kib} KiB"
    );
    let state = dir.path().join("state");
    let own = sandbox_dir(&gw, &state, "full").join("disk.ext4");
    assert!(
        allocated(&own) <= 1 << 30,
        "the host file stays within the quota: {} bytes",
        allocated(&own)
    );
    // The sandbox still runs commands, frees space, and the gateway serves.
    let after = exec(
        &gw,
        "full",
        "rm /sandbox/big && echo x > /sandbox/small && cat /sandbox/small",
    );
    assert_eq!(after.stdout, "x\n", "{after}");
    gw.ok(["status"]);
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "next",
        "--image",
        "example.com/team/app:v1",
        "--",
        "cat",
        "/etc/hello",
    ]);
}

/// The base image (`just image-base`), or None, said loudly, when it has
/// not been built; CI builds it first, so there its absence fails.
pub(crate) fn base_image_layout(test: &str) -> Option<PathBuf> {
    let runtime = std::env::var_os("OPENSHELL_VM_RUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtime"));
    let layout = runtime.join("images/base");
    if layout.join("index.json").is_file() {
        return Some(layout);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must build the base image first (just image-base): {} is missing",
        layout.display()
    );
    crate::harness::skip(&format!(
        "{test}: the base image is not built ({} missing; run just image-base)",
        layout.display()
    ));
    None
}

/// Imports the base image's layout as `openshell/base:bookworm`.
pub(crate) fn import_base(gw: &Gateway, layout: &Path) {
    gw.ok([
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "openshell/base:bookworm",
    ]);
}

/// Item 2: the project's base image runs Python, git and Node on both
/// drivers.
#[test]
fn issue_17_the_base_image_runs_python_git_and_node_on_both_drivers() {
    let test = "issue_17 the base image on both drivers";
    let Some(layout) = base_image_layout(test) else {
        return;
    };
    let Some(rt) = vm_runtime(test) else { return };
    let dir = short_dir();
    let gw = start_with_drivers(dir.path(), &rt, "process,vm", &[]);
    import_base(&gw, &layout);
    let script = "python3 -c 'import sys; print(\"python\", sys.version.split()[0])' && git --version && echo node $(node --version)";
    for driver in ["process", "vm"] {
        let started = Instant::now();
        let run = gw.ok([
            "sandbox",
            "create",
            "--rm",
            "--driver",
            driver,
            "--image",
            "openshell/base:bookworm",
            "--",
            "bash",
            "-c",
            script,
        ]);
        for want in ["python 3.", "git version 2.", "node v"] {
            assert!(
                run.stdout.contains(want),
                "{driver}: {want:?} missing: {run}"
            );
        }
        eprintln!(
            "issue 17 item 2 ({driver}, {:.1?} including the image's VM disk on first use): {}",
            started.elapsed(),
            run.stdout.trim().replace('\n', "; ")
        );
    }
}

/// Attack, from VM sandbox code that is root of its image (no `User`): it
/// owns the image's files (writes land on its own disk), and cannot read
/// or write either block device, touch the shared image disk, or reach
/// init or its supervisor.
#[test]
fn issue_17_root_of_a_vm_image_cannot_reach_the_disks_the_shared_image_or_its_supervisor() {
    use openshell_image::testing::fixture::file;
    let test = "issue_17 root of a VM image";
    let Some(rt) = vm_runtime(test) else { return };
    let image = rootless_image(
        &["/bin/sh", "/usr/bin/id", "/usr/bin/cat", "/usr/bin/head"],
        vec![file("etc/hello", b"from the image\n", 0o644)],
    );
    let (dir, gw) = vm_with_image(&rt, &image, "example.com/rooty:v1", "rooty", &[]);
    let state = dir.path().join("state");
    let shared = disks(&state);
    assert_eq!(shared.len(), 1);
    let before = std::fs::read(&shared[0]).unwrap();
    let script = "
        echo \"uid: $(id -u)\"
        echo mine > /etc/hello && echo 'image files: writable'
        for d in /dev/vda /dev/vdb; do
            [ -b $d ] && echo \"$d: present\"
            head -c 512 $d >/dev/null 2>&1 && echo \"$d: read\" || echo \"$d: refused\"
            echo x 2>/dev/null > $d && echo \"$d: written\" || echo \"$d: write refused\"
        done
        kill -9 1 2>/dev/null && echo 'init: killed' || echo 'init: refused'
        for p in /proc/[0-9]*; do
            [ \"$(cat $p/comm 2>/dev/null)\" = openshell-super ] && sup=${p#/proc/}
        done
        echo \"supervisor pid: ${sup:-none}\"
        kill -9 $sup 2>/dev/null && echo 'supervisor: killed' || echo 'supervisor: refused'
        cat /proc/$sup/environ >/dev/null 2>&1 && echo 'environ: read' || echo 'environ: refused'
        [ -e /image ] && echo 'initramfs: visible' || echo 'initramfs: gone'
    ";
    let run = exec(&gw, "rooty", script);
    for want in [
        "uid: 0",
        "image files: writable",
        "/dev/vda: present",
        "/dev/vdb: present",
        "/dev/vda: refused",
        "/dev/vda: write refused",
        "/dev/vdb: refused",
        "/dev/vdb: write refused",
        "init: refused",
        "supervisor: refused",
        "environ: refused",
        "initramfs: gone",
    ] {
        assert!(run.stdout.contains(want), "{want:?} missing:\n{run}");
    }
    assert!(!run.stdout.contains("supervisor pid: none"), "{run}");
    let after = exec(&gw, "rooty", "cat /etc/hello");
    assert_eq!(after.stdout, "mine\n", "its own disk keeps the change");
    assert!(
        std::fs::read(&shared[0]).unwrap() == before,
        "the shared image disk is byte for byte unchanged"
    );
}
