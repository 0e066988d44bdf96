//! File trees as tar streams across a sandbox's edge: what `sandbox upload`
//! and `sandbox download` carry. [`pack`] writes one tree as a tar stream
//! whose entries all sit under the tree's own name (what
//! `tar -C parent -c name` writes); [`unpack`] reads one with `cp -r`'s
//! naming: into `dst` when it is a directory, else as `dst` itself.
//!
//! Both sides count what they move against [`Limits`]. Symlinks travel as
//! links and are never followed, neither when packing nor when a later
//! entry would be written through one. Upload unpacks inside the sandbox as
//! the sandbox's own user; download unpacks on the host as whoever runs the
//! CLI, which is why [`Unpack::keep_special_bits`] exists: nothing from a
//! sandbox becomes a set-uid file on the host.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// How much one transfer may move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content.
    pub max_bytes: u64,
    /// Files, directories and links.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_entries: 200_000,
        }
    }
}

/// What a transfer moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub bytes: u64,
    /// Sockets, fifos and devices, which are not copied.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path} does not exist")]
    NotFound { path: String },
    #[error("{path} already exists; pass --overwrite to replace it")]
    Exists { path: String },
    #[error("{path} is a directory and cannot be replaced by a file")]
    IsDirectory { path: String },
    #[error("{path}: name a file or a directory")]
    NoName { path: String },
    #[error("more than {limit} bytes of file content; raise the limit or send less")]
    TooLarge { limit: u64 },
    #[error("more than {limit} files, directories and links; raise the limit or send fewer")]
    TooManyEntries { limit: u64 },
    #[error("the archive's entry {path:?} {why}")]
    BadEntry { path: String, why: &'static str },
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl TransferError {
    /// How the in-sandbox helper reports this error as an exit code, and
    /// [`Self::kind_of_exit`] reads it back on the gateway.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Io { .. } => 1,
            Self::NotFound { .. } => 2,
            Self::Exists { .. } | Self::IsDirectory { .. } => 3,
            Self::TooLarge { .. } | Self::TooManyEntries { .. } => 4,
            Self::BadEntry { .. } | Self::NoName { .. } => 5,
        }
    }

    /// What kind of failure an exit code of the helper means.
    pub fn kind_of_exit(code: i32) -> FailureKind {
        match code {
            2 => FailureKind::NotFound,
            3 => FailureKind::Exists,
            4 => FailureKind::Limit,
            5 => FailureKind::BadRequest,
            _ => FailureKind::Other,
        }
    }
}

/// A transfer failure as the API classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    NotFound,
    Exists,
    Limit,
    BadRequest,
    Other,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Counts entries and bytes against the limits as a walk goes.
struct Budget {
    limits: Limits,
    summary: Summary,
}

impl Budget {
    fn entry(&mut self, bytes: u64) -> Result<(), TransferError> {
        self.summary.entries += 1;
        self.summary.bytes += bytes;
        if self.summary.entries > self.limits.max_entries {
            return Err(TransferError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        if self.summary.bytes > self.limits.max_bytes {
            return Err(TransferError::TooLarge {
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }
}

/// The name a tree travels under: the last component of `src`.
fn tree_name(src: &Path) -> Result<PathBuf, TransferError> {
    match src.components().next_back() {
        Some(Component::Normal(n)) => Ok(PathBuf::from(n)),
        _ => Err(TransferError::NoName {
            path: src.display().to_string(),
        }),
    }
}

/// What `pack(src)` would move, without reading file contents: for a
/// progress bar's length.
pub fn measure(src: &Path, limits: Limits) -> Result<Summary, TransferError> {
    let mut budget = Budget {
        limits,
        summary: Summary::default(),
    };
    walk(src, &mut |_, _, meta| {
        if meta.file_type().is_file() {
            budget.entry(meta.len())
        } else if is_special(&meta.file_type()) {
            budget.summary.skipped += 1;
            Ok(())
        } else {
            budget.entry(0)
        }
    })?;
    Ok(budget.summary)
}

fn is_special(t: &fs::FileType) -> bool {
    t.is_socket() || t.is_fifo() || t.is_block_device() || t.is_char_device()
}

/// Visits `src` and everything under it (names sorted, symlinks not
/// followed), with each path's name inside the archive.
fn walk(
    src: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> Result<(), TransferError>,
) -> Result<(), TransferError> {
    let meta = fs::symlink_metadata(src).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => TransferError::NotFound {
            path: src.display().to_string(),
        },
        _ => io_at(src)(e),
    })?;
    let name = tree_name(src)?;
    walk_in(src, &name, meta, visit)
}

fn walk_in(
    path: &Path,
    name: &Path,
    meta: fs::Metadata,
    visit: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> Result<(), TransferError>,
) -> Result<(), TransferError> {
    visit(name, path, &meta)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut children = fs::read_dir(path)
        .map_err(io_at(path))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_at(path))?;
    children.sort();
    for child in children {
        let p = path.join(&child);
        let m = fs::symlink_metadata(&p).map_err(io_at(&p))?;
        walk_in(&p, &name.join(&child), m, visit)?;
    }
    Ok(())
}

/// Writes `src` (a file, a directory with everything under it, or a
/// symlink, which stays a link) to `out` as a tar stream under its own
/// name. `progress` hears every chunk of file content written.
pub fn pack<W: Write>(
    src: &Path,
    out: W,
    limits: Limits,
    progress: &mut dyn FnMut(u64),
) -> Result<Summary, TransferError> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut budget = Budget {
        limits,
        summary: Summary::default(),
    };
    walk(src, &mut |name, path, meta| {
        let t = meta.file_type();
        if is_special(&t) {
            budget.summary.skipped += 1;
            return Ok(());
        }
        budget.entry(if t.is_file() { meta.len() } else { 0 })?;
        if t.is_dir() {
            tar.append_dir(name, path).map_err(io_at(path))?;
        } else if t.is_file() {
            let mut header = tar::Header::new_gnu();
            header.set_metadata(meta);
            let file = fs::File::open(path).map_err(io_at(path))?;
            // Exactly the length the header states, even if the file
            // changes while it is read (a sandbox's files may): cut, or
            // padded with zeros.
            let len = meta.len();
            let exact = file.take(len).chain(io::repeat(0)).take(len);
            let reader = Progress {
                inner: exact,
                progress: &mut *progress,
            };
            tar.append_data(&mut header, name, reader)
                .map_err(io_at(path))?;
        } else {
            tar.append_path_with_name(path, name).map_err(io_at(path))?;
        }
        Ok(())
    })?;
    tar.into_inner()
        .map_err(io_at(src))?
        .flush()
        .map_err(io_at(src))?;
    Ok(budget.summary)
}

struct Progress<'a, R> {
    inner: R,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// How to unpack.
#[derive(Clone, Copy, Debug)]
pub struct Unpack {
    /// Replace files that exist; without it an existing file (not a
    /// directory, which is merged into) fails the transfer.
    pub overwrite: bool,
    pub limits: Limits,
    /// Keep set-uid, set-gid and sticky bits. Off on the host.
    pub keep_special_bits: bool,
}

/// Reads a tar stream that [`pack`] wrote and puts its tree at `dst`, as
/// `cp -r` would: inside `dst` when it is a directory, else as `dst`
/// (whose parent must exist). Entries other than files, directories and
/// symlinks, names that climb out (`..`, absolute paths), and writes
/// through a symlink are refused.
pub fn unpack<R: Read>(
    input: R,
    dst: &Path,
    how: Unpack,
    progress: &mut dyn FnMut(u64),
) -> Result<Summary, TransferError> {
    let into_dir = fs::metadata(dst).map(|m| m.is_dir()).unwrap_or(false);
    if into_dir {
        return unpack_into(input, dst, how, progress, None);
    }
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !fs::metadata(&parent).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(TransferError::NotFound {
            path: parent.display().to_string(),
        });
    }
    let existing = fs::symlink_metadata(dst).ok();
    if existing.is_some() && !how.overwrite {
        return Err(TransferError::Exists {
            path: dst.display().to_string(),
        });
    }
    // Staged beside `dst`, then renamed into place: a failed transfer
    // leaves nothing half-written under the name asked for.
    let stage = tempdir_in(&parent)?;
    let result = (|| {
        let mut top = None;
        let summary = unpack_into(input, &stage, how, progress, Some(&mut top))?;
        let Some(top) = top else {
            return Err(TransferError::BadEntry {
                path: String::new(),
                why: "is missing: the archive is empty",
            });
        };
        let staged = stage.join(top);
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(TransferError::IsDirectory {
                path: dst.display().to_string(),
            });
        }
        fs::rename(&staged, dst).map_err(io_at(dst))?;
        Ok(summary)
    })();
    let _ = fs::remove_dir_all(&stage);
    result
}

/// Refuses a path with a symlink among its ancestors under `into`: an
/// earlier entry may have made one pointing anywhere, and nothing (not
/// even a check for an existing file) may look through it.
fn through_no_symlink(into: &Path, path: &Path) -> Result<(), TransferError> {
    let mut at = into.to_path_buf();
    let parents: Vec<_> = path
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(TransferError::BadEntry {
                    path: path.display().to_string(),
                    why: "would be written through a symlink",
                });
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn tempdir_in(parent: &Path) -> Result<PathBuf, TransferError> {
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = parent.join(format!(
            ".openshell-transfer-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match fs::DirBuilder::new().mode_private().create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_at(parent)(e)),
        }
    }
    Err(io_at(parent)(io::ErrorKind::AlreadyExists.into()))
}

trait PrivateDir {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateDir for fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// Unpacks every entry under `into`. With `top`, all entries must share one
/// first component, which is reported there.
fn unpack_into<R: Read>(
    input: R,
    into: &Path,
    how: Unpack,
    progress: &mut dyn FnMut(u64),
    mut top: Option<&mut Option<PathBuf>>,
) -> Result<Summary, TransferError> {
    let mut archive = tar::Archive::new(input);
    let mut budget = Budget {
        limits: how.limits,
        summary: Summary::default(),
    };
    let mask = if how.keep_special_bits { 0o7777 } else { 0o777 };
    // Directories get their modes last, so a read-only one can be filled.
    let mut dir_modes = Vec::new();
    let bad = |path: &Path, why| TransferError::BadEntry {
        path: path.display().to_string(),
        why,
    };
    let stream = |e| io_at(Path::new("the archive"))(e);
    for entry in archive.entries().map_err(stream)? {
        let mut entry = entry.map_err(stream)?;
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let path = entry.path().map_err(stream)?.into_owned();
        if path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad(&path, "climbs out of the destination"));
        }
        let Some(Component::Normal(first)) =
            path.components().find(|c| !matches!(c, Component::CurDir))
        else {
            return Err(bad(&path, "has no name"));
        };
        if let Some(top) = top.as_deref_mut() {
            match top {
                None => *top = Some(PathBuf::from(first)),
                Some(t) if t.as_os_str() == first => {}
                Some(_) => return Err(bad(&path, "is outside the archive's one tree")),
            }
        }
        let size = entry.header().size().map_err(stream)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => budget.entry(size)?,
            tar::EntryType::Directory | tar::EntryType::Symlink => budget.entry(0)?,
            _ => return Err(bad(&path, "is not a file, a directory or a symlink")),
        }
        let target = into.join(&path);
        through_no_symlink(into, &path)?;
        if let Ok(m) = fs::symlink_metadata(&target) {
            let entry_is_dir = kind == tar::EntryType::Directory;
            if m.is_dir() && !entry_is_dir {
                return Err(TransferError::IsDirectory {
                    path: path.display().to_string(),
                });
            }
            if !(m.is_dir() && entry_is_dir) {
                if !how.overwrite {
                    return Err(TransferError::Exists {
                        path: path.display().to_string(),
                    });
                }
                // Replaced, never written through (it may be a link).
                fs::remove_file(&target).map_err(io_at(&target))?;
            }
        }
        entry.set_preserve_permissions(false);
        entry.set_preserve_mtime(true);
        entry.set_unpack_xattrs(false);
        let mode = entry.header().mode().map_err(stream)? & mask;
        // unpack_in refuses a path whose parent resolves outside `into`
        // (through a symlink an earlier entry made).
        let unpacked = entry.unpack_in(into).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => io_at(&target)(e),
            _ => bad(
                &path,
                "would be written through a symlink or could not be written",
            ),
        })?;
        if !unpacked {
            return Err(bad(&path, "climbs out of the destination"));
        }
        progress(size);
        match kind {
            tar::EntryType::Directory => {
                fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(io_at(&target))?;
                dir_modes.push((target, mode));
            }
            tar::EntryType::Symlink => {}
            _ => fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_at(&target))?,
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(io_at(&dir))?;
    }
    Ok(budget.summary)
}

#[cfg(test)]
mod tests;
