//! The index service: the collections under a data directory, the embedding models they
//! are bound to, ingestion jobs, and two background threads (periodic commits; upkeep:
//! consolidation and log rewrites).
//!
//! One process owns a data directory at a time (an exclusive lock on `data/LOCK`): the
//! single-writer rule that makes the log the one source of truth.

use crate::collection::Collection;
use crate::embedder::ChunkEmbedder;

/// Largest vector dimension of a collection without a model.
pub const MAX_DIMENSION: usize = 16_384;
use crate::error::{IndexError, Result};
use crate::jobs::JobRegistry;
use crate::postgres::{PgDatabase, PgOptions, PgStore};
use crate::types::*;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

/// How often PostgreSQL's catalog is read again, at most (for collections other ragway
/// servers created or dropped).
const CATALOG_REFRESH: Duration = Duration::from_secs(1);

/// Service options.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// How often writes that nobody waits for are made searchable.
    pub commit_interval: Duration,
    /// Server-side ingestion paths must lie under this directory; `None` refuses them.
    pub ingest_root: Option<PathBuf>,
    /// Snapshots are written under this directory.
    pub snapshot_root: PathBuf,
    /// Drift monitoring of every collection's queries.
    pub drift: crate::drift::DriftConfig,
    /// PostgreSQL + pgvector for new collections; `None`: the embedded store.
    pub postgres: Option<PgOptions>,
}

pub struct IndexService {
    data_dir: PathBuf,
    options: ServiceOptions,
    embedders: HashMap<String, Arc<dyn ChunkEmbedder>>,
    default_model: String,
    collections: RwLock<HashMap<String, Arc<Collection>>>,
    /// Where new collections live when PostgreSQL is configured.
    postgres: Option<Arc<PgDatabase>>,
    /// Serializes reading PostgreSQL's catalog against creating and dropping collections
    /// there; holds when the catalog was last read.
    catalog: Mutex<Option<Instant>>,
    jobs: JobRegistry,
    _lock: File,
}

impl IndexService {
    /// Locks `data_dir`, opens every collection in it (replaying logs) and starts the
    /// commit and upkeep threads.
    pub fn open(
        data_dir: &Path,
        embedders: Vec<Arc<dyn ChunkEmbedder>>,
        default_model: &str,
        options: ServiceOptions,
    ) -> Result<Arc<IndexService>> {
        let collections_dir = data_dir.join("collections");
        std::fs::create_dir_all(&collections_dir)?;
        let lock = File::options().create(true).truncate(false).write(true).open(data_dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(IndexError::Locked { path: data_dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let embedders: HashMap<String, Arc<dyn ChunkEmbedder>> =
            embedders.into_iter().map(|e| (e.model_id().to_string(), e)).collect();
        let mut collections = HashMap::new();
        for entry in std::fs::read_dir(&collections_dir)? {
            let entry = entry?;
            let path = entry.path();
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            // Collection names never start with a dot: such a directory is a delete
            // (`.deleted-*`, renamed before removal) or a restore (`.restoring-*`, renamed
            // into place when complete) that a crash interrupted. Finish the delete, drop the
            // half restore; never load either.
            if file_name.starts_with('.') {
                if file_name.starts_with(".deleted-") || file_name.starts_with(".restoring-") {
                    tracing::warn!(dir = %path.display(), "removing what an interrupted delete or restore left");
                    std::fs::remove_dir_all(&path)?;
                    crate::wal::sync_dir(&path)?;
                }
                continue;
            }
            if !path.join("settings.json").exists() {
                continue;
            }
            let settings: CollectionSettings = serde_json::from_slice(&std::fs::read(path.join("settings.json"))?)?;
            let embedder = model_of(&embedders, &settings)?;
            let c = Collection::open_embedded_by(&path, embedder)?;
            c.drift().configure(options.drift.clone());
            collections.insert(settings.name.clone(), Arc::new(c));
        }
        let postgres = match &options.postgres {
            None => None,
            Some(pg) => {
                let db = PgDatabase::connect(pg)?;
                let tls = db.tls_version()?.unwrap_or_else(|| "off".into());
                tracing::info!(database = db.address(), tls = %tls, "collections in PostgreSQL");
                Some(db)
            }
        };
        let service = Arc::new(IndexService {
            postgres,
            data_dir: data_dir.to_path_buf(),
            options,
            embedders,
            default_model: default_model.to_string(),
            collections: RwLock::new(collections),
            catalog: Mutex::new(None),
            jobs: JobRegistry::default(),
            _lock: lock,
        });
        // Collections in PostgreSQL: listed by the database (another ragway may have
        // created them); their directories here keep only the drift monitor's state. At
        // start-up one that cannot be served is an error, as for the data directory's.
        service.sync_with_database(true)?;
        let weak = Arc::downgrade(&service);
        std::thread::Builder::new().name("index-commits".into()).spawn(move || commits(weak))?;
        let weak = Arc::downgrade(&service);
        std::thread::Builder::new().name("index-upkeep".into()).spawn(move || upkeep(weak))?;
        Ok(service)
    }

    /// Cuts collection `name`'s log at its first damaged record, keeping a backup of the
    /// whole log beside it (see [`crate::wal::repair`]). Takes the data directory's lock, so
    /// it runs only while no server holds it.
    pub fn repair_log(data_dir: &Path, name: &str) -> Result<crate::wal::Repair> {
        validate_name(name)?;
        let lock = File::options().create(true).truncate(false).write(true).open(data_dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(IndexError::Locked { path: data_dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let log = data_dir.join("collections").join(name).join("log.wal");
        if !log.exists() {
            return Err(IndexError::CollectionNotFound(name.to_string()));
        }
        crate::wal::repair(&log)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// The embedding model new collections bind to by default.
    pub fn default_embedder(&self) -> Option<Arc<dyn ChunkEmbedder>> {
        self.embedders.get(&self.default_model).cloned()
    }

    /// The served embedding model `model` (`None`: a collection without one); when it is
    /// not served, a bad-request error on `param` with `missing`'s message.
    fn embedder_for(
        &self,
        model: Option<&str>,
        param: &str,
        missing: impl FnOnce(&str) -> String,
    ) -> Result<Option<Arc<dyn ChunkEmbedder>>> {
        let Some(m) = model else { return Ok(None) };
        match self.embedders.get(m) {
            Some(e) => Ok(Some(e.clone())),
            None => Err(IndexError::invalid(param, missing(m))),
        }
    }

    pub fn jobs(&self) -> &JobRegistry {
        &self.jobs
    }

    pub fn create(&self, req: CreateCollection) -> Result<Arc<Collection>> {
        validate_name(&req.name)?;
        // A missing `model` is the server's; `null` is none (own vectors).
        let model = match req.model.clone() {
            None => Some(self.default_model.clone()),
            Some(m) => m,
        };
        let embedder =
            self.embedder_for(model.as_deref(), "model", |m| format!("embedding model `{m}` is not served"))?;
        let dimension = match (&embedder, req.dimension) {
            (None, None) => {
                return Err(IndexError::invalid(
                    "dimension",
                    "a collection without a model (`model: null`) needs `dimension`",
                ))
            }
            (None, Some(d)) if d == 0 || d > MAX_DIMENSION => {
                return Err(IndexError::invalid(
                    "dimension",
                    format!("dimension must be between 1 and {MAX_DIMENSION}"),
                ))
            }
            (None, Some(d)) => d,
            (Some(e), Some(d)) if d != e.dim() => {
                return Err(IndexError::invalid(
                    "dimension",
                    format!("model `{}` makes {}-d vectors, not {d}", e.model_id(), e.dim()),
                ))
            }
            (Some(e), _) => e.dim(),
        };
        let hnsw = req.hnsw.unwrap_or_default();
        let m_range = crate::hnsw::M_RANGE;
        if !m_range.contains(&hnsw.m) {
            let (lo, hi) = (m_range.start(), m_range.end());
            return Err(IndexError::invalid("hnsw.m", format!("hnsw.m must be between {lo} and {hi}")));
        }
        // Every insert and search sizes its candidate heaps by these: bounded like a
        // search's own `ef`.
        for (name, ef) in [("hnsw.ef_construction", hnsw.ef_construction), ("hnsw.ef", hnsw.ef)] {
            if ef == 0 || ef > crate::hnsw::MAX_EF {
                return Err(IndexError::invalid(name, format!("{name} must be between 1 and {}", crate::hnsw::MAX_EF)));
            }
        }
        let chunking = req.chunking.unwrap_or_default();
        if chunking.max_tokens == Some(0) {
            return Err(IndexError::invalid("chunking.max_tokens", "chunking.max_tokens must be at least 1"));
        }
        let fusion = req.fusion.unwrap_or_default();
        fusion.validate()?;
        let settings = CollectionSettings {
            name: req.name.clone(),
            model,
            dimension,
            distance: req.distance.unwrap_or_default(),
            hnsw,
            quantization: req.quantization.unwrap_or_default(),
            chunking,
            fusion,
            keyword: req.keyword.unwrap_or_default(),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let _catalog = self.catalog.lock().expect("catalog");
        let mut collections = self.collections.write().expect("collections");
        if collections.contains_key(&req.name) {
            return Err(IndexError::CollectionExists(req.name));
        }
        let dir = self.collection_dir(&req.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?; // leftovers of an interrupted delete
        }
        let c = match &self.postgres {
            None => Arc::new(Collection::create_with(&dir, settings, embedder)?),
            Some(db) => {
                let store = PgStore::create(db.clone(), settings.clone())?;
                std::fs::create_dir_all(&dir)?;
                Arc::new(Collection::on_store(&dir, settings, embedder, Box::new(store))?)
            }
        };
        c.drift().configure(self.options.drift.clone());
        collections.insert(req.name, c.clone());
        Ok(c)
    }

    pub fn get(&self, name: &str) -> Result<Arc<Collection>> {
        let found = self.collections.read().expect("collections").get(name).cloned();
        match found {
            Some(c) => Ok(c),
            // Perhaps another ragway created it in PostgreSQL: one look-up of that name.
            None if self.postgres.is_some() && validate_name(name).is_ok() => self.open_from_database(name),
            None => Err(IndexError::CollectionNotFound(name.to_string())),
        }
    }

    /// Serves collection `name` from PostgreSQL's catalog, where another ragway created it.
    /// The look-up holds no lock (misses, hostile or not, never queue behind one another or
    /// behind creates); a collection dropped meanwhile answers `CollectionNotFound` on use
    /// and leaves at the next catalog read.
    fn open_from_database(&self, name: &str) -> Result<Arc<Collection>> {
        let Some(db) = &self.postgres else { return Err(IndexError::CollectionNotFound(name.to_string())) };
        let store = PgStore::open(db.clone(), name)?;
        let c = Arc::new(self.on_database(store)?);
        let mut collections = self.collections.write().expect("collections");
        // Another request may have opened it meanwhile: serve one.
        let served = collections.entry(name.to_string()).or_insert_with(|| {
            tracing::info!(collection = %name, "serving a collection found in PostgreSQL");
            c
        });
        Ok(served.clone())
    }

    /// A collection of PostgreSQL's, with its local directory (the drift monitor's state).
    fn on_database(&self, store: PgStore) -> Result<Collection> {
        let settings = store.settings().clone();
        let embedder = model_of(&self.embedders, &settings)?;
        let dir = self.collection_dir(&settings.name);
        std::fs::create_dir_all(&dir)?;
        let c = Collection::on_store(&dir, settings, embedder, Box::new(store))?;
        c.drift().configure(self.options.drift.clone());
        Ok(c)
    }

    /// The collections, by name (PostgreSQL's catalog read again when it is due).
    pub fn list(&self) -> Vec<Arc<Collection>> {
        if self.postgres.is_some() {
            self.sync_quietly();
        }
        self.listed()
    }

    fn listed(&self) -> Vec<Arc<Collection>> {
        let mut all: Vec<_> = self.collections.read().expect("collections").values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// [`IndexService::sync_with_database`] when it is due, logging a failure: what is
    /// served stays as it was while the database is away.
    fn sync_quietly(&self) {
        if let Err(e) = self.sync_with_database(false) {
            tracing::debug!(error = %e, "could not read PostgreSQL's catalog");
        }
    }

    /// Serves what PostgreSQL's catalog lists: collections another ragway created are
    /// opened, ones it dropped are no longer served. Unless `now`, does nothing when the
    /// catalog was read less than a second ago or is being read. With `now` (start-up), a
    /// collection that cannot be served is an error; otherwise it is skipped with a warning.
    fn sync_with_database(&self, now: bool) -> Result<()> {
        let Some(db) = &self.postgres else { return Ok(()) };
        let mut last = if now {
            self.catalog.lock().expect("catalog")
        } else {
            match self.catalog.try_lock() {
                Ok(guard) if guard.is_none_or(|t| t.elapsed() >= CATALOG_REFRESH) => guard,
                _ => return Ok(()),
            }
        };
        *last = Some(Instant::now());
        let entries = db.collections()?;
        let listed: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let mut opened = Vec::new();
        {
            let collections = self.collections.read().expect("collections");
            for entry in &entries {
                match collections.get(&entry.name) {
                    Some(c) if c.store().kind() != "postgres" && now => {
                        tracing::warn!(collection = %entry.name, "a collection of this name is in the data directory and in PostgreSQL; serving the data directory's");
                    }
                    Some(_) => {}
                    None => opened.push(entry.clone()),
                }
            }
        }
        let mut added = Vec::new();
        for entry in opened {
            let name = entry.name.clone();
            let result = PgStore::of_entry(db.clone(), entry).and_then(|store| self.on_database(store));
            match result {
                Ok(c) => added.push((name, Arc::new(c))),
                Err(e) if now => return Err(e),
                Err(e) => tracing::warn!(collection = %name, error = %e, "cannot serve a collection in PostgreSQL"),
            }
        }
        let mut collections = self.collections.write().expect("collections");
        for (name, c) in added {
            if !now {
                tracing::info!(collection = %name, "serving a collection found in PostgreSQL");
            }
            collections.entry(name).or_insert(c);
        }
        let gone: Vec<String> = collections
            .iter()
            .filter(|(name, c)| c.store().kind() == "postgres" && !listed.contains(name.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            tracing::info!(collection = %name, "a collection was dropped from PostgreSQL; no longer serving it");
            if let Some(c) = collections.remove(&name) {
                if let Err(e) = self.remove_dir(c) {
                    tracing::warn!(collection = %name, error = %e, "could not remove its directory");
                }
            }
        }
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let _catalog = self.catalog.lock().expect("catalog");
        let c = self
            .collections
            .write()
            .expect("collections")
            .remove(name)
            .ok_or_else(|| IndexError::CollectionNotFound(name.to_string()))?;
        if let (Some(db), "postgres") = (&self.postgres, c.store().kind()) {
            // The database's transaction drops the tables and the catalog row together.
            if let Err(e) = PgStore::drop_collection(db, name) {
                // Still there: still served.
                self.collections.write().expect("collections").insert(name.to_string(), c);
                return Err(e);
            }
        }
        self.remove_dir(c)
    }

    /// Removes a collection's directory: renamed first (atomic), then removed, so that a
    /// crash never leaves half a collection.
    fn remove_dir(&self, c: Arc<Collection>) -> Result<()> {
        let trash = self.data_dir.join("collections").join(format!(".deleted-{}-{}", c.name(), std::process::id()));
        std::fs::rename(c.dir(), &trash)?;
        crate::wal::sync_dir(&trash)?;
        drop(c);
        std::fs::remove_dir_all(&trash)?;
        Ok(())
    }

    /// Writes a snapshot of `name` to `snapshot_root/<path>` (a new directory); returns it.
    pub fn snapshot(&self, name: &str, path: &str) -> Result<PathBuf> {
        let c = self.get(name)?;
        let dest = self.resolve_under(&self.options.snapshot_root, path, "path")?;
        c.snapshot_to(&dest)?;
        Ok(dest)
    }

    /// Creates collection `name` from a snapshot directory under the snapshot root.
    pub fn restore(&self, name: &str, path: &str) -> Result<Arc<Collection>> {
        validate_name(name)?;
        let src = self.resolve_under(&self.options.snapshot_root, path, "path")?;
        let mut settings: CollectionSettings =
            serde_json::from_slice(&std::fs::read(src.join("settings.json")).map_err(|_| {
                IndexError::invalid("path", format!("{} is not a collection snapshot", src.display()))
            })?)?;
        let embedder = self
            .embedder_for(settings.model.as_deref(), "path", |m| format!("the snapshot needs embedding model `{m}`"))?;
        let mut collections = self.collections.write().expect("collections");
        if collections.contains_key(name) {
            return Err(IndexError::CollectionExists(name.to_string()));
        }
        settings.name = name.to_string();
        let tmp = self.data_dir.join("collections").join(format!(".restoring-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        crate::wal::write_atomic(&tmp.join("settings.json"), &serde_json::to_vec_pretty(&settings)?)?;
        std::fs::copy(src.join("log.wal"), tmp.join("log.wal"))?;
        File::open(tmp.join("log.wal"))?.sync_all()?;
        let dir = self.collection_dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir)?;
        crate::wal::sync_dir(&dir)?;
        let c = Arc::new(Collection::open_embedded_by(&dir, embedder)?);
        c.drift().configure(self.options.drift.clone());
        collections.insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Resolves a client-given relative path under `root`, refusing escapes.
    pub fn resolve_under(&self, root: &Path, path: &str, param: &str) -> Result<PathBuf> {
        let rel = Path::new(path);
        if path.is_empty()
            || rel.is_absolute()
            || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(IndexError::invalid(param, format!("`{param}` must be a relative path without `..`")));
        }
        Ok(root.join(rel))
    }

    /// Resolves a server-side ingestion path (only under the configured ingest root).
    pub fn ingest_path(&self, path: &str) -> Result<PathBuf> {
        let root = self.options.ingest_root.as_ref().ok_or_else(|| {
            IndexError::Forbidden("server-side paths are disabled (start the server with --ingest-root)".into())
        })?;
        let p = self.resolve_under(root, path, "path")?;
        if !p.exists() {
            return Err(IndexError::invalid("path", format!("{path} does not exist under the ingest root")));
        }
        Ok(p)
    }

    /// Makes every pending write searchable and saves grown graphs (graceful shutdown).
    pub fn flush(&self) -> Result<()> {
        for c in self.list() {
            c.commit()?;
            if let Err(e) = c.save_graph() {
                // Derived data: the next open rebuilds what is missing from the log.
                tracing::warn!(collection = c.name(), error = %e, "could not save the graph");
            }
        }
        Ok(())
    }

    /// Whether the storage engines answer: PostgreSQL when configured (readiness).
    pub fn check_storage(&self) -> Result<()> {
        match &self.postgres {
            Some(db) => db.ping(),
            None => Ok(()),
        }
    }

    fn collection_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("collections").join(name)
    }
}

/// The embedding model a collection is bound to, which must be loaded.
fn model_of(
    embedders: &HashMap<String, Arc<dyn ChunkEmbedder>>,
    settings: &CollectionSettings,
) -> Result<Option<Arc<dyn ChunkEmbedder>>> {
    let Some(model) = &settings.model else { return Ok(None) };
    match embedders.get(model) {
        Some(e) => Ok(Some(e.clone())),
        None => Err(IndexError::Internal(format!(
            "collection `{}` is bound to embedding model `{model}`, which is not loaded",
            settings.name
        ))),
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with(['-', '_']);
    if ok {
        Ok(())
    } else {
        Err(IndexError::invalid(
            "name",
            "collection names are 1 to 64 letters, digits, `-` or `_`, starting with a letter or digit",
        ))
    }
}

/// Runs `each` on every collection every `commit_interval` while the service lives (on the
/// thread that calls it).
fn every_interval(service: Weak<IndexService>, each: impl Fn(&Collection)) {
    loop {
        let interval = match service.upgrade() {
            Some(s) => {
                s.list().iter().for_each(|c| each(c));
                s.options.commit_interval
            }
            None => return,
        };
        std::thread::sleep(interval);
    }
}

/// Makes pending writes searchable (writers that wait for visibility commit themselves). A
/// thread of its own: a long upkeep of one collection does not hold back any collection's
/// commits.
fn commits(service: Weak<IndexService>) {
    every_interval(service, |c| {
        if c.has_pending() {
            if let Err(e) = c.commit() {
                tracing::error!(collection = c.name(), error = %e, "commit failed");
            }
        }
    })
}

/// Each collection's upkeep ([`Collection::maintain`]: consolidating removed points, log
/// rewrites), one collection at a time.
fn upkeep(service: Weak<IndexService>) {
    every_interval(service, |c| {
        if let Err(e) = c.maintain() {
            tracing::error!(collection = c.name(), error = %e, "maintenance failed");
        }
    })
}
