//! Unpacking one layer blob into one fresh directory, as an overlayfs lower
//! layer (mounted with `userxattr`).
//!
//! The `tar` crate parses the stream (ustar, GNU and PAX headers, long names,
//! sparse files); the entries are written here, not by `Entry::unpack_in`,
//! because that call does not do what a lower layer needs: it silently skips
//! `..` entries rather than failing, creates missing parents with the process
//! umask, sets no xattrs or mtimes on directories, writes device nodes as
//! regular files, and resolves hard link targets by path. Instead every
//! entry's parent is opened with `openat2(RESOLVE_BENEATH)` relative to the
//! layer root, so the kernel refuses any path that leaves the layer, through
//! `..` or through a symlink, absolute or relative; the entry itself is then
//! made relative to that descriptor without following a final symlink.
//!
//! Rules (see the tests at the bottom for the pure ones):
//! - owners are the raw ids from the tar, each at most [`MAX_IMAGE_ID`];
//! - modes keep setuid, setgid and sticky (chown first, then chmod);
//! - xattrs come from PAX `SCHILY.xattr.*`: `user.*` and `security.capability`
//!   only, never `user.overlay.*` (that would steer overlayfs);
//! - `.wh.NAME` becomes the overlayfs whiteout, a 0:0 character device NAME;
//!   `.wh..wh..opq` marks its directory `user.overlay.opaque=y`;
//! - device nodes and fifos are skipped (a sandbox's /dev is its own);
//! - hard links only to entries already in this layer.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::digest::Hashing;
use crate::error::io_err;
use crate::oci::Compression;
use crate::{Digest, ImageError, MAX_IMAGE_ID, MAX_LAYER_ENTRIES, MAX_LAYER_UNPACKED_BYTES};

/// What a tar entry's name means to a lower layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    /// The layer root itself (`./`).
    Root,
    /// A path inside the layer: parent components and the final name.
    Path {
        parent: Vec<&'a [u8]>,
        name: &'a [u8],
    },
    /// `.wh.NAME`: hide NAME from the layers below.
    Whiteout {
        parent: Vec<&'a [u8]>,
        name: &'a [u8],
    },
    /// `.wh..wh..opq`: hide everything below in this directory.
    Opaque { dir: Vec<&'a [u8]> },
    /// Other `.wh..wh.` names are aufs bookkeeping with no meaning here.
    AufsMeta,
}

/// Splits an entry name into components: a leading `/`, empty and `.`
/// components are dropped (as tar does); `..` anywhere is an escape.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&[u8]>, DotDot> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(DotDot),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What an entry name means, whiteouts included.
/// An entry name with a `..` component: it would leave the layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DotDot;

/// Why an entry name is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadName {
    Escapes,
    EmptyWhiteout,
}

pub(crate) fn target(raw: &[u8]) -> Result<Target<'_>, BadName> {
    let mut comps = components(raw).map_err(|DotDot| BadName::Escapes)?;
    let Some(name) = comps.pop() else {
        return Ok(Target::Root);
    };
    if name == b".wh..wh..opq" {
        return Ok(Target::Opaque { dir: comps });
    }
    if name.starts_with(b".wh..wh.") {
        return Ok(Target::AufsMeta);
    }
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        if hidden.is_empty() {
            return Err(BadName::EmptyWhiteout);
        }
        return Ok(Target::Whiteout {
            parent: comps,
            name: hidden,
        });
    }
    Ok(Target::Path {
        parent: comps,
        name,
    })
}

/// Whether an xattr from an image may be set on the unpacked file.
pub(crate) fn xattr_allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
}

/// Unpacks the layer blob at `blob_path` into `dst` (an existing empty
/// directory) and checks that the uncompressed stream is `layer.diff_id`.
pub(crate) fn unpack_layer(
    blob_path: &Path,
    compression: Compression,
    blob: &Digest,
    diff_id: &Digest,
    dst: &Path,
) -> Result<u64, ImageError> {
    let root = rustix::fs::open(
        dst,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::io("open", dst, e.into()))?;
    let mut unpacker = Unpacker {
        blob,
        root_path: dst,
        root,
        dir_times: Vec::new(),
        entries: 0,
    };
    let reader = open_uncompressed(blob_path, compression)?;
    let mut archive = tar::Archive::new(reader);
    let unreadable = |source| ImageError::LayerUnreadable {
        layer: blob.clone(),
        compression: compression.name(),
        source,
    };
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        unpacker.entry(&mut entry, compression)?;
    }
    unpacker.finish_dir_times()?;
    let entries = unpacker.entries;
    let reader = archive.into_inner();
    check_diff_id(reader, compression, blob, diff_id)?;
    Ok(entries)
}

/// Decompresses and hashes a layer blob without unpacking it: for a layer
/// whose directory another image already stored from a different blob.
pub(crate) fn verify_diff_id(
    blob_path: &Path,
    compression: Compression,
    blob: &Digest,
    diff_id: &Digest,
) -> Result<(), ImageError> {
    let reader = open_uncompressed(blob_path, compression)?;
    check_diff_id(reader, compression, blob, diff_id)
}

type Uncompressed = Capped<Hashing<Box<dyn Read>>>;

fn open_uncompressed(
    blob_path: &Path,
    compression: Compression,
) -> Result<Uncompressed, ImageError> {
    let file = File::open(blob_path).map_err(io_err("open", blob_path))?;
    let file = BufReader::with_capacity(256 * 1024, file);
    let inner: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        // Multi-member: a gzip stream may be several members back to back.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(file)
                .map_err(io_err("start zstd on", blob_path))?,
        ),
    };
    Ok(Capped {
        inner: Hashing::new(inner),
        limit: MAX_LAYER_UNPACKED_BYTES,
    })
}

/// Reads what the tar parser left (the end-of-archive blocks and padding:
/// they are part of the diff id) and compares.
fn check_diff_id(
    mut reader: Uncompressed,
    compression: Compression,
    blob: &Digest,
    diff_id: &Digest,
) -> Result<(), ImageError> {
    io::copy(&mut reader, &mut io::sink()).map_err(|source| ImageError::LayerUnreadable {
        layer: blob.clone(),
        compression: compression.name(),
        source,
    })?;
    let (got, _, _) = reader.inner.finish();
    if &got != diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("the uncompressed content of layer {blob}"),
            expected: diff_id.clone(),
            got,
        });
    }
    Ok(())
}

/// Fails a read once more than `limit` bytes came through: a small blob may
/// decompress to far more than the disk holds.
struct Capped<R> {
    inner: R,
    limit: u64,
}

impl<R: Read> Read for Capped<Hashing<R>> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.inner.count() > self.limit {
            return Err(io::Error::other(format!(
                "decompresses to more than {} bytes",
                self.limit
            )));
        }
        Ok(n)
    }
}

struct Unpacker<'a> {
    blob: &'a Digest,
    root_path: &'a Path,
    root: OwnedFd,
    /// Directory mtimes, set last: creating entries inside changes them.
    dir_times: Vec<(Vec<Vec<u8>>, Timestamps)>,
    entries: u64,
}

/// How an entry's ownership and mode are applied.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Unpacker<'_> {
    fn escapes(&self, entry: &str, reason: &'static str) -> ImageError {
        ImageError::LayerEscapes {
            layer: self.blob.clone(),
            entry: entry.to_string(),
            reason,
        }
    }

    fn invalid(&self, entry: &str, reason: &'static str) -> ImageError {
        ImageError::LayerInvalidEntry {
            layer: self.blob.clone(),
            entry: entry.to_string(),
            reason,
        }
    }

    fn path_of(&self, parent: &[&[u8]], name: &[u8]) -> PathBuf {
        let mut p = self.root_path.to_path_buf();
        for c in parent {
            p.push(OsStr::from_bytes(c));
        }
        p.push(OsStr::from_bytes(name));
        p
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        compression: Compression,
    ) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > MAX_LAYER_ENTRIES {
            return Err(ImageError::TooLarge {
                what: format!("layer {}", self.blob),
                limit: format!("{MAX_LAYER_ENTRIES} entries"),
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let unreadable = |source| ImageError::LayerUnreadable {
            layer: self.blob.clone(),
            compression: compression.name(),
            source,
        };
        let header = entry.header();
        let uid = header.uid().map_err(unreadable)?;
        let gid = header.gid().map_err(unreadable)?;
        for (kind, id) in [("uid", uid), ("gid", gid)] {
            if id > u64::from(MAX_IMAGE_ID) {
                return Err(ImageError::UidOutOfRange {
                    layer: self.blob.clone(),
                    entry: shown,
                    kind,
                    id,
                    max: MAX_IMAGE_ID,
                });
            }
        }
        let target = target(&raw).map_err(|bad| match bad {
            BadName::Escapes => self.escapes(&shown, "has a `..` component"),
            BadName::EmptyWhiteout => self.invalid(&shown, "is a whiteout naming nothing"),
        })?;
        let mode = header.mode().map_err(unreadable)? & 0o7777;
        let times = mtime(entry).map_err(unreadable)?;
        let xattrs = xattrs(entry).map_err(unreadable)?;
        let meta = Meta {
            uid: uid as u32,
            gid: gid as u32,
            mode,
            times,
            xattrs,
        };
        let is_dir = kind.is_dir() || (kind.is_file() && raw.ends_with(b"/"));

        match target {
            Target::AufsMeta => {
                tracing::debug!(entry = %shown, "aufs metadata entry skipped");
                Ok(())
            }
            Target::Root => {
                if !is_dir {
                    return Err(self.invalid(&shown, "names the layer root but is not a directory"));
                }
                let fd = rustix::fs::openat(
                    &self.root,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ImageError::io("open", self.root_path, e.into()))?;
                self.apply_dir_meta(&fd, self.root_path, &meta)?;
                self.dir_times.push((Vec::new(), meta.times));
                Ok(())
            }
            Target::Opaque { dir } => {
                let fd = self.dir(&dir, &shown)?;
                let path = self.path_of(&dir, b"");
                let dir_fd = rustix::fs::openat(
                    &fd,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ImageError::io("open", &path, e.into()))?;
                rustix::fs::fsetxattr(&dir_fd, "user.overlay.opaque", b"y", XattrFlags::empty())
                    .map_err(|e| ImageError::io("set user.overlay.opaque on", &path, e.into()))?;
                Ok(())
            }
            Target::Whiteout { parent, name } => {
                let fd = self.dir(&parent, &shown)?;
                self.clear(&fd, &parent, name, false)?;
                let path = self.path_of(&parent, name);
                rustix::fs::mknodat(
                    &fd,
                    name,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| ImageError::io("make whiteout", &path, e.into()))?;
                Ok(())
            }
            Target::Path { parent, name } => {
                let fd = self.dir(&parent, &shown)?;
                let path = self.path_of(&parent, name);
                if is_dir {
                    self.clear(&fd, &parent, name, true)?;
                    match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(ImageError::io("create", &path, e.into())),
                    }
                    let dir = rustix::fs::openat(
                        &fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| ImageError::io("open", &path, e.into()))?;
                    self.apply_dir_meta(&dir, &path, &meta)?;
                    let mut comps: Vec<Vec<u8>> = parent.iter().map(|c| c.to_vec()).collect();
                    comps.push(name.to_vec());
                    self.dir_times.push((comps, meta.times));
                    Ok(())
                } else if kind.is_file()
                    || kind == tar::EntryType::Continuous
                    || kind.is_gnu_sparse()
                {
                    self.clear(&fd, &parent, name, false)?;
                    let file = rustix::fs::openat(
                        &fd,
                        name,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|e| ImageError::io("create", &path, e.into()))?;
                    let mut file = File::from(file);
                    copy_data(entry, &mut file, &path).map_err(|e| match e {
                        CopyError::Read(source) => unreadable(source),
                        CopyError::Write(e) => e,
                    })?;
                    rustix::fs::fchown(&file, Some(uid_of(meta.uid)), Some(gid_of(meta.gid)))
                        .map_err(|e| ImageError::io("chown", &path, e.into()))?;
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode))
                        .map_err(|e| ImageError::io("chmod", &path, e.into()))?;
                    for (k, v) in &meta.xattrs {
                        rustix::fs::fsetxattr(&file, OsStr::from_bytes(k), v, XattrFlags::empty())
                            .map_err(|e| ImageError::io("set an xattr on", &path, e.into()))?;
                    }
                    rustix::fs::futimens(&file, &meta.times)
                        .map_err(|e| ImageError::io("set times on", &path, e.into()))?;
                    Ok(())
                } else if kind.is_symlink() {
                    let link = entry
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    if link.is_empty() {
                        return Err(self.invalid(&shown, "is a symlink to nothing"));
                    }
                    self.clear(&fd, &parent, name, false)?;
                    rustix::fs::symlinkat(OsStr::from_bytes(&link), &fd, name)
                        .map_err(|e| ImageError::io("create symlink", &path, e.into()))?;
                    rustix::fs::chownat(
                        &fd,
                        name,
                        Some(uid_of(meta.uid)),
                        Some(gid_of(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| ImageError::io("chown", &path, e.into()))?;
                    for (k, v) in &meta.xattrs {
                        // The kernel allows no user.* xattrs on symlinks.
                        if k.starts_with(b"user.") {
                            tracing::debug!(entry = %shown, "user xattr on a symlink skipped");
                            continue;
                        }
                        rustix::fs::lsetxattr(&path, OsStr::from_bytes(k), v, XattrFlags::empty())
                            .map_err(|e| ImageError::io("set an xattr on", &path, e.into()))?;
                    }
                    rustix::fs::utimensat(&fd, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| ImageError::io("set times on", &path, e.into()))?;
                    Ok(())
                } else if kind.is_hard_link() {
                    let link = entry
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    self.hard_link(&fd, &parent, name, &link, &shown)
                } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                    tracing::debug!(entry = %shown, "device node or fifo in a layer skipped");
                    Ok(())
                } else {
                    Err(self.invalid(&shown, "has an entry type this store does not know"))
                }
            }
        }
    }

    fn apply_dir_meta(&self, dir: &OwnedFd, path: &Path, meta: &Meta) -> Result<(), ImageError> {
        rustix::fs::fchown(dir, Some(uid_of(meta.uid)), Some(gid_of(meta.gid)))
            .map_err(|e| ImageError::io("chown", path, e.into()))?;
        rustix::fs::fchmod(dir, Mode::from_raw_mode(meta.mode))
            .map_err(|e| ImageError::io("chmod", path, e.into()))?;
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(dir, OsStr::from_bytes(k), v, XattrFlags::empty())
                .map_err(|e| ImageError::io("set an xattr on", path, e.into()))?;
        }
        Ok(())
    }

    /// Opens (as `O_PATH`) the directory `comps` inside the layer, creating
    /// missing ones as root-owned 0755. Resolution is beneath the layer root,
    /// so a `..` or a symlink leading out fails with EXDEV.
    fn dir(&self, comps: &[&[u8]], entry: &str) -> Result<OwnedFd, ImageError> {
        let resolve = |rel: &[&[u8]]| -> Result<OwnedFd, Errno> {
            let joined = rel.join(&b'/');
            let path: &[u8] = if joined.is_empty() { b"." } else { &joined };
            rustix::fs::openat2(
                &self.root,
                OsStr::from_bytes(path),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            )
        };
        let classify = |e: Errno, at: &[&[u8]]| match e {
            Errno::XDEV => self.escapes(entry, "goes through a symlink that leads"),
            Errno::LOOP => self.invalid(entry, "goes through a symlink loop"),
            Errno::NOTDIR => self.invalid(entry, "goes through something that is not a directory"),
            e => ImageError::io("open", self.path_of(at, b""), e.into()),
        };
        match resolve(comps) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(classify(e, comps)),
        }
        // Some component is missing: walk down, creating what is not there.
        let mut fd = resolve(&[]).map_err(|e| classify(e, &[]))?;
        for i in 0..comps.len() {
            match resolve(&comps[..=i]) {
                Ok(next) => fd = next,
                Err(Errno::NOENT) => {
                    let path = self.path_of(&comps[..=i], b"");
                    let name = OsStr::from_bytes(comps[i]);
                    rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755))
                        .map_err(|e| ImageError::io("create", &path, e.into()))?;
                    let made = rustix::fs::openat(
                        &fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| ImageError::io("open", &path, e.into()))?;
                    // Explicit, so neither the umask nor a setgid parent decides.
                    rustix::fs::fchown(&made, Some(uid_of(0)), Some(gid_of(0)))
                        .map_err(|e| ImageError::io("chown", &path, e.into()))?;
                    rustix::fs::fchmod(&made, Mode::from_raw_mode(0o755))
                        .map_err(|e| ImageError::io("chmod", &path, e.into()))?;
                    fd = resolve(&comps[..=i]).map_err(|e| classify(e, &comps[..=i]))?;
                }
                Err(e) => return Err(classify(e, &comps[..=i])),
            }
        }
        Ok(fd)
    }

    /// Removes whatever is at `name` so an entry can take its place (a later
    /// entry of the same name wins, as in tar). A directory stays when the
    /// new entry is a directory too.
    fn clear(
        &self,
        parent: &OwnedFd,
        parent_comps: &[&[u8]],
        name: &[u8],
        keep_dir: bool,
    ) -> Result<(), ImageError> {
        let path = self.path_of(parent_comps, name);
        let stat =
            match rustix::fs::statat(parent, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => s,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(ImageError::io("stat", &path, e.into())),
            };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if keep_dir {
                return Ok(());
            }
            // The parent was resolved beneath the root and nothing else
            // writes this staging directory, so the path names the same
            // directory; remove_dir_all does not follow symlinks inside.
            std::fs::remove_dir_all(&path).map_err(io_err("remove", &path))
        } else {
            rustix::fs::unlinkat(parent, OsStr::from_bytes(name), AtFlags::empty())
                .map_err(|e| ImageError::io("remove", &path, e.into()))
        }
    }

    fn hard_link(
        &self,
        fd: &OwnedFd,
        parent: &[&[u8]],
        name: &[u8],
        link: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        if link.starts_with(b"/") {
            return Err(self.escapes(shown, "is a hard link to an absolute path"));
        }
        let mut target =
            components(link).map_err(|_| self.escapes(shown, "is a hard link through `..`"))?;
        let Some(target_name) = target.pop() else {
            return Err(self.invalid(shown, "is a hard link to nothing"));
        };
        let not_here = || self.escapes(shown, "is a hard link to a file that is not in this layer");
        let joined = target.join(&b'/');
        let target_dir = rustix::fs::openat2(
            &self.root,
            OsStr::from_bytes(if joined.is_empty() { b"." } else { &joined }),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            Errno::NOENT | Errno::NOTDIR => not_here(),
            Errno::XDEV => self.escapes(shown, "is a hard link through a symlink that leads"),
            e => ImageError::io("open", self.path_of(&target, b""), e.into()),
        })?;
        let stat = rustix::fs::statat(
            &target_dir,
            OsStr::from_bytes(target_name),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| match e {
            Errno::NOENT => not_here(),
            e => ImageError::io("stat", self.path_of(&target, target_name), e.into()),
        })?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            return Err(self.invalid(shown, "is a hard link to a directory"));
        }
        if (&target[..], target_name) == (parent, name) {
            return Ok(()); // a link to itself: already there
        }
        self.clear(fd, parent, name, false)?;
        let path = self.path_of(parent, name);
        rustix::fs::linkat(
            &target_dir,
            OsStr::from_bytes(target_name),
            fd,
            OsStr::from_bytes(name),
            AtFlags::empty(),
        )
        .map_err(|e| ImageError::io("hard link", &path, e.into()))
    }

    fn finish_dir_times(&mut self) -> Result<(), ImageError> {
        for (comps, times) in std::mem::take(&mut self.dir_times) {
            let comps: Vec<&[u8]> = comps.iter().map(|c| c.as_slice()).collect();
            let Some((name, parent)) = comps.split_last() else {
                rustix::fs::futimens(&self.root, &times)
                    .map_err(|e| ImageError::io("set times on", self.root_path, e.into()))?;
                continue;
            };
            // A later entry may have replaced the directory; then it is gone
            // or no longer a directory, and its time was the later entry's.
            let Ok(fd) = self.dir(parent, "") else {
                continue;
            };
            let is_dir =
                rustix::fs::statat(&fd, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory);
            if is_dir {
                rustix::fs::utimensat(
                    &fd,
                    OsStr::from_bytes(name),
                    &times,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| {
                    ImageError::io("set times on", self.path_of(parent, name), e.into())
                })?;
            }
        }
        Ok(())
    }
}

fn uid_of(id: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(id)
}

fn gid_of(id: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(id)
}

/// The entry's mtime: PAX `mtime` (which may carry nanoseconds) when
/// present, else the header's seconds.
fn mtime<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Timestamps> {
    let mut ts = Timespec {
        tv_sec: entry.header().mtime()? as i64,
        tv_nsec: 0,
    };
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts.flatten() {
            if ext.key_bytes() == b"mtime"
                && let Ok(v) = ext.value()
            {
                let (s, frac) = v.split_once('.').unwrap_or((v, ""));
                if let Ok(s) = s.parse::<i64>() {
                    ts.tv_sec = s;
                    let digits: String = frac.chars().take(9).collect();
                    ts.tv_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                }
            }
        }
    }
    Ok(Timestamps {
        last_access: ts,
        last_modification: ts,
    })
}

/// PAX `SCHILY.xattr.*` records the store keeps (see [`xattr_allowed`]).
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if xattr_allowed(name) {
                out.push((name.to_vec(), ext.value_bytes().to_vec()));
            } else {
                tracing::debug!(xattr = %String::from_utf8_lossy(name), "image xattr not kept");
            }
        }
    }
    Ok(out)
}

enum CopyError {
    Read(io::Error),
    Write(ImageError),
}

/// Copies entry data, telling a bad layer (read) from a full disk (write).
fn copy_data(from: &mut impl Read, to: &mut File, path: &Path) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n])
            .map_err(|e| CopyError::Write(ImageError::io("write", path, e)))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_drop_leading_slashes_and_dots() {
        assert_eq!(
            components(b"/etc//./hello").unwrap(),
            vec![&b"etc"[..], b"hello"]
        );
        assert_eq!(components(b"./").unwrap(), Vec::<&[u8]>::new());
    }

    #[test]
    fn a_dotdot_anywhere_is_an_escape() {
        for p in [&b"../x"[..], b"a/../b", b"a/..", b"/.."] {
            assert!(components(p).is_err(), "{}", String::from_utf8_lossy(p));
        }
        assert!(components(b"a/..b/c..").is_ok());
    }

    #[test]
    fn whiteouts_map_to_overlay_markers() {
        assert_eq!(
            target(b"data/.wh.gone").unwrap(),
            Target::Whiteout {
                parent: vec![b"data"],
                name: b"gone"
            }
        );
        assert_eq!(
            target(b"./a/b/.wh..wh..opq").unwrap(),
            Target::Opaque {
                dir: vec![b"a", b"b"]
            }
        );
        assert_eq!(
            target(b".wh..wh.plnk/1234").unwrap(),
            Target::Path {
                parent: vec![b".wh..wh.plnk"],
                name: b"1234"
            }
        );
        assert_eq!(target(b"x/.wh..wh.aufs").unwrap(), Target::AufsMeta);
        assert_eq!(target(b"./").unwrap(), Target::Root);
        assert_eq!(
            target(b"etc/hello").unwrap(),
            Target::Path {
                parent: vec![b"etc"],
                name: b"hello"
            }
        );
        assert_eq!(target(b"x/.wh."), Err(BadName::EmptyWhiteout));
        assert_eq!(target(b"a/../.wh.x"), Err(BadName::Escapes));
    }

    #[test]
    fn only_user_and_capability_xattrs_are_kept() {
        assert!(xattr_allowed(b"user.mime_type"));
        assert!(xattr_allowed(b"security.capability"));
        assert!(!xattr_allowed(b"user.overlay.opaque"));
        assert!(!xattr_allowed(b"user.overlay.redirect"));
        assert!(!xattr_allowed(b"trusted.overlay.opaque"));
        assert!(!xattr_allowed(b"security.selinux"));
        assert!(!xattr_allowed(b"system.posix_acl_access"));
    }
}
