//! VM disks: an image flattened into one ext4 filesystem, built once per
//! manifest digest at `disks/sha256/<hex>` and shared, read-only, by every
//! VM sandbox of the image (each VM writes to a disk of its own above it).
//!
//! The layers are merged as overlayfs shows them (an upper entry replaces
//! a lower one, a whiteout deletes, an opaque directory hides what is
//! below) into a staging tree with every id shifted by [`ID_SHIFT`], so
//! image uid `u` is `u + 1` on the disk, exactly as a process sandbox sees
//! its idmapped layers: the guest's supervisor is uid 0 and sandbox code
//! runs in a nested user namespace that undoes the shift. `mke2fs -d` then
//! copies the tree into a new filesystem with its inode tables written now
//! (so the guest never pays for lazy initialisation) and no journal (the
//! disk is never written after it is built).

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, UTIME_OMIT};

use crate::error::{ImageError, io_err};
use crate::store::{ImageStore, remove_any};
use crate::unpack::xattr_allowed;
use crate::{Digest, Image};

/// What every id on an image's disk is shifted by (see the module docs).
pub const ID_SHIFT: u32 = 1;

/// The filesystem label of an image's disk; the guest finds it by label.
pub const LABEL: &str = "openshell-image";

impl ImageStore {
    pub(crate) fn disk_path(&self, digest: &Digest) -> PathBuf {
        self.root().join("disks/sha256").join(digest.hex())
    }

    /// The ext4 disk of `image`, built first if the store lacks it. Builds
    /// are serialised per store (they are rare and disk-bound), and a disk
    /// appears only complete (built under `tmp/`, synced, renamed in).
    pub fn disk(&self, image: &Image) -> Result<PathBuf, ImageError> {
        let path = self.disk_path(&image.digest);
        if path.is_file() {
            return Ok(path);
        }
        let _one = crate::store::lock(&self.disk_builds);
        if path.is_file() {
            return Ok(path);
        }
        let stage = self.new_tmp("disk")?;
        let built = build(self, image, &stage);
        let done = built.and_then(|file| {
            fs::rename(&file, &path).map_err(io_err("store the disk as", &path))?;
            crate::store::fsync_dir(path.parent().unwrap_or(Path::new("/")))
        });
        let _ = remove_any(&stage);
        done.map(|()| path)
    }
}

fn build(store: &ImageStore, image: &Image, stage: &Path) -> Result<PathBuf, ImageError> {
    let tree = stage.join("tree");
    fs::create_dir(&tree).map_err(io_err("create", &tree))?;
    let mut merge = Merge::default();
    for layer in store.layer_dirs(image) {
        merge.inodes.clear();
        merge.layer(&layer, &tree, Path::new(""))?;
    }
    merge.finish()?;
    // The image's root is image root's, shifted like everything else.
    std::os::unix::fs::lchown(&tree, Some(ID_SHIFT), Some(ID_SHIFT))
        .map_err(io_err("chown", &tree))?;
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &tree))?;
    let file = stage.join("disk.ext4");
    let (bytes, inodes) = usage(&tree)?;
    // Room for the files, ext4's metadata (about 5% here) and slack, so
    // that the tree always fits; a second try doubles it.
    let mut size = (bytes + inodes * 4096) / 20 * 23 + (64 << 20);
    for attempt in 0..2 {
        let _ = fs::remove_file(&file);
        match mkfs(&tree, &file, size, inodes * 11 / 10 + 1024) {
            Ok(()) => {
                let f = fs::File::open(&file).map_err(io_err("open", &file))?;
                f.sync_all().map_err(io_err("sync", &file))?;
                // Shared read-only by VMs running as different uids, which
                // reach it only through a descriptor the host hands them.
                fs::set_permissions(&file, fs::Permissions::from_mode(0o444))
                    .map_err(io_err("chmod", &file))?;
                return Ok(file);
            }
            Err(why) if attempt == 0 && why.contains("space") => size *= 2,
            Err(why) => {
                return Err(ImageError::DiskBuild {
                    image: image.digest.to_string(),
                    reason: why,
                });
            }
        }
    }
    unreachable!("the loop returns on its second try")
}

fn mkfs(tree: &Path, file: &Path, size: u64, inodes: u64) -> Result<(), String> {
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-O", "^has_journal"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!(
            "lazy_itable_init=0,root_owner={ID_SHIFT}:{ID_SHIFT}"
        ))
        .args(["-L", LABEL])
        .arg("-d")
        .arg(tree)
        .arg(file)
        .arg(format!("{}k", size.div_ceil(1 << 20) * 1024))
        .output()
        .map_err(|e| format!("cannot run mke2fs (install e2fsprogs): {e}"))?;
    if out.status.success() {
        // mke2fs's lost+found is real root's: unmapped in the guest, and a
        // read-only disk never needs it.
        let _ = Command::new("debugfs")
            .args(["-w", "-R", "rmdir /lost+found"])
            .arg(file)
            .output();
        Ok(())
    } else {
        Err(format!(
            "mke2fs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Allocated bytes and inodes under `tree`.
fn usage(tree: &Path) -> Result<(u64, u64), ImageError> {
    let (mut bytes, mut inodes) = (0, 1);
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let meta = entry.metadata().map_err(io_err("stat", entry.path()))?;
            bytes += meta.blocks() * 512;
            inodes += 1;
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// The merge of one image's layers into a staging tree.
#[derive(Default)]
struct Merge {
    /// Hard links within the current layer: (dev, ino) → its staged path.
    inodes: HashMap<(u64, u64), PathBuf>,
    /// Directories and their mtimes, set last (adding entries changes them).
    dir_times: Vec<(PathBuf, i64, i64)>,
}

impl Merge {
    /// Applies the layer directory `src` (at `rel` below the layer's root)
    /// over `dst`.
    fn layer(&mut self, src_root: &Path, dst_root: &Path, rel: &Path) -> Result<(), ImageError> {
        let src_dir = src_root.join(rel);
        for entry in fs::read_dir(&src_dir).map_err(io_err("list", &src_dir))? {
            let entry = entry.map_err(io_err("list", &src_dir))?;
            let rel = rel.join(entry.file_name());
            let src = src_root.join(&rel);
            let dst = dst_root.join(&rel);
            let meta = fs::symlink_metadata(&src).map_err(io_err("stat", &src))?;
            let kind = FileType::from_raw_mode(meta.mode());
            if kind == FileType::CharacterDevice && meta.rdev() == 0 {
                // A whiteout: nothing of this name from below.
                remove_if_there(&dst)?;
                continue;
            }
            if kind == FileType::Directory {
                let opaque = rustix::fs::lgetxattr(&src, "user.overlay.opaque", &mut [0u8; 4])
                    .is_ok_and(|n| n == 1);
                let is_dir = fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir());
                if !is_dir || opaque {
                    remove_if_there(&dst)?;
                    fs::create_dir(&dst).map_err(io_err("create", &dst))?;
                }
                self.attributes(&src, &dst, &meta)?;
                self.dir_times
                    .push((dst.clone(), meta.mtime(), meta.mtime_nsec()));
                self.layer(src_root, dst_root, &rel)?;
                continue;
            }
            remove_if_there(&dst)?;
            let key = (meta.dev(), meta.ino());
            if kind == FileType::RegularFile && meta.nlink() > 1 {
                if let Some(first) = self.inodes.get(&key) {
                    fs::hard_link(first, &dst).map_err(io_err("link", &dst))?;
                    continue;
                }
                self.inodes.insert(key, dst.clone());
            }
            match kind {
                FileType::RegularFile => {
                    fs::copy(&src, &dst).map_err(io_err("copy", &src))?;
                }
                FileType::Symlink => {
                    let target = fs::read_link(&src).map_err(io_err("read", &src))?;
                    std::os::unix::fs::symlink(target, &dst).map_err(io_err("link", &dst))?;
                }
                FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &dst,
                        kind,
                        Mode::from_raw_mode(meta.mode() & 0o7777),
                        meta.rdev(),
                    )
                    .map_err(|e| ImageError::io("create", &dst, e.into()))?;
                }
                // Sockets are not in images (the unpacker refuses them).
                _ => continue,
            }
            self.attributes(&src, &dst, &meta)?;
            if kind != FileType::Symlink {
                set_times(&dst, meta.mtime(), meta.mtime_nsec())?;
            }
        }
        Ok(())
    }

    /// Owner (shifted), mode and the xattrs an image may carry.
    fn attributes(&self, src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<(), ImageError> {
        let shift = |id: u32| Some(id + ID_SHIFT);
        std::os::unix::fs::lchown(dst, shift(meta.uid()), shift(meta.gid()))
            .map_err(io_err("chown", dst))?;
        if !meta.file_type().is_symlink() {
            // After chown, which clears setuid and setgid bits.
            fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_err("chmod", dst))?;
        }
        let mut names = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(src, &mut names).unwrap_or(0);
        for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !xattr_allowed(name) {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name);
            let mut value = vec![0u8; 64 << 10];
            let len = rustix::fs::lgetxattr(src, name, &mut value)
                .map_err(|e| ImageError::io("read xattrs of", src, e.into()))?;
            rustix::fs::lsetxattr(dst, name, &value[..len], rustix::fs::XattrFlags::empty())
                .map_err(|e| ImageError::io("set xattrs on", dst, e.into()))?;
        }
        Ok(())
    }

    /// Directory mtimes, deepest first.
    fn finish(&mut self) -> Result<(), ImageError> {
        self.dir_times
            .sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        for (dir, sec, nsec) in &self.dir_times {
            set_times(dir, *sec, *nsec)?;
        }
        Ok(())
    }
}

fn remove_if_there(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(_) => remove_any(path),
        Err(_) => Ok(()),
    }
}

fn set_times(path: &Path, sec: i64, nsec: i64) -> Result<(), ImageError> {
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| ImageError::io("set the times of", path, e.into()))
}
