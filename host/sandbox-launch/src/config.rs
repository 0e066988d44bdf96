//! The launch config: one type for the JSON the gateway's process capability
//! writes ([`LaunchConfig::to_json`]) and the launcher reads ([`parse`]), so
//! both sides agree on the schema at compile time.
//!
//! [`parse`] is the only way in, and it validates with no I/O; the writer does
//! not validate, the reader always does. Everything that later becomes a path,
//! an argument or an environment entry is checked here, so the rest of the
//! launcher can trust it: paths are absolute with no `..`, no string holds a
//! NUL, names that end up in `/sys/fs/cgroup` or the UTS namespace are plain.
//! Checks that need the filesystem (does the program exist?) happen later, in
//! `launch`.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Size of the uid/gid range given to every sandbox: in-sandbox ids
/// `0..ID_RANGE` map to host ids `uid_base..uid_base + ID_RANGE`.
pub const ID_RANGE: u32 = 65536;

/// Largest value the kernel accepts for `pids.max` (`PID_MAX_LIMIT` on 64-bit).
const MAX_PROCESSES_LIMIT: u64 = 4 * 1024 * 1024;

/// CFS refuses quotas under 1 ms per 100 ms period, i.e. 10 thousandths of a CPU.
const MIN_CPU_MILLIS: u64 = 10;

/// A thousand CPUs; anything above is a unit mistake, not a limit.
const MAX_CPU_MILLIS: u64 = 1_000_000;

/// One sandbox launch, as the gateway describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// Names the cgroups (`openshell/<sandbox_id>`): letters, digits, `-`, `_`.
    pub sandbox_id: String,
    /// The sandbox's hostname (its own UTS namespace).
    pub hostname: String,
    /// Host directory private to this sandbox (root, 0700); holds `root/`,
    /// the mount point of the new root.
    pub state_dir: PathBuf,
    /// Host directory mounted read-write at `/sandbox`.
    pub workdir: PathBuf,
    /// Host directory mounted read-write at `/run/openshell`.
    pub run_dir: PathBuf,
    /// Host file bind-mounted read-only at `/run/openshell-bin/<file name>`
    /// and executed from there.
    pub program: PathBuf,
    /// Arguments after `argv[0]` (which is the in-sandbox program path).
    pub args: Vec<String>,
    /// The program's whole environment, in order.
    pub env: Vec<(String, String)>,
    /// First host uid/gid of the sandbox's range.
    pub uid_base: u32,
    /// A network namespace with only `lo`, instead of the host's network.
    pub isolate_network: bool,
    /// Memory limit in MiB; 0 means none.
    pub memory_mib: u64,
    /// Limit on tasks (processes and threads); 0 means none.
    pub max_processes: u64,
    /// CPU bandwidth in thousandths of a CPU; 0 means none.
    pub cpu_millis: u64,
    /// Only cgroup hierarchies mounted at or under this directory are used
    /// (default: every mount in `/proc/self/mountinfo`). Tests point it at
    /// their own mounts; a limit no hierarchy there can apply fails the launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    /// The program is a supervisor that runs sandbox code: init and the
    /// program go into the sandbox's `supervisor` cgroup, outside the
    /// limits above, and the program is handed descriptors that move a
    /// process into the `workload` cgroup, where the limits are
    /// ([`WORKLOAD_FDS_ENV`]).
    #[serde(default)]
    pub supervised: bool,
    /// The root is an image ([`ImageRoot`]) instead of the host's
    /// read-only system directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRoot>,
}

/// A root filesystem made of an image: its unpacked layers, shared and
/// read-only, under a writable layer of this sandbox's own (overlayfs,
/// mounted by the sandbox's root inside its user namespace).
///
/// Layer files carry the image's own ids. The sandbox sees them through an
/// idmapped mount shifted by [`IMAGE_ID_OFFSET`]: image uid `u` is sandbox
/// uid `u + 1` (host `uid_base + 1 + u`), so the image's root is never the
/// sandbox's root (the supervisor), and image ids `0..=MAX_IMAGE_ID` fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRoot {
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The sandbox's writable layer (host dir, kept until the sandbox goes).
    pub upper: PathBuf,
    /// overlayfs's work directory, on the same filesystem as `upper`.
    pub work: PathBuf,
}

/// How far image ids are shifted inside the sandbox (see [`ImageRoot`]).
pub const IMAGE_ID_OFFSET: u32 = 1;

/// The largest uid or gid an image may use: the rest of the sandbox's
/// range after the offset.
pub const MAX_IMAGE_ID: u32 = ID_RANGE - IMAGE_ID_OFFSET - 1;

/// overlayfs stacks at most 500 lower layers; images rarely pass 100.
pub const MAX_LAYERS: usize = 128;

/// Names, for a supervised program, the descriptors (comma-separated
/// numbers) each of which, written `0`, moves the writer into the
/// sandbox's `workload` cgroup in one hierarchy. Opened by host root, so
/// the write needs no privilege of the writer's own.
pub const WORKLOAD_FDS_ENV: &str = "OPENSHELL_WORKLOAD_CGROUP_FDS";

impl LaunchConfig {
    /// The program's file name, which is also its name under `/run/openshell-bin`.
    pub fn program_name(&self) -> &str {
        // `parse` rejected programs without a UTF-8 file name.
        self.program
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
    }

    /// Where the program is executed from inside the sandbox.
    pub fn program_inside(&self) -> PathBuf {
        Path::new(PROGRAM_DIR).join(self.program_name())
    }

    /// Where the new root is mounted on the host, before `pivot_root`.
    pub fn new_root(&self) -> PathBuf {
        self.state_dir.join("root")
    }

    /// The JSON [`parse`] reads. Fails only for a path that is not UTF-8.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Memory limit in bytes, if any.
    pub fn memory_bytes(&self) -> Option<u64> {
        // `parse` checked that this does not overflow.
        (self.memory_mib > 0).then_some(self.memory_mib << 20)
    }
}

/// In-sandbox directory holding the bind-mounted program.
pub const PROGRAM_DIR: &str = "/run/openshell-bin";

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("malformed JSON")]
    Json(#[source] serde_json::Error),
    #[error("{field} must be an absolute path, got {path:?}")]
    NotAbsolute { field: &'static str, path: PathBuf },
    #[error("{field} must not contain `..`, got {path:?}")]
    ParentComponent { field: &'static str, path: PathBuf },
    #[error("{field} must not be `/`")]
    FilesystemRoot { field: &'static str },
    #[error("{field} must not contain a NUL byte")]
    Nul { field: &'static str },
    #[error("program {path:?} has no usable file name")]
    ProgramName { path: PathBuf },
    #[error(
        "sandbox_id must be 1 to 64 letters, digits, `-` or `_`, got {0:?} (it names a cgroup directory)"
    )]
    SandboxId(String),
    #[error("hostname must be 1 to 64 letters, digits, `-` or `.`, got {0:?}")]
    Hostname(String),
    #[error("environment variable name {0:?} must be non-empty and must not contain `=`")]
    EnvName(String),
    #[error(
        "uid_base must be at least {ID_RANGE} (never host system ids) and leave room for {ID_RANGE} ids, got {0}"
    )]
    UidBase(u32),
    #[error("memory_mib {0} is too large")]
    MemoryMib(u64),
    #[error("max_processes must be at most {MAX_PROCESSES_LIMIT}, got {0}")]
    MaxProcesses(u64),
    #[error("an image root needs 1 to {MAX_LAYERS} layers, got {0}")]
    Layers(usize),
    #[error("cpu_millis must be 0 or between {MIN_CPU_MILLIS} and {MAX_CPU_MILLIS}, got {0}")]
    CpuMillis(u64),
}

/// Parses and validates a launch config.
pub fn parse(json: &str) -> Result<LaunchConfig, ConfigError> {
    let config: LaunchConfig = serde_json::from_str(json).map_err(ConfigError::Json)?;
    validate(&config)?;
    Ok(config)
}

fn validate(config: &LaunchConfig) -> Result<(), ConfigError> {
    let plain_id = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !is_short_name(&config.sandbox_id, plain_id) {
        return Err(ConfigError::SandboxId(config.sandbox_id.clone()));
    }
    let host_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if !is_short_name(&config.hostname, host_char) {
        return Err(ConfigError::Hostname(config.hostname.clone()));
    }

    check_path("state_dir", &config.state_dir)?;
    check_path("workdir", &config.workdir)?;
    check_path("run_dir", &config.run_dir)?;
    check_path("program", &config.program)?;
    if let Some(root) = &config.cgroup_root {
        check_path("cgroup_root", root)?;
    }
    if let Some(image) = &config.image {
        if !(1..=MAX_LAYERS).contains(&image.layers.len()) {
            return Err(ConfigError::Layers(image.layers.len()));
        }
        for layer in &image.layers {
            check_path("image.layers", layer)?;
        }
        check_path("image.upper", &image.upper)?;
        check_path("image.work", &image.work)?;
    }
    let name = config.program.file_name().and_then(|name| name.to_str());
    if name.is_none_or(str::is_empty) {
        return Err(ConfigError::ProgramName {
            path: config.program.clone(),
        });
    }

    if config.args.iter().any(|arg| arg.contains('\0')) {
        return Err(ConfigError::Nul { field: "args" });
    }
    for (name, value) in &config.env {
        if name.contains('\0') || value.contains('\0') {
            return Err(ConfigError::Nul { field: "env" });
        }
        if name.is_empty() || name.contains('=') {
            return Err(ConfigError::EnvName(name.clone()));
        }
    }

    if config.uid_base < ID_RANGE || config.uid_base.checked_add(ID_RANGE).is_none() {
        return Err(ConfigError::UidBase(config.uid_base));
    }
    // Bytes must fit an i64: the cgroup files parse a signed number.
    if config.memory_mib > (i64::MAX as u64) >> 20 {
        return Err(ConfigError::MemoryMib(config.memory_mib));
    }
    if config.max_processes > MAX_PROCESSES_LIMIT {
        return Err(ConfigError::MaxProcesses(config.max_processes));
    }
    let millis = config.cpu_millis;
    if millis != 0 && !(MIN_CPU_MILLIS..=MAX_CPU_MILLIS).contains(&millis) {
        return Err(ConfigError::CpuMillis(millis));
    }
    Ok(())
}

fn is_short_name(name: &str, allowed: impl Fn(char) -> bool) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(allowed)
}

/// Absolute, no `..`, no NUL, and not `/` itself (binding the host root
/// into the sandbox would undo the whole confinement).
fn check_path(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(ConfigError::Nul { field });
    }
    if !path.is_absolute() {
        return Err(ConfigError::NotAbsolute {
            field,
            path: path.to_owned(),
        });
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ConfigError::ParentComponent {
            field,
            path: path.to_owned(),
        });
    }
    if path.components().all(|c| c == Component::RootDir) {
        return Err(ConfigError::FilesystemRoot { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn valid() -> Value {
        json!({
            "sandbox_id": "0b5c2f3e-6a1d-4f8e-9b7a-2c3d4e5f6a7b",
            "hostname": "my-sandbox",
            "state_dir": "/var/lib/openshell/sandboxes/x",
            "workdir": "/var/lib/openshell/sandboxes/x/work",
            "run_dir": "/var/lib/openshell/sandboxes/x/run",
            "program": "/usr/libexec/openshell/openshell-supervisor",
            "args": ["--serve"],
            "env": [["PATH", "/usr/bin:/bin"], ["EMPTY", ""]],
            "uid_base": 100000,
            "isolate_network": true,
            "memory_mib": 512,
            "max_processes": 512,
            "cpu_millis": 0
        })
    }

    fn with(field: &str, value: Value) -> Result<LaunchConfig, ConfigError> {
        let mut config = valid();
        config[field] = value;
        parse(&config.to_string())
    }

    fn without(field: &str) -> Result<LaunchConfig, ConfigError> {
        let mut config = valid();
        config.as_object_mut().unwrap().remove(field);
        parse(&config.to_string())
    }

    #[test]
    fn a_complete_config_parses_with_every_field() {
        let config = parse(&valid().to_string()).unwrap();
        assert_eq!(config.sandbox_id, "0b5c2f3e-6a1d-4f8e-9b7a-2c3d4e5f6a7b");
        assert_eq!(config.program_name(), "openshell-supervisor");
        assert_eq!(
            config.program_inside(),
            Path::new("/run/openshell-bin/openshell-supervisor")
        );
        assert_eq!(
            config.new_root(),
            Path::new("/var/lib/openshell/sandboxes/x/root")
        );
        assert_eq!(config.env[1], ("EMPTY".to_owned(), String::new()));
        assert_eq!(config.memory_bytes(), Some(512 << 20));
        assert!(config.isolate_network);
    }

    #[test]
    fn zero_memory_means_no_limit() {
        assert_eq!(with("memory_mib", json!(0)).unwrap().memory_bytes(), None);
    }

    #[test]
    fn what_the_writer_renders_the_reader_parses_back_unchanged() {
        let mut config = parse(&valid().to_string()).unwrap();
        assert_eq!(parse(&config.to_json().unwrap()).unwrap(), config);
        config.cgroup_root = Some("/tmp/cgroups".into());
        assert_eq!(parse(&config.to_json().unwrap()).unwrap(), config);
    }

    #[test]
    fn the_cgroup_root_is_optional_and_left_out_when_unset() {
        let config = parse(&valid().to_string()).unwrap();
        assert_eq!(config.cgroup_root, None);
        assert!(!config.to_json().unwrap().contains("cgroup_root"));
        let config = with("cgroup_root", json!("/mnt/cgroups")).unwrap();
        assert_eq!(
            config.cgroup_root.as_deref(),
            Some(Path::new("/mnt/cgroups"))
        );
    }

    #[test]
    fn every_field_but_the_cgroup_root_is_required() {
        for field in valid().as_object().unwrap().keys() {
            let err = without(field).unwrap_err();
            assert!(
                err.source_text()
                    .contains(&format!("missing field `{field}`")),
                "{field}: {}",
                err.source_text()
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_so_typos_do_not_silently_drop_a_limit() {
        let err = with("memory_limit", json!(5)).unwrap_err();
        assert!(err.source_text().contains("unknown field"), "{err}");
    }

    #[test]
    fn relative_paths_are_refused() {
        for field in ["state_dir", "workdir", "run_dir", "program", "cgroup_root"] {
            let err = with(field, json!("relative/dir")).unwrap_err();
            assert!(
                matches!(err, ConfigError::NotAbsolute { field: f, .. } if f == field),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("{field} must be an absolute path, got \"relative/dir\"")
            );
        }
    }

    #[test]
    fn parent_components_are_refused_anywhere_in_a_path() {
        for path in ["/a/../b", "/..", "/a/b/.."] {
            let err = with("workdir", json!(path)).unwrap_err();
            assert!(matches!(err, ConfigError::ParentComponent { .. }), "{path}");
        }
    }

    #[test]
    fn dots_that_are_not_parent_components_are_fine() {
        let config = with("workdir", json!("/a/..b/c./.d")).unwrap();
        assert_eq!(config.workdir, Path::new("/a/..b/c./.d"));
    }

    #[test]
    fn the_filesystem_root_is_refused_as_a_directory() {
        for path in ["/", "//", "/."] {
            let err = with("workdir", json!(path)).unwrap_err();
            assert!(matches!(err, ConfigError::FilesystemRoot { .. }), "{path}");
        }
    }

    #[test]
    fn nul_bytes_are_refused_in_paths_args_and_env() {
        let err = with("run_dir", json!("/run/a\u{0}b")).unwrap_err();
        assert!(matches!(err, ConfigError::Nul { field: "run_dir" }));
        let err = with("args", json!(["ok", "b\u{0}d"])).unwrap_err();
        assert!(matches!(err, ConfigError::Nul { field: "args" }));
        let err = with("env", json!([["K", "v\u{0}"]])).unwrap_err();
        assert!(matches!(err, ConfigError::Nul { field: "env" }));
        let err = with("env", json!([["K\u{0}", "v"]])).unwrap_err();
        assert!(matches!(err, ConfigError::Nul { field: "env" }));
    }

    #[test]
    fn env_names_must_be_non_empty_and_free_of_equals() {
        assert!(matches!(
            with("env", json!([["", "v"]])).unwrap_err(),
            ConfigError::EnvName(_)
        ));
        assert!(matches!(
            with("env", json!([["A=B", "v"]])).unwrap_err(),
            ConfigError::EnvName(_)
        ));
        assert!(with("env", json!([["A", "B=C"]])).is_ok());
    }

    #[test]
    fn env_entries_must_be_pairs() {
        assert!(matches!(
            with("env", json!([["K", "v", "extra"]])).unwrap_err(),
            ConfigError::Json(_)
        ));
        assert!(matches!(
            with("env", json!({"K": "v"})).unwrap_err(),
            ConfigError::Json(_)
        ));
    }

    #[test]
    fn sandbox_ids_cannot_escape_the_cgroup_directory() {
        for id in ["", "../x", "a/b", ".", "a b", &"x".repeat(65)] {
            assert!(
                matches!(
                    with("sandbox_id", json!(id)).unwrap_err(),
                    ConfigError::SandboxId(_)
                ),
                "{id:?}"
            );
        }
        assert!(with("sandbox_id", json!("abc_DEF-123")).is_ok());
    }

    #[test]
    fn hostnames_are_plain_and_at_most_64_bytes() {
        for name in ["", "a b", "x/y", "héllo", &"h".repeat(65)] {
            assert!(
                matches!(
                    with("hostname", json!(name)).unwrap_err(),
                    ConfigError::Hostname(_)
                ),
                "{name:?}"
            );
        }
        assert!(with("hostname", json!("a.b-c")).is_ok());
    }

    #[test]
    fn a_program_needs_a_file_name() {
        assert!(matches!(
            with("program", json!("/usr/bin/..")).unwrap_err(),
            ConfigError::ParentComponent { .. }
        ));
        assert!(matches!(
            with("program", json!("/")).unwrap_err(),
            ConfigError::FilesystemRoot { .. }
        ));
    }

    #[test]
    fn uid_base_never_maps_onto_host_system_ids_and_never_overflows() {
        for base in [0, 1, 1000, 65535, u32::MAX - 65535] {
            assert!(
                matches!(
                    with("uid_base", json!(base)).unwrap_err(),
                    ConfigError::UidBase(_)
                ),
                "{base}"
            );
        }
        assert!(with("uid_base", json!(65536)).is_ok());
        assert!(with("uid_base", json!(u32::MAX - 65536)).is_ok());
    }

    #[test]
    fn negative_or_fractional_numbers_are_malformed() {
        assert!(matches!(
            with("memory_mib", json!(-1)).unwrap_err(),
            ConfigError::Json(_)
        ));
        assert!(matches!(
            with("cpu_millis", json!(1.5)).unwrap_err(),
            ConfigError::Json(_)
        ));
    }

    #[test]
    fn limits_outside_what_the_kernel_takes_are_refused() {
        assert!(matches!(
            with("memory_mib", json!(u64::MAX)).unwrap_err(),
            ConfigError::MemoryMib(_)
        ));
        assert!(matches!(
            with("max_processes", json!(MAX_PROCESSES_LIMIT + 1)).unwrap_err(),
            ConfigError::MaxProcesses(_)
        ));
        for millis in [1, 9, MAX_CPU_MILLIS + 1] {
            assert!(matches!(
                with("cpu_millis", json!(millis)).unwrap_err(),
                ConfigError::CpuMillis(_)
            ));
        }
        assert!(with("cpu_millis", json!(10)).is_ok());
    }

    impl ConfigError {
        /// The error with its cause, as the launcher prints it.
        fn source_text(&self) -> String {
            let mut text = self.to_string();
            let mut cause = std::error::Error::source(self);
            while let Some(err) = cause {
                text.push_str(&format!(": {err}"));
                cause = err.source();
            }
            text
        }
    }

    mod fuzz {
        //! Fuzzing (issue 8): the parser never panics, and whatever it
        //! accepts is safe to turn into paths, cgroup names and uid maps.
        use super::*;
        use proptest::prelude::*;

        fn arb_path() -> impl Strategy<Value = String> {
            // Mostly plausible paths, so that many configs are accepted.
            prop_oneof![
                40 => "/[a-z]{1,8}(/[a-z.]{1,8}){0,3}",
                1 => "/[a-z./]{0,20}",
                1 => "\\PC{0,20}",
                1 => Just("/".to_owned()),
                1 => Just("/a/../b".to_owned()),
                1 => Just("/a\0b".to_owned()),
            ]
        }

        fn arb_config() -> impl Strategy<Value = Value> {
            (
                (
                    prop_oneof![8 => "[a-z0-9_-]{1,64}", 1 => "\\PC{0,70}"],
                    prop_oneof![8 => "[a-z0-9.-]{1,64}", 1 => "\\PC{0,70}"],
                ),
                (arb_path(), arb_path(), arb_path(), arb_path()),
                prop::collection::vec("\\PC{0,8}", 0..3),
                prop::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..3),
                (
                    any::<u32>(),
                    any::<bool>(),
                    any::<u64>(),
                    any::<u64>(),
                    any::<u64>(),
                ),
            )
                .prop_map(
                    |((id, host), (state, work, run, program), args, env, nums)| {
                        json!({
                            "sandbox_id": id, "hostname": host, "state_dir": state,
                            "workdir": work, "run_dir": run, "program": program,
                            "args": args, "env": env, "uid_base": nums.0,
                            "isolate_network": nums.1, // Ranges a little past each limit, so both sides are hit.
                            "memory_mib": nums.2 % (9 << 40),
                            "max_processes": nums.3 % (9 << 19), "cpu_millis": nums.4 % 1_100_000,
                        })
                    },
                )
        }

        #[test]
        fn the_generator_reaches_accepted_configs() {
            use proptest::strategy::ValueTree;
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let accepted = (0..200)
                .filter(|_| {
                    let v = arb_config().new_tree(&mut runner).unwrap().current();
                    parse(&v.to_string()).is_ok()
                })
                .count();
            assert!(
                accepted >= 20,
                "only {accepted}/200 generated configs parse"
            );
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(raw in "\\PC{0,200}") {
                let _ = parse(&raw);
            }

            #[test]
            fn accepted_configs_are_safe(config in arb_config()) {
                let Ok(c) = parse(&config.to_string()) else { return Ok(()) };
                for p in [&c.state_dir, &c.workdir, &c.run_dir, &c.program] {
                    prop_assert!(p.is_absolute() && p.as_os_str() != "/");
                    prop_assert!(!p.components().any(|x| x == Component::ParentDir));
                    prop_assert!(!p.as_os_str().as_encoded_bytes().contains(&0));
                }
                prop_assert!((1..=64).contains(&c.sandbox_id.len()));
                prop_assert!(c.sandbox_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                prop_assert!(c.hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
                prop_assert!(c.uid_base >= ID_RANGE && c.uid_base.checked_add(ID_RANGE).is_some());
                prop_assert!(!c.program_name().is_empty());
                prop_assert!(c.memory_bytes().is_none_or(|b| b <= i64::MAX as u64));
                for (k, v) in &c.env {
                    prop_assert!(!k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0'));
                }
            }
        }
    }
}
