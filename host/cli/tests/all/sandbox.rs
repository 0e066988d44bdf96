//! `openshell sandbox ...` and `openshell plugin ...` against a gateway whose
//! database is a SQLite file in its state dir (the default).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Gateway, KillOnDrop, Lines, load_echo, sandbox_names, wasm};

#[test]
fn the_gateway_keeps_its_database_in_the_state_dir_by_default() {
    let dir = TempDir::new().unwrap();
    let _gw = Gateway::on_file(dir.path());
    assert!(
        dir.path().join("state/openshell.db").is_file(),
        "no SQLite file in the state dir"
    );
}

#[test]
fn creating_with_an_unknown_driver_fails_and_says_how_to_load_one() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());

    let create = gw.fails(["sandbox", "create", "--no-wait", "--driver", "nosuch"]);
    assert!(
        create.stderr.contains(r#"driver "nosuch" is not loaded"#),
        "{create}"
    );
    assert!(create.stderr.contains("openshell plugin load"), "{create}");
    assert!(!create.stderr.contains("Created sandbox"), "{create}");
    assert!(
        sandbox_names(&gw).is_empty(),
        "a rejected create stores nothing"
    );
}

#[test]
fn a_loaded_plugin_is_listed_with_its_digest_and_grants() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());

    let load = load_echo(&gw);
    assert!(load.stdout.contains("echo"), "{load}");

    let list = gw.ok(["plugin", "list"]);
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("no echo row: {list}"));
    assert!(row.contains("sha256:"), "{row:?}");
    assert!(row.ends_with("log,files"), "{row:?}");

    let json = gw.ok(["plugin", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("plugin list -o json");
    let plugins = v.as_array().expect("a JSON array");
    assert_eq!(plugins.len(), 1, "{json}");
    assert_eq!(plugins[0]["name"], "echo", "{json}");
    assert_eq!(
        plugins[0]["grants"],
        serde_json::json!(["log", "files"]),
        "{json}"
    );
    let digest = plugins[0]["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64, "a hex sha256: {digest:?}");
    assert!(
        row.contains(&format!("sha256:{}", &digest[..7])),
        "the table shows the digest's prefix: {row:?} vs {digest}"
    );

    let health = gw.ok(["status"]);
    assert!(health.stdout.contains("Drivers: echo"), "{health}");
}

#[test]
fn a_sandbox_is_created_listed_read_watched_and_deleted() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);

    // The only driver is the default.
    let create = gw.ok(["sandbox", "create", "--name", "a1", "--no-wait"]);
    assert!(create.stderr.contains("Created sandbox: a1"), "{create}");
    assert!(create.stdout.contains("Phase:    Provisioning"), "{create}");
    assert_eq!(sandbox_names(&gw), ["a1"]);

    let get = gw.ok(["sandbox", "get", "a1", "-o", "json"]);
    let sb: serde_json::Value = serde_json::from_str(&get.stdout).expect("sandbox get -o json");
    assert_eq!(sb["name"], "a1", "{get}");
    assert_eq!(sb["driver"], "echo", "{get}");
    let id = sb["id"].as_str().expect("an id").to_owned();

    // The id works wherever a name does.
    let by_id = gw.ok(["sandbox", "get", &id, "-o", "json"]);
    let by_id: serde_json::Value = serde_json::from_str(&by_id.stdout).unwrap();
    assert_eq!(by_id["name"], "a1");

    let mut watch = gw.cli(["sandbox", "watch", "a1"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = watch.spawn().unwrap();
    let lines = Lines::of(&mut child);
    let mut watch = KillOnDrop(child);
    let first = lines.next(Duration::from_secs(30)).expect("a first event");
    assert!(first.starts_with("a1 Provisioning rev="), "{first:?}");

    let delete = gw.ok(["sandbox", "delete", "a1"]);
    assert!(delete.stdout.contains("Deleted sandbox: a1"), "{delete}");
    assert!(
        sandbox_names(&gw).is_empty(),
        "delete waits until the sandbox is gone"
    );

    // The open watch saw the deletion and ended by itself.
    let mut seen = vec![first];
    while let Some(line) = lines.next(Duration::from_secs(30)) {
        seen.push(line);
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some(format!("deleted {id}").as_str()),
        "{seen:#?}"
    );
    let status = watch
        .wait_until(Instant::now() + Duration::from_secs(10))
        .expect("the watch ends once the sandbox is deleted");
    assert!(status.success(), "{status}");

    let gone = gw.fails(["sandbox", "get", "a1"]);
    assert!(gone.stderr.contains("no sandbox named"), "{gone}");
}

#[test]
fn the_echo_driver_reports_progress_in_a_driver_condition() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);
    gw.ok(["sandbox", "create", "--name", "e1", "--no-wait"]);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let get = gw.ok(["sandbox", "get", "e1", "-o", "json"]);
        let sb: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
        let driver = sb["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Driver");
        if let Some(c) = driver {
            assert_eq!(c["message"], "echo says hi to e1", "{get}");
            assert_eq!(
                sb["phase"], "Provisioning",
                "no sandbox is Ready yet: {get}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no Driver condition: {get}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_sandbox_whose_driver_traps_settles_in_error() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    let trap = wasm("fixture_trap");
    gw.ok(["plugin", "load", trap.to_str().unwrap(), "--name", "trap"]);
    gw.ok(["sandbox", "create", "--name", "t1", "--no-wait"]);

    let watch = gw.ok(["sandbox", "watch", "t1", "--until-settled"]);
    let last = watch.stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("t1 Error "), "{watch}");

    let get = gw.ok(["sandbox", "get", "t1", "-o", "json"]);
    let sb: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    assert_eq!(sb["phase"], "Error", "{get}");
}

#[test]
fn a_name_that_is_not_a_dns_label_is_rejected() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);

    let create = gw.fails(["sandbox", "create", "--name", "Bad_Name", "--no-wait"]);
    assert!(create.stderr.contains("DNS label"), "{create}");
    assert!(create.stderr.contains("Bad_Name"), "{create}");
    assert!(
        sandbox_names(&gw).is_empty(),
        "a rejected create stores nothing"
    );
}

#[test]
fn getting_an_unknown_sandbox_says_there_is_no_sandbox_by_that_name() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());

    let get = gw.fails(["sandbox", "get", "nosuch"]);
    assert!(get.stderr.contains(r#"no sandbox named "nosuch""#), "{get}");
    assert!(get.stdout.is_empty(), "{get}");
}

#[test]
fn sandboxes_and_plugins_survive_a_gateway_restart() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);
    gw.ok(["sandbox", "create", "--name", "r1", "--no-wait"]);
    gw.ok(["sandbox", "create", "--name", "r2", "--no-wait"]);
    let digest_before = echo_digest(&gw);
    let (exit, _) = gw.terminate(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{exit}");

    let gw = Gateway::on_file(dir.path());
    assert_eq!(sandbox_names(&gw), ["r1", "r2"]);
    assert_eq!(
        echo_digest(&gw),
        digest_before,
        "the same build is reloaded"
    );

    // The reloaded plugin still drives sandboxes.
    gw.ok(["sandbox", "create", "--name", "r3", "--no-wait"]);
    gw.ok(["sandbox", "delete", "r1", "r2", "r3"]);
    assert!(sandbox_names(&gw).is_empty());
}

fn echo_digest(gw: &Gateway) -> String {
    let list = gw.ok(["plugin", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let echo = v
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "echo")
        .unwrap_or_else(|| panic!("echo is not loaded: {list}"));
    echo["digest"].as_str().unwrap().to_owned()
}

#[test]
fn delete_all_removes_every_sandbox() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);
    for name in ["d1", "d2", "d3"] {
        gw.ok(["sandbox", "create", "--name", name, "--no-wait"]);
    }
    assert_eq!(sandbox_names(&gw), ["d1", "d2", "d3"]);

    let delete = gw.ok(["sandbox", "delete", "--all"]);
    for name in ["d1", "d2", "d3"] {
        assert!(
            delete.stdout.contains(&format!("Deleted sandbox: {name}")),
            "{delete}"
        );
    }
    assert!(sandbox_names(&gw).is_empty(), "{delete}");

    // Nothing left to delete is not an error.
    let again = gw.ok(["sandbox", "delete", "--all"]);
    assert!(again.stdout.is_empty(), "{again}");
}

#[test]
fn unloading_a_plugin_in_use_needs_force() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);
    gw.ok(["sandbox", "create", "--name", "u1", "--no-wait"]);

    let refused = gw.fails(["plugin", "unload", "echo"]);
    assert!(refused.stderr.contains("FailedPrecondition"), "{refused}");
    assert!(gw.ok(["plugin", "list"]).stdout.contains("echo "));

    let unload = gw.ok(["plugin", "unload", "echo", "--force"]);
    assert!(unload.stdout.contains("Unloaded plugin: echo"), "{unload}");
    let list = gw.ok(["plugin", "list", "-o", "json"]);
    assert_eq!(list.stdout.trim(), "[]", "{list}");
}
