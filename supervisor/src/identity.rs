//! Who sandbox code is in a sandbox rooted in an image.
//!
//! The launcher shows the image's files with their ids shifted by one
//! (image uid `u` is sandbox uid `u + 1`), so the image's root is never the
//! supervisor (sandbox uid 0). Sandbox code runs in a nested user namespace
//! that undoes the shift: inside it, ids are the image's own, `id -u` says
//! what the image's `User` says, and an image whose `User` is root or unset
//! runs as root there, so `apt-get install` works as in a container. That
//! root has no power over the supervisor (whose uid it does not map) nor
//! over the sandbox's network namespace (owned by the sandbox's user
//! namespace), and the system-call filter still applies.
//!
//! The namespace is made once at start ([`nested_namespace`]) and each
//! command joins it between fork and exec.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

/// The nested namespace maps its ids `0..NESTED_IDS` to sandbox ids from 1.
const NESTED_IDS: u32 = 65535;

/// Why sandbox code's identity cannot be settled.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the image's User {user:?} names no user in the image's /etc/passwd")]
    NoSuchUser { user: String },
    #[error("the image's User {user:?} names no group in the image's /etc/group")]
    NoSuchGroup { user: String },
    #[error("the image's User {user:?} has an id above {max}")]
    OutOfRange { user: String, max: u32 },
    #[error("cannot create the user namespace for sandbox code")]
    Namespace(#[source] std::io::Error),
    #[error("cannot hand /sandbox to the image's user")]
    Workdir(#[source] std::io::Error),
}

/// Sandbox code's ids in the nested namespace, and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    /// The user's home from the image's passwd, if it names one.
    pub home: Option<String>,
}

/// Resolves an image's `User` (`""`, `name`, `uid`, `name:group`,
/// `uid:gid`) against the image's `/etc/passwd` and `/etc/group`, as
/// container runtimes do: a numeric id need not be listed; a name must be.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ImageUser, IdentityError> {
    let (name, group_name) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entries = parse(passwd);
    let entry = if name.is_empty() {
        entries.iter().find(|e| e.id == 0)
    } else {
        entries
            .iter()
            .find(|e| e.name == name || name.parse() == Ok(e.id))
    };
    let uid = match (name.parse::<u32>(), entry) {
        _ if name.is_empty() => 0,
        (Ok(uid), _) => uid,
        (Err(_), Some(e)) => e.id,
        (Err(_), None) => {
            return Err(IdentityError::NoSuchUser {
                user: user.to_owned(),
            });
        }
    };
    let gid = match group_name {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => parse(group)
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.id)
                .ok_or_else(|| IdentityError::NoSuchGroup {
                    user: user.to_owned(),
                })?,
        },
        None => entry.and_then(|e| e.gid).unwrap_or(uid),
    };
    if uid >= NESTED_IDS || gid >= NESTED_IDS {
        return Err(IdentityError::OutOfRange {
            user: user.to_owned(),
            max: NESTED_IDS - 1,
        });
    }
    Ok(ImageUser {
        uid,
        gid,
        home: entry.and_then(|e| e.home.clone()).filter(|h| !h.is_empty()),
    })
}

struct Entry {
    name: String,
    id: u32,
    gid: Option<u32>,
    home: Option<String>,
}

/// `name:x:id[:gid:gecos:home:shell]` lines; malformed ones are skipped.
fn parse(file: &str) -> Vec<Entry> {
    file.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(Entry {
                name: (*fields.first()?).to_owned(),
                id: fields.get(2)?.parse().ok()?,
                gid: fields.get(3).and_then(|g| g.parse().ok()),
                home: fields.get(5).map(|h| (*h).to_owned()),
            })
        })
        .collect()
}

/// Reads the image's `User` files from the sandbox's root and resolves it.
pub fn resolve_in_root(user: &str) -> Result<ImageUser, IdentityError> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    resolve(user, &read("/etc/passwd"), &read("/etc/group"))
}

/// Makes the nested namespace (see the module docs) and returns a
/// descriptor that joins it. Must run before any thread starts: a child is
/// forked to unshare it and waits while we write its maps.
pub fn nested_namespace() -> Result<OwnedFd, IdentityError> {
    use nix::unistd::{ForkResult, fork};
    let failed = |e: std::io::Error| IdentityError::Namespace(e);
    let (mut ready_r, mut ready_w) = pipe().map_err(failed)?;
    let (mut done_r, done_w) = pipe().map_err(failed)?;
    #[allow(unsafe_code, reason = "fork before any thread exists")]
    // SAFETY: called from main before the runtime or any other thread
    // starts; the child only makes system calls and exits.
    let child = match unsafe { fork() }.map_err(|e| failed(e.into()))? {
        ForkResult::Child => {
            drop((ready_r, done_w));
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            if ok {
                let _ = ready_w.write_all(b"u");
                // Until the parent closes its end.
                let _ = done_r.read(&mut [0]);
            }
            #[allow(unsafe_code, reason = "leaving a forked child without cleanup")]
            // SAFETY: _exit has no preconditions.
            unsafe {
                nix::libc::_exit(if ok { 0 } else { 1 })
            }
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, done_r));
    let made = (|| {
        let mut byte = [0];
        if ready_r.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("the child could not unshare"));
        }
        let map = format!("0 1 {NESTED_IDS}\n");
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{child}/{file}"), &map)?;
        }
        std::fs::File::open(format!("/proc/{child}/ns/user")).map(OwnedFd::from)
    })();
    drop(done_w);
    let _ = nix::sys::wait::waitpid(child, None);
    made.map_err(failed)
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r.into(), w.into()))
}

/// Hands `/sandbox` (the mount point itself, not what is in it) to the
/// image's user, in sandbox ids.
pub fn own_workdir(user: &ImageUser) -> Result<(), IdentityError> {
    let shift = |id: u32| Some(id + 1);
    std::os::unix::fs::lchown(
        crate::spawn::DEFAULT_WORKDIR,
        shift(user.uid),
        shift(user.gid),
    )
    .map_err(IdentityError::Workdir)
}

/// The environment entries an image user implies unless the image or the
/// spec set them: HOME from the image's passwd, else `/sandbox`.
pub fn default_env(user: &ImageUser, env: &mut BTreeMap<String, String>) {
    let home = user.home.clone().unwrap_or_else(|| "/sandbox".into());
    env.entry("HOME".into()).or_insert(home);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        app:x:1234:1234::/home/app:/bin/sh\n\
        broken line\n\
        svc:x:900:50::/srv:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\napp:x:1234:\n";

    fn ids(user: &str) -> (u32, u32) {
        let u = resolve(user, PASSWD, GROUP).unwrap();
        (u.uid, u.gid)
    }

    #[test]
    fn users_resolve_as_container_runtimes_do() {
        assert_eq!(ids(""), (0, 0));
        assert_eq!(ids("app"), (1234, 1234));
        assert_eq!(ids("1234"), (1234, 1234));
        assert_eq!(ids("svc"), (900, 50), "the passwd entry's group");
        assert_eq!(ids("svc:staff"), (900, 50));
        assert_eq!(ids("4321"), (4321, 4321), "numeric ids need no entry");
        assert_eq!(ids("4321:7"), (4321, 7));
        assert_eq!(
            resolve("app", PASSWD, GROUP).unwrap().home.as_deref(),
            Some("/home/app")
        );
    }

    #[test]
    fn unknown_names_and_out_of_range_ids_are_refused_by_name() {
        for (user, want) in [
            ("nobody", "names no user"),
            ("app:wheel", "names no group"),
            ("65535", "above 65534"),
        ] {
            let e = resolve(user, PASSWD, GROUP).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(user), "{user}: {e}");
        }
    }
}
