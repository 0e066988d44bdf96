//! The store on disk, and the one way anything enters it.
//!
//! ```text
//! <root>/            mode 0700, root's
//!   lock             flock'd while an ImageStore has the root open
//!   blobs/sha256/<hex>     manifests, configs, compressed layers
//!   layers/sha256/<hex>/   one unpacked layer per diff id (an overlay lowerdir)
//!   images/<hex>.json      a name record: {name, digest}; hex = sha256(name)
//!   tmp/                   staging; emptied at open
//! ```
//!
//! There are no digest records: an image is its manifest blob, which is
//! content-addressed and was verified on the way in, and a manifest is
//! renamed into `blobs/` only after its config and layers are in place.
//! A stored image with no name left is a "digest-only" image: `get` and
//! `resolve` by digest still find it (a sandbox may be using it) until a gc
//! that does not keep it.
//!
//! Writers stage under `tmp/` (a [`Staging`]), then [`Staging::commit`]
//! renames layers and blobs into place, syncs the filesystem, renames the
//! manifest, and writes the names. Staging pins every digest it relies on, so
//! a concurrent gc keeps those even before a name points at them.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::digest::Hashing;
use crate::error::io_err;
use crate::oci::{self, Document, LayerPlan};
use crate::reference::ImageRef;
use crate::{Digest, GcReport, Image, ImageConfig, ImageError, MAX_JSON_BYTES};

/// The image store. One per root per process (the root is flock'd), shared
/// by reference: every method takes `&self`.
pub struct ImageStore {
    root: PathBuf,
    _lock: File,
    /// Digests that in-progress pulls and imports rely on: gc keeps them.
    pins: Mutex<HashMap<Digest, usize>>,
    /// One pull per manifest digest at a time, so two creates of the same
    /// image download it once: the second waits, then finds it stored.
    flights: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    next_tmp: AtomicU64,
    /// VM disk builds, one at a time ([`ImageStore::disk`]).
    pub(crate) disk_builds: Mutex<()>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct NameRecord {
    name: String,
    digest: Digest,
}

/// A stored image's parts, read back from its manifest and config blobs.
pub(crate) struct Stored {
    pub(crate) config_blob: Digest,
    pub(crate) layers: Vec<LayerPlan>,
    pub(crate) config: ImageConfig,
}

/// How long [`ImageStore::open`] waits for another holder of the root.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (each
    // update is one insert or remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mkdir_private(path: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("create", path))
}

pub(crate) fn fsync_dir(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", path))
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`: a directory of mode
    /// 0700 owned by root. Leftovers of a crashed pull or import in `tmp/`
    /// are removed.
    /// The process's one store at `root`: the open one if this process
    /// has it open already (a gateway restarted in the same process), else
    /// a newly opened one. Opening a root twice in one process would
    /// conflict with itself on the lock.
    pub fn shared(root: &Path) -> Result<std::sync::Arc<ImageStore>, ImageError> {
        use std::sync::{Arc, Weak};
        static OPEN: Mutex<Vec<(PathBuf, Weak<ImageStore>)>> = Mutex::new(Vec::new());
        let mut open = lock(&OPEN);
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(store) = open
            .iter()
            .find(|(p, _)| p == root)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(store);
        }
        let store = Arc::new(ImageStore::open(root)?);
        open.push((root.to_path_buf(), Arc::downgrade(&store)));
        Ok(store)
    }

    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        if !rustix::process::geteuid().is_root() {
            return Err(ImageError::NotRoot);
        }
        mkdir_private(root)?;
        let meta = fs::symlink_metadata(root).map_err(io_err("stat", root))?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(ImageError::InsecureStore {
                path: root.to_path_buf(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
            });
        }
        let lock_path = root.join("lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // A holder that is going away (a gateway restarting in the same
        // process, one stopping beside us) gets a moment to let go.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match rustix::fs::flock(
                &lock_file,
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => break,
                Err(Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(Errno::WOULDBLOCK) => {
                    return Err(ImageError::StoreBusy {
                        path: root.to_path_buf(),
                    });
                }
                Err(e) => return Err(ImageError::io("lock", &lock_path, e.into())),
            }
        }
        let store = ImageStore {
            root: root.to_path_buf(),
            _lock: lock_file,
            pins: Mutex::default(),
            flights: Mutex::default(),
            next_tmp: AtomicU64::new(0),
            disk_builds: Mutex::default(),
        };
        for dir in [
            store.root.join("blobs/sha256"),
            store.root.join("layers/sha256"),
            store.root.join("disks/sha256"),
            store.names_dir(),
            store.tmp_dir(),
        ] {
            mkdir_private(&dir)?;
        }
        let tmp = store.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let path = entry.map_err(io_err("list", &tmp))?.path();
            tracing::info!(path = %path.display(), "removing leftover of an interrupted image pull or import");
            remove_any(&path)?;
        }
        Ok(store)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub(crate) fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    fn names_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    fn name_path(&self, name: &str) -> PathBuf {
        self.names_dir()
            .join(format!("{}.json", Digest::of(name.as_bytes()).hex()))
    }

    /// Where a caller stages an archive before [`ImageStore::import`]:
    /// inside the root-only tree (so no other user can read it), emptied
    /// at the next open like every other leftover.
    pub fn upload_dir(&self) -> PathBuf {
        self.tmp_dir()
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh directory under `tmp/`.
    pub(crate) fn new_tmp(&self, what: &str) -> Result<PathBuf, ImageError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self
            .tmp_dir()
            .join(format!("{what}-{}-{n}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err("create", &path))?;
        Ok(path)
    }

    /// The unpacked layer directories of `image`, bottom layer first.
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().map(|d| self.layer_path(d)).collect()
    }

    /// The image with manifest `digest`; `NotFound` if it is not stored.
    pub fn get(&self, digest: &Digest) -> Result<Image, ImageError> {
        self.image(digest)?.ok_or_else(|| ImageError::NotFound {
            image: digest.to_string(),
        })
    }

    /// A stored name (normalised first, so `python:3.12` works), a manifest
    /// digest `sha256:…`, or `name@sha256:…`.
    pub fn resolve(&self, name_or_digest: &str) -> Result<Option<Image>, ImageError> {
        if name_or_digest.starts_with("sha256:") {
            return self.image(&Digest::parse(name_or_digest)?);
        }
        let r = ImageRef::parse(name_or_digest)?;
        let name = r.to_string();
        if let Some(rec) = self.read_names()?.into_iter().find(|rec| rec.name == name) {
            return self.image(&rec.digest);
        }
        match &r.digest {
            Some(d) => self.image(d),
            None => Ok(None),
        }
    }

    /// Every image with a name, sorted by first name.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut by_digest: HashMap<Digest, Vec<String>> = HashMap::new();
        for rec in self.read_names()? {
            by_digest.entry(rec.digest).or_default().push(rec.name);
        }
        let mut out = Vec::new();
        for (digest, mut names) in by_digest {
            names.sort();
            if let Some(mut image) = self.stored_image(&digest)? {
                image.names = names;
                out.push(image);
            }
        }
        out.sort_by(|a, b| a.names.cmp(&b.names));
        Ok(out)
    }

    /// Removes a name; given a digest, every name of that image. The image's
    /// blobs and layers stay until a [`gc`](Self::gc) that does not keep it.
    /// Returns the image as it was.
    pub fn remove(&self, name_or_digest: &str) -> Result<Image, ImageError> {
        let not_found = || ImageError::NotFound {
            image: name_or_digest.to_string(),
        };
        let names = self.read_names()?;
        // Removing by digest removes every name of it.
        let all_names_of = |d: Digest| {
            let doomed = names
                .iter()
                .filter(|r| r.digest == d)
                .map(|r| r.name.clone())
                .collect();
            (d, doomed)
        };
        let (digest, doomed): (Digest, Vec<String>) = if name_or_digest.starts_with("sha256:") {
            all_names_of(Digest::parse(name_or_digest)?)
        } else {
            let r = ImageRef::parse(name_or_digest)?;
            let name = r.to_string();
            match names.iter().find(|rec| rec.name == name) {
                Some(rec) => (rec.digest.clone(), vec![name]),
                None => all_names_of(r.digest.clone().ok_or_else(not_found)?),
            }
        };
        let image = self.image(&digest)?.ok_or_else(not_found)?;
        for name in &doomed {
            let path = self.name_path(name);
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        fsync_dir(&self.names_dir())?;
        Ok(image)
    }

    /// Removes every blob and unpacked layer not reachable from a named
    /// image or from a digest in `keep` (images that sandboxes use).
    ///
    /// Holds the pin lock while it decides and renames the doomed into a
    /// trash directory (quick), so a pull cannot start relying on a blob gc
    /// is taking; the slow deletion happens after, unlocked.
    pub fn gc(&self, keep: &HashSet<Digest>) -> Result<GcReport, ImageError> {
        let trash = self.new_tmp("gc")?;
        let mut report = GcReport::default();
        {
            let pins = lock(&self.pins);
            let mut roots: HashSet<Digest> = keep.clone();
            roots.extend(self.read_names()?.into_iter().map(|r| r.digest));
            roots.extend(pins.keys().cloned());
            let mut blobs: HashSet<Digest> = roots.clone();
            let mut layers: HashSet<Digest> = roots.clone();
            for root in &roots {
                if let Some(s) = self.read_stored(root)? {
                    blobs.insert(s.config_blob);
                    for l in s.layers {
                        blobs.insert(l.blob);
                        layers.insert(l.diff_id);
                    }
                }
            }
            for (dir, reachable, kind) in [
                (self.root.join("blobs/sha256"), &blobs, "blob"),
                (self.root.join("layers/sha256"), &layers, "layer"),
                (self.root.join("disks/sha256"), &roots, "disk"),
            ] {
                for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                    let entry = entry.map_err(io_err("list", &dir))?;
                    let name = entry.file_name();
                    let digest = name
                        .to_str()
                        .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok());
                    if digest.is_some_and(|d| reachable.contains(&d)) {
                        continue;
                    }
                    let path = entry.path();
                    let to = trash.join(format!("{kind}-{}", name.to_string_lossy()));
                    match kind {
                        "layer" => report.layers_removed += 1,
                        "blob" => report.blobs_removed += 1,
                        _ => {}
                    }
                    fs::rename(&path, &to).map_err(io_err("move to trash", &path))?;
                }
            }
        }
        report.reclaimed_bytes = disk_usage(&trash);
        remove_any(&trash)?;
        Ok(report)
    }

    /// The image with its names, if stored and complete.
    fn image(&self, digest: &Digest) -> Result<Option<Image>, ImageError> {
        let Some(mut image) = self.stored_image(digest)? else {
            return Ok(None);
        };
        image.names = self
            .read_names()?
            .into_iter()
            .filter(|r| &r.digest == digest)
            .map(|r| r.name)
            .collect();
        image.names.sort();
        Ok(Some(image))
    }

    /// The image without names, if its manifest, config and every layer are
    /// here (a crash in the middle of a gc can leave a manifest whose layers
    /// are gone: that image is not stored).
    pub(crate) fn stored_image(&self, digest: &Digest) -> Result<Option<Image>, ImageError> {
        let Some(s) = self.read_stored(digest)? else {
            return Ok(None);
        };
        if !s
            .layers
            .iter()
            .all(|l| self.layer_path(&l.diff_id).is_dir() && self.blob_path(&l.blob).is_file())
        {
            return Ok(None);
        }
        Ok(Some(Image {
            names: Vec::new(),
            digest: digest.clone(),
            size: s.layers.iter().map(|l| l.size).sum(),
            config: s.config,
            layers: s.layers.into_iter().map(|l| l.diff_id).collect(),
        }))
    }

    /// Reads a manifest and its config back from `blobs/`; `None` when the
    /// manifest or config blob is absent or the blob is not an image manifest.
    pub(crate) fn read_stored(&self, digest: &Digest) -> Result<Option<Stored>, ImageError> {
        let what = format!("stored manifest {digest}");
        let Some(bytes) = self.read_small_blob(digest)? else {
            return Ok(None);
        };
        let Ok(Document::Manifest(manifest)) = oci::parse_document(&what, &bytes) else {
            return Ok(None);
        };
        let plan = oci::plan_manifest(&what, &manifest)?;
        let Some(config_bytes) = self.read_small_blob(&plan.config)? else {
            return Ok(None);
        };
        let config = oci::plan_config(&what, &plan, &config_bytes)?;
        Ok(Some(Stored {
            config_blob: plan.config,
            layers: config.layers,
            config: config.config,
        }))
    }

    fn read_small_blob(&self, d: &Digest) -> Result<Option<Vec<u8>>, ImageError> {
        let path = self.blob_path(d);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("open", path, e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        Ok(Some(bytes))
    }

    fn read_names(&self) -> Result<Vec<NameRecord>, ImageError> {
        let dir = self.names_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let path = entry.map_err(io_err("list", &dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            match serde_json::from_slice::<NameRecord>(&bytes) {
                Ok(rec) => out.push(rec),
                // One unreadable record must not hide every other image.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable image name record skipped")
                }
            }
        }
        Ok(out)
    }

    /// Writes `bytes` to `dest` so that a crash leaves either the old file or
    /// the new one: a temp file in `tmp/`, fsync, rename, fsync the directory.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp_dir()
            .join(format!("record-{}-{n}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            f.write_all(bytes).map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("sync", &tmp))?;
            fs::rename(&tmp, dest).map_err(io_err("rename into place", dest))?;
            fsync_dir(dest.parent().expect("records live in a directory"))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_names(&self, digest: &Digest, names: &[String]) -> Result<(), ImageError> {
        for name in names {
            let rec = NameRecord {
                name: name.clone(),
                digest: digest.clone(),
            };
            let bytes = serde_json::to_vec(&rec).expect("a record of strings serialises");
            self.write_atomic(&self.name_path(name), &bytes)?;
        }
        Ok(())
    }

    fn pin(&self, d: &Digest) {
        *lock(&self.pins).entry(d.clone()).or_default() += 1;
    }

    fn unpin(&self, d: &Digest) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                pins.remove(d);
            }
        }
    }

    fn pin_count(&self, d: &Digest) -> usize {
        lock(&self.pins).get(d).copied().unwrap_or(0)
    }

    /// Waits until no other pull of manifest `d` is in flight, and holds
    /// that until the guard drops. An async lock, held across the download on
    /// purpose: the download is what it serialises.
    pub(crate) async fn flight(&self, d: &Digest) -> FlightGuard<'_> {
        let m = lock(&self.flights).entry(d.clone()).or_default().clone();
        let guard = m.lock_owned().await;
        FlightGuard {
            store: self,
            key: d.clone(),
            guard: Some(guard),
        }
    }
}

pub(crate) struct FlightGuard<'s> {
    store: &'s ImageStore,
    key: Digest,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut flights = lock(&self.store.flights);
        // Only the map holds it: nobody waits, forget the entry.
        if flights
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            flights.remove(&self.key);
        }
    }
}

/// A rename onto a directory that exists and is not empty.
fn already_there(e: &std::io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|n| n == Errno::NOTEMPTY.raw_os_error() || n == Errno::EXIST.raw_os_error())
}

/// syncfs(2) on the filesystem holding `path`.
pub(crate) fn sync_filesystem(path: &Path) -> Result<(), ImageError> {
    let dir = File::open(path).map_err(io_err("open", path))?;
    rustix::fs::syncfs(&dir).map_err(|e| ImageError::io("sync", path, e.into()))
}

/// Bytes the files and directories below `dir` occupy (allocated blocks,
/// each hard-linked inode once): what removing them gives back.
fn disk_usage(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

pub(crate) fn remove_any(path: &Path) -> Result<(), ImageError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("stat", path, e)),
    };
    if meta.is_dir() {
        fs::remove_dir_all(path).map_err(io_err("remove", path))
    } else {
        fs::remove_file(path).map_err(io_err("remove", path))
    }
}

/// One pull's or import's work in progress: a directory under `tmp/` with
/// the blobs and layers not yet in the store. Dropped without a commit, it
/// removes that directory, so the store is as it was.
pub(crate) struct Staging<'s> {
    store: &'s ImageStore,
    dir: PathBuf,
    pins: Vec<Digest>,
    blobs: Vec<Digest>,
    layers: Vec<Digest>,
}

impl<'s> Staging<'s> {
    pub(crate) fn new(store: &'s ImageStore) -> Result<Staging<'s>, ImageError> {
        let dir = store.new_tmp("stage")?;
        for sub in ["blobs", "layers"] {
            mkdir_private(&dir.join(sub))?;
        }
        Ok(Staging {
            store,
            dir,
            pins: Vec::new(),
            blobs: Vec::new(),
            layers: Vec::new(),
        })
    }

    /// A scratch directory inside this staging (an archive being read).
    pub(crate) fn scratch(&self, name: &str) -> Result<PathBuf, ImageError> {
        let path = self.dir.join(name);
        mkdir_private(&path)?;
        Ok(path)
    }

    /// Keeps `d` from gc until this staging ends. Pin before checking
    /// whether a blob is stored: then a gc either ran before (and the check
    /// sees it gone) or keeps it.
    pub(crate) fn pin(&mut self, d: &Digest) {
        self.store.pin(d);
        self.pins.push(d.clone());
    }

    pub(crate) fn blob_stored(&self, d: &Digest) -> bool {
        self.store.blob_path(d).is_file()
    }

    pub(crate) fn layer_stored(&self, diff_id: &Digest) -> bool {
        self.store.layer_path(diff_id).is_dir()
    }

    pub(crate) fn staged_blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.hex())
    }

    pub(crate) fn staged_layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join("layers").join(diff_id.hex())
    }

    /// Where blob `d` can be read: staged here, or already in the store.
    pub(crate) fn blob_source(&self, d: &Digest) -> PathBuf {
        if self.blobs.contains(d) {
            self.staged_blob_path(d)
        } else {
            self.store.blob_path(d)
        }
    }

    pub(crate) fn has_staged_blob(&self, d: &Digest) -> bool {
        self.blobs.contains(d)
    }

    /// Records that the caller wrote and verified `staged_blob_path(d)`.
    pub(crate) fn blob_staged(&mut self, d: &Digest) {
        if !self.blobs.contains(d) {
            self.blobs.push(d.clone());
        }
    }

    /// Records that the caller unpacked `staged_layer_path(diff_id)`.
    pub(crate) fn layer_staged(&mut self, diff_id: &Digest) {
        if !self.layers.contains(diff_id) {
            self.layers.push(diff_id.clone());
        }
    }

    /// Stages a small blob held in memory, checking its digest.
    pub(crate) fn add_blob_bytes(
        &mut self,
        d: &Digest,
        bytes: &[u8],
        what: &str,
    ) -> Result<(), ImageError> {
        let got = Digest::of(bytes);
        if &got != d {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: d.clone(),
                got,
            });
        }
        if self.blob_stored(d) || self.blobs.contains(d) {
            return Ok(());
        }
        let path = self.staged_blob_path(d);
        write_synced(&path, bytes)?;
        self.blob_staged(d);
        Ok(())
    }

    /// Stages a blob from a reader, hashing as it copies; it must be `size`
    /// bytes with digest `d`.
    pub(crate) fn add_blob_reader(
        &mut self,
        d: &Digest,
        size: u64,
        reader: impl Read,
        what: &str,
    ) -> Result<(), ImageError> {
        let path = self.staged_blob_path(d);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        // One byte past the declared size is enough to know it is too big.
        let mut src = Hashing::new(reader.take(size + 1));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::io("read", what, e)),
            };
            file.write_all(&buf[..n]).map_err(io_err("write", &path))?;
        }
        let (got, count, _) = src.finish();
        crate::digest::verify(what, d, size, &got, count)?;
        file.sync_all().map_err(io_err("sync", &path))?;
        self.blob_staged(d);
        Ok(())
    }

    /// Unpacks (or, when the layer directory is already stored, verifies) a
    /// layer whose blob is staged or stored.
    pub(crate) fn add_layer(&mut self, layer: &LayerPlan) -> Result<(), ImageError> {
        let job = self.layer_job(layer);
        let staged = job.run()?;
        if staged {
            self.layer_staged(&layer.diff_id);
        }
        Ok(())
    }

    /// What `add_layer` does, as a value that can move to a blocking thread.
    pub(crate) fn layer_job(&self, layer: &LayerPlan) -> LayerJob {
        let layer_stored =
            self.layer_stored(&layer.diff_id) || self.layers.contains(&layer.diff_id);
        let blob_new = self.blobs.contains(&layer.blob);
        LayerJob {
            plan: layer.clone(),
            blob: self.blob_source(&layer.blob),
            dst: (!layer_stored).then(|| self.staged_layer_path(&layer.diff_id)),
            verify_only: layer_stored && blob_new,
        }
    }

    /// Moves everything staged into the store: layers and blobs, a sync of
    /// the filesystem, the manifest last, then `names` pointing at it.
    /// On failure, what this commit placed (and nobody else relies on) is
    /// taken back out.
    pub(crate) fn commit(self, manifest: &Digest, names: &[String]) -> Result<(), ImageError> {
        let mut placed: Vec<(PathBuf, Digest)> = Vec::new();
        let result = self.commit_inner(manifest, names, &mut placed);
        if result.is_err() {
            for (path, d) in placed.iter().rev() {
                if self.store.pin_count(d) <= 1 {
                    let _ = remove_any(path);
                }
            }
        }
        result
    }

    fn commit_inner(
        &self,
        manifest: &Digest,
        names: &[String],
        placed: &mut Vec<(PathBuf, Digest)>,
    ) -> Result<(), ImageError> {
        let store = self.store;
        if self.layers.is_empty() && self.blobs.is_empty() {
            return store.write_names(manifest, names);
        }
        for d in &self.layers {
            let (from, to) = (self.staged_layer_path(d), store.layer_path(d));
            match fs::rename(&from, &to) {
                Ok(()) => placed.push((to, d.clone())),
                // Another pull or import of an image with this layer won.
                Err(e) if already_there(&e) => {}
                Err(e) => return Err(ImageError::io("move into place", to, e)),
            }
        }
        for d in self.blobs.iter().filter(|d| *d != manifest) {
            let (from, to) = (self.staged_blob_path(d), store.blob_path(d));
            if to.is_file() {
                continue;
            }
            fs::rename(&from, &to).map_err(io_err("move into place", &to))?;
            placed.push((to, d.clone()));
        }
        // Layer files are written without an fsync each (a base image has
        // tens of thousands): one syncfs makes them durable before the
        // manifest that declares the image complete.
        sync_filesystem(&store.root)?;
        if self.blobs.contains(manifest) {
            let (from, to) = (self.staged_blob_path(manifest), store.blob_path(manifest));
            if !to.is_file() {
                fs::rename(&from, &to).map_err(io_err("move into place", &to))?;
                placed.push((to, manifest.clone()));
            }
        }
        fsync_dir(&store.root.join("blobs/sha256"))?;
        fsync_dir(&store.root.join("layers/sha256"))?;
        store.write_names(manifest, names)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if let Err(e) = remove_any(&self.dir) {
            tracing::warn!(error = %e, "staging directory left behind; the next open removes it");
        }
        for d in std::mem::take(&mut self.pins) {
            self.store.unpin(&d);
        }
    }
}

/// A layer to unpack or verify, owned, for `spawn_blocking`.
pub(crate) struct LayerJob {
    plan: LayerPlan,
    blob: PathBuf,
    dst: Option<PathBuf>,
    verify_only: bool,
}

impl LayerJob {
    /// Returns whether a layer directory was staged.
    pub(crate) fn run(self) -> Result<bool, ImageError> {
        let LayerPlan {
            blob,
            compression,
            diff_id,
            ..
        } = &self.plan;
        match &self.dst {
            Some(dst) => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dst)
                    .map_err(io_err("create", dst))?;
                // The layer root is the merged root's attributes when this
                // layer is on top: 0755 whatever the umask, unless the tar
                // lists `./` with its own.
                fs::set_permissions(dst, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("chmod", dst))?;
                crate::unpack::unpack_layer(&self.blob, *compression, blob, diff_id, dst)?;
                Ok(true)
            }
            None if self.verify_only => {
                crate::unpack::verify_diff_id(&self.blob, *compression, blob, diff_id)?;
                Ok(false)
            }
            None => Ok(false),
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}
