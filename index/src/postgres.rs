//! Collections in PostgreSQL + pgvector: the `postgres` [`ChunkStore`].
//!
//! ## Schema (version [`SCHEMA_VERSION`])
//! `ragway_collections` lists the collections (name, schema version, settings, the table
//! prefix and the last write's sequence number). Each collection has two tables named by a
//! hash of its name (`rw_<16 hex digits>_docs`, `_chunks`), so any collection name fits
//! PostgreSQL's identifiers:
//! - `_docs`: one row per document (id, title, text, metadata, content hash);
//! - `_chunks`: one row per chunk (key, document, offsets, its text, the document's title
//!   and metadata, a generated `tsvector` — title weighted `A`, text `B` — and the vector),
//!   with an HNSW index for the collection's distance, GIN indexes on the `tsvector` and on
//!   `metadata` (`jsonb_path_ops`), and a B-tree on the document id;
//! - `_terms`: the keyword half's postings, one row per lexeme of a chunk's `tsvector`
//!   (occurrences in the chunk and its title, the chunk's lengths), written from the
//!   `tsvector` in the chunk's transaction; `_stats`: the collection's counts for BM25.
//!
//! ## Consistency
//! A write is one transaction, acknowledged once committed. It first takes its documents'
//! advisory locks (in one order), so writes of the same document wait for each other while
//! writes of different documents run side by side; just before committing it takes the
//! collection's row in `ragway_collections` for its sequence number, so writes are
//! numbered in commit order. A document's old chunks are deleted and its new ones inserted
//! in that transaction, so a search never sees half a document. A search's halves run in one
//! `REPEATABLE READ` read-only transaction: they see one state. Committed is visible:
//! `wait_visible` returns at once.
//!
//! ## Search
//! The dense half orders by pgvector's distance operator with `hnsw.ef_search` and
//! `hnsw.iterative_scan` set for the transaction (`SET LOCAL`, which also reaches Citus
//! workers). When the walk returns fewer hits than asked while more chunks match, the
//! search is repeated without the index (exact distances): filtered searches are never
//! short. The keyword half ranks by BM25 with tantivy's parameters over the postings (any
//! of the query's words, as the embedded store's tantivy half does; PostgreSQL's English
//! configuration makes the lexemes); both halves are fused by ragway's own code.

use crate::collection::chunk_id;
use crate::dense::Distance;
use crate::error::{IndexError, Result};
use crate::filter::{Filter, Op};
use crate::pgtls::{split_address, MakeRustls};
use crate::store::{ChunkStore, DenseHits, DenseQuery, NewDoc, SampledChunk, StoreStats, StoreView, StoredChunk};
use crate::types::{ChunkView, CollectionSettings, DocumentView, WriteResult};
use pgvector::Vector;
use postgres::types::ToSql;
use r2d2_postgres::PostgresConnectionManager;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The schema version ragway writes; a collection of an older version is migrated when it
/// is opened, one of a newer version is refused.
///
/// - 1: the tables, indexes and catalog described above.
/// - 2: the chunks table keeps rows of up to a page inline (`toast_tuple_target = 8160`),
///   the vector uncompressed and in the row (`STORAGE PLAIN`) and the `tsvector` in the row
///   when it fits (`STORAGE MAIN`): a scan reads vectors without one TOAST look-up each
///   (on SciFact, the dense half's exact scan 70 → 15 ms, and the planner's cost model sees
///   the real width of rows, so it takes the HNSW index where it should).
/// - 3: BM25 for the keyword half: the postings table `_terms` and the counts `_stats`
///   (see [`PgStore::terms_ddl`]), built from the chunks' `tsvector`s when migrated.
pub const SCHEMA_VERSION: i32 = 3;
/// pgvector's HNSW index takes `vector`s of at most this many dimensions (which also keeps a
/// plain-stored vector within a page).
pub const MAX_PG_DIMENSION: usize = 2000;
/// Writes an ingestion job sends at once to one collection (each is one backend inserting
/// into the HNSW index).
const PARALLEL_WRITES: usize = 4;
/// BM25's parameters, tantivy's (so both stores rank alike).
const BM25_K1: f64 = 1.2;
const BM25_B: f64 = 0.75;
/// pgvector's largest `hnsw.ef_search`.
const MAX_EF_SEARCH: usize = 1000;
/// How often upkeep checks that a collection's deferred indexes (HNSW, postings by lexeme)
/// are there.
const INDEX_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How soon upkeep tries again to build a missing index while another server holds
/// the collection's bulk-load lock.
const INDEX_RETRY_INTERVAL: Duration = Duration::from_secs(5);

type Pool = r2d2::Pool<Manager>;
type Conn = r2d2::PooledConnection<Manager>;

/// Statements a connection keeps prepared (searches' shapes: a filter's structure makes its
/// own); past this the cache starts over.
const MAX_PREPARED: usize = 256;

/// A pooled client with the statements it has prepared, so that a search's statements are
/// parsed once per connection instead of once per search (a round trip each).
pub struct PgConn {
    client: postgres::Client,
    prepared: HashMap<String, postgres::Statement>,
    /// Set on a connection whose session state must not outlive its use (an advisory lock
    /// it may still hold, settings of an index build): the pool closes it instead of
    /// handing it out again.
    discard: bool,
}

impl PgConn {
    /// `sql` prepared on this connection (once).
    fn prepared(&mut self, sql: &str) -> std::result::Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        if self.prepared.len() >= MAX_PREPARED {
            self.prepared.clear();
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl std::ops::Deref for PgConn {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

/// The pool's connections: r2d2-postgres's, with their prepared statements.
pub struct Manager(PostgresConnectionManager<MakeRustls>);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<PgConn, postgres::Error> {
        Ok(PgConn { client: self.0.connect()?, prepared: HashMap::new(), discard: false })
    }

    fn is_valid(&self, conn: &mut PgConn) -> std::result::Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.discard || self.0.has_broken(&mut conn.client)
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/database` (or the key=value form).
    pub url: String,
    /// Read replicas that searches may use (round robin); writes and reads of one's own
    /// writes go to `url`.
    pub read_urls: Vec<String>,
    /// Connections per pool.
    pub pool_size: u32,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest a statement may run (PostgreSQL's `statement_timeout`; a dense index's
    /// build after a bulk load runs without it).
    pub statement_timeout: Duration,
    /// `maintenance_work_mem` for ragway's builds of dense indexes, in MiB; `None` keeps the
    /// server's setting. pgvector builds fast while the graph fits in it, and slows to
    /// inserting one vector at a time once it does not.
    pub index_memory_mb: Option<u32>,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            read_urls: Vec::new(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            index_memory_mb: None,
        }
    }
}

/// The database: a pool for writes and one per read replica.
pub struct PgDatabase {
    write: Pool,
    index_memory_mb: Option<u32>,
    reads: Vec<Pool>,
    next_read: AtomicUsize,
    /// The primary's address without its password (logs, errors, collection info).
    shown: String,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase").field("url", &self.shown).field("replicas", &self.reads.len()).finish()
    }
}

/// Where an address points, without its password.
fn shown(config: &postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("postgres://{}@{host}:{port}/{}", config.get_user().unwrap_or(""), config.get_dbname().unwrap_or(""))
}

impl PgDatabase {
    /// Connects (failing with the server's own words: a bad address, refused
    /// authentication, a missing database), creates the pgvector extension and ragway's
    /// catalog table when missing, and checks each replica.
    pub fn connect(options: &PgOptions) -> Result<Arc<PgDatabase>> {
        let (write, shown) = Self::pool(&options.url, options, "postgres_url")?;
        let db = PgDatabase {
            write,
            index_memory_mb: options.index_memory_mb,
            reads: options
                .read_urls
                .iter()
                .map(|u| Self::pool(u, options, "postgres_read_urls").map(|(p, _)| p))
                .collect::<Result<_>>()?,
            next_read: AtomicUsize::new(0),
            shown,
        };
        let mut conn = db.conn()?;
        conn.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS ragway_collections (
                 name text PRIMARY KEY,
                 schema_version int NOT NULL,
                 prefix text NOT NULL,
                 settings jsonb NOT NULL,
                 seq bigint NOT NULL DEFAULT 0
             );",
        )
        .map_err(|e| startup(&db.shown, e))?;
        Ok(Arc::new(db))
    }

    fn pool(url: &str, options: &PgOptions, param: &str) -> Result<(Pool, String)> {
        let bad = |e: String| IndexError::invalid(param, format!("`{param}` is not a PostgreSQL address: {e}"));
        // TLS as the address asks (`sslmode`, `sslrootcert`, `sslcert`/`sslkey`; see `pgtls`).
        let address = split_address(url).map_err(bad)?;
        let client_cert = address.client_cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
        let tls = MakeRustls::new(address.mode, address.root_cert.as_deref(), client_cert)
            .map_err(|e| IndexError::invalid(param, format!("`{param}`: {e}")))?;
        let mut config = postgres::Config::from_str(&address.address).map_err(|e| bad(e.to_string()))?;
        config.connect_timeout(options.connect_timeout);
        config.options(&format!("-c statement_timeout={}", options.statement_timeout.as_millis()));
        config.application_name("ragway");
        let shown = shown(&config);
        // One connection first, for the server's own words when it refuses.
        config.connect(tls.clone()).map_err(|e| startup(&shown, e))?;
        let pool = r2d2::Pool::builder()
            .max_size(options.pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(options.connect_timeout)
            .build_unchecked(Manager(PostgresConnectionManager::new(config, tls)));
        Ok((pool, shown))
    }

    /// The primary's address, without its password.
    pub fn address(&self) -> &str {
        &self.shown
    }

    fn conn(&self) -> Result<Conn> {
        self.write.get().map_err(|e| unavailable(&self.shown, &e.to_string()))
    }

    /// A connection for a search: a replica's when there are replicas.
    fn read_conn(&self) -> Result<Conn> {
        if self.reads.is_empty() {
            return self.conn();
        }
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % self.reads.len();
        self.reads[i].get().map_err(|e| unavailable(&self.shown, &format!("read replica {i}: {e}")))
    }

    /// The TLS version of a connection to the primary, `None` when it is not encrypted.
    pub fn tls_version(&self) -> Result<Option<String>> {
        let row = self
            .conn()?
            .query_one("SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .map_err(|e| db_error(&self.shown, e))?;
        Ok(row.get(0))
    }

    /// Whether the primary answers (readiness).
    pub fn ping(&self) -> Result<()> {
        self.conn()?.batch_execute("SELECT 1").map_err(|e| db_error(&self.shown, e))
    }

    /// The collections listed in the database's catalog.
    pub fn collections(&self) -> Result<Vec<CatalogEntry>> {
        let rows = self
            .conn()?
            .query("SELECT name, schema_version, prefix, settings FROM ragway_collections ORDER BY name", &[])
            .map_err(|e| db_error(&self.shown, e))?;
        rows.iter().map(CatalogEntry::of_row).collect()
    }
}

/// A collection's row in `ragway_collections`.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: String,
    pub schema_version: i32,
    prefix: String,
    pub settings: CollectionSettings,
}

impl CatalogEntry {
    /// From a row of `name, schema_version, prefix, settings`.
    fn of_row(row: &postgres::Row) -> Result<CatalogEntry> {
        Ok(CatalogEntry {
            name: row.get(0),
            schema_version: row.get(1),
            prefix: row.get(2),
            settings: serde_json::from_value(row.get::<_, Value>(3))?,
        })
    }
}

/// A start-up failure, in the server's words.
fn startup(shown: &str, e: postgres::Error) -> IndexError {
    let why = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            // The cause (a refused certificate, a refused connection) is in the sources.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            why
        }
    };
    IndexError::Unavailable(format!("PostgreSQL at {shown}: {why}"))
}

fn unavailable(shown: &str, why: &str) -> IndexError {
    IndexError::Unavailable(format!("PostgreSQL at {shown} is unavailable: {why}"))
}

/// A failed statement: the database gone (connection lost, shutting down, too many
/// connections) is `Unavailable` (retry later); anything else is an internal error.
fn db_error(shown: &str, e: postgres::Error) -> IndexError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // Class 08: connection exceptions; 57P0x: shutdown, cannot connect now; 53300:
            // too many connections; 57014: statement timeout (cancelled).
            if code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "57014" {
                unavailable(shown, &format!("{code}: {}", db.message()))
            } else {
                IndexError::Internal(format!("PostgreSQL: {code}: {}", db.message()))
            }
        }
        None if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) => {
            unavailable(shown, &e.to_string())
        }
        None => {
            // The client's own errors (a parameter it could not encode, ...) say why in
            // their source.
            let why = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
            IndexError::Internal(format!("PostgreSQL: {e}{why}"))
        }
    }
}

/// The table prefix of a collection: a hash of its name, so that any name fits.
fn prefix_of(name: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("rw_{h:016x}")
}

/// A collection's documents in PostgreSQL.
pub struct PgStore {
    db: Arc<PgDatabase>,
    settings: CollectionSettings,
    /// The first key of the collection's document locks (advisory locks).
    lock_space: i32,
    /// The key of the collection's bulk-load lock: an advisory lock of one 64-bit key, a
    /// key space apart from the documents' pairs of 32-bit keys.
    bulk_key: i64,
    /// The connection holding the bulk-load lock while this server loads the collection
    /// without its dense index (see [`ChunkStore::begin_bulk_load`]).
    bulk: Mutex<Option<Conn>>,
    /// When upkeep next checks that the dense index is there.
    next_index_check: Mutex<Option<Instant>>,
    docs: String,
    chunks: String,
    keys: String,
    terms: String,
    stats: String,
}

impl PgStore {
    /// Creates the collection's tables and indexes and lists it in `ragway_collections`;
    /// fails when a collection of that name is already there.
    pub fn create(db: Arc<PgDatabase>, settings: CollectionSettings) -> Result<PgStore> {
        if settings.dimension > MAX_PG_DIMENSION {
            return Err(IndexError::invalid(
                "dimension",
                format!(
                    "collections in PostgreSQL take vectors of at most {MAX_PG_DIMENSION} dimensions (pgvector's HNSW limit), not {}",
                    settings.dimension
                ),
            ));
        }
        // pgvector's own bounds on its HNSW index, said before any DDL runs.
        let (m, efc) = (settings.hnsw.m, settings.hnsw.ef_construction);
        if !(2..=100).contains(&m) || !(4..=1000).contains(&efc) || efc < 2 * m {
            return Err(IndexError::invalid(
                "hnsw",
                format!(
                    "collections in PostgreSQL take hnsw.m from 2 to 100 and hnsw.ef_construction from 4 to 1000 and at least 2·m (pgvector's limits), not m {m} and ef_construction {efc}"
                ),
            ));
        }
        let prefix = prefix_of(&settings.name);
        let store = PgStore::with_prefix(db, settings, &prefix);
        let (dim, vt, dense) = (store.settings.dimension, store.vector_type(), store.dense_index_ddl(""));
        let (docs, chunks, keys, stats) = (&store.docs, &store.chunks, &store.keys, &store.stats);
        let (terms, terms_indexes) = (store.terms_ddl(), store.terms_indexes_ddl());
        let ddl = format!(
            "CREATE TABLE {docs} (
                 doc_id text PRIMARY KEY,
                 title text,
                 text text NOT NULL,
                 metadata jsonb NOT NULL,
                 hash bigint NOT NULL
             );
             CREATE SEQUENCE {keys};
             CREATE TABLE {chunks} (
                 key bigint PRIMARY KEY,
                 doc_key bigint NOT NULL,
                 doc_id text NOT NULL REFERENCES {docs} (doc_id) ON DELETE CASCADE,
                 chunk_index int NOT NULL,
                 char_start int NOT NULL,
                 char_end int NOT NULL,
                 tokens int NOT NULL,
                 title text,
                 text text NOT NULL,
                 metadata jsonb NOT NULL,
                 tsv tsvector GENERATED ALWAYS AS (
                     setweight(to_tsvector('english', coalesce(title, '')), 'A')
                     || setweight(to_tsvector('english', text), 'B')) STORED,
                 embedding {vt}({dim}) NOT NULL
             ) WITH (toast_tuple_target = 8160);
             ALTER TABLE {chunks} ALTER COLUMN embedding SET STORAGE PLAIN, ALTER COLUMN tsv SET STORAGE MAIN;
             CREATE INDEX {chunks}_doc ON {chunks} (doc_id);
             {dense};
             CREATE INDEX {chunks}_tsv ON {chunks} USING gin (tsv);
             CREATE INDEX {chunks}_meta ON {chunks} USING gin (metadata jsonb_path_ops);
             {terms}
             INSERT INTO {stats} VALUES (0, 0, 0);
             {terms_indexes}"
        );
        let mut conn = store.db.conn()?;
        let mut tx = conn.transaction().map_err(|e| store.err(e))?;
        let taken = tx
            .execute(
                "INSERT INTO ragway_collections (name, schema_version, prefix, settings) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&store.settings.name, &SCHEMA_VERSION, &prefix, &serde_json::to_value(&store.settings)?],
            )
            .map_err(|e| store.err(e))?
            == 0;
        if taken {
            return Err(IndexError::CollectionExists(store.settings.name.clone()));
        }
        tx.batch_execute(&ddl).map_err(|e| store.err(e))?;
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Opens a collection listed in `ragway_collections`; one written by a newer ragway
    /// (a higher schema version) is refused.
    pub fn open(db: Arc<PgDatabase>, name: &str) -> Result<PgStore> {
        let row = db
            .conn()?
            .query_opt(
                "SELECT name, schema_version, prefix, settings FROM ragway_collections WHERE name = $1",
                &[&name],
            )
            .map_err(|e| db_error(&db.shown, e))?
            .ok_or_else(|| IndexError::CollectionNotFound(name.to_string()))?;
        PgStore::of_entry(db, CatalogEntry::of_row(&row)?)
    }

    /// The collection of a catalog entry (see [`PgDatabase::collections`]), migrated to
    /// [`SCHEMA_VERSION`] when it is older.
    pub fn of_entry(db: Arc<PgDatabase>, entry: CatalogEntry) -> Result<PgStore> {
        let (name, version) = (&entry.name, entry.schema_version);
        if version > SCHEMA_VERSION {
            return Err(IndexError::Corrupt(format!(
                "collection `{name}` in PostgreSQL has schema version {version}; this ragway knows versions up to {SCHEMA_VERSION}: upgrade ragway"
            )));
        }
        let store = PgStore::with_prefix(db, entry.settings, &entry.prefix);
        if version < SCHEMA_VERSION {
            store.migrate()?;
        }
        Ok(store)
    }

    /// Brings the collection's tables to [`SCHEMA_VERSION`], one version at a time, each
    /// step in one transaction with the catalog row locked (so that servers opening it at
    /// once migrate it once).
    fn migrate(&self) -> Result<()> {
        let name = &self.settings.name;
        let mut conn = self.db.conn()?;
        loop {
            let mut tx = conn.transaction().map_err(|e| self.err(e))?;
            let version: i32 = tx
                .query_opt("SELECT schema_version FROM ragway_collections WHERE name = $1 FOR UPDATE", &[name])
                .map_err(|e| self.err(e))?
                .ok_or_else(|| IndexError::CollectionNotFound(name.clone()))?
                .get(0);
            if version >= SCHEMA_VERSION {
                return Ok(());
            }
            // A step rewrites or builds from every chunk: not bounded by the timeout meant
            // for requests (version 2 -> 3 reads about 300,000 postings a second), and with
            // the memory configured for index builds.
            tx.batch_execute(&self.build_settings("LOCAL")).map_err(|e| self.err(e))?;
            tracing::info!(collection = %name, from = version, to = version + 1, "migrating a collection's schema in PostgreSQL");
            let chunks = &self.chunks;
            let step = match version {
                // Settings of the table only (no rewrite, a moment's lock): rows written
                // from now on take the new layout; older rows keep theirs until the table is
                // rewritten (`VACUUM FULL`).
                1 => format!(
                    "ALTER TABLE {chunks} SET (toast_tuple_target = 8160);
                     ALTER TABLE {chunks} ALTER COLUMN embedding SET STORAGE PLAIN, ALTER COLUMN tsv SET STORAGE MAIN;"
                ),
                // The postings and counts of BM25, from the chunks' `tsvector`s (writes
                // wait meanwhile; searches go on): about 2 s for SciFact's 10k chunks.
                2 => format!(
                    "LOCK TABLE {chunks} IN SHARE MODE;
                     {terms}
                     {postings};
                     INSERT INTO {stats} SELECT (SELECT count(*) FROM {chunks}), coalesce(sum(tf), 0), coalesce(sum(tf_title), 0) FROM {terms_table};
                     {terms_indexes}",
                    terms = self.terms_ddl(),
                    postings = self.postings_sql("true"),
                    stats = self.stats,
                    terms_table = self.terms,
                    terms_indexes = self.terms_indexes_ddl(),
                ),
                v => return Err(IndexError::Corrupt(format!("collection `{name}` has unknown schema version {v}"))),
            };
            tx.batch_execute(&step).map_err(|e| self.err(e))?;
            tx.execute("UPDATE ragway_collections SET schema_version = $2 WHERE name = $1", &[name, &(version + 1)])
                .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            tracing::info!(collection = %name, from = version, to = version + 1, "migrated a collection's schema in PostgreSQL");
        }
    }

    /// Drops the collection's tables and its catalog row.
    pub fn drop_collection(db: &PgDatabase, name: &str) -> Result<()> {
        let mut conn = db.conn()?;
        let mut tx = conn.transaction().map_err(|e| db_error(&db.shown, e))?;
        let prefix: Option<String> = tx
            .query_opt("DELETE FROM ragway_collections WHERE name = $1 RETURNING prefix", &[&name])
            .map_err(|e| db_error(&db.shown, e))?
            .map(|r| r.get(0));
        let Some(prefix) = prefix else { return Err(IndexError::CollectionNotFound(name.to_string())) };
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {prefix}_terms; DROP TABLE IF EXISTS {prefix}_stats;
             DROP TABLE IF EXISTS {prefix}_chunks; DROP TABLE IF EXISTS {prefix}_docs; DROP SEQUENCE IF EXISTS {prefix}_keys;"
        ))
        .map_err(|e| db_error(&db.shown, e))?;
        tx.commit().map_err(|e| db_error(&db.shown, e))
    }

    /// The settings the collection was created with.
    pub fn settings(&self) -> &CollectionSettings {
        &self.settings
    }

    fn with_prefix(db: Arc<PgDatabase>, settings: CollectionSettings, prefix: &str) -> PgStore {
        let hash = u64::from_str_radix(prefix.trim_start_matches("rw_"), 16).unwrap_or(0);
        PgStore {
            db,
            lock_space: hash as i32,
            bulk_key: hash as i64,
            bulk: Mutex::new(None),
            next_index_check: Mutex::new(None),
            settings,
            docs: format!("{prefix}_docs"),
            chunks: format!("{prefix}_chunks"),
            keys: format!("{prefix}_keys"),
            terms: format!("{prefix}_terms"),
            stats: format!("{prefix}_stats"),
        }
    }

    fn err(&self, e: postgres::Error) -> IndexError {
        // 42P01 (undefined table): another ragway dropped the collection.
        if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") {
            return IndexError::CollectionNotFound(self.settings.name.clone());
        }
        db_error(&self.db.shown, e)
    }

    /// pgvector's operator class and distance operator for the collection's distance. The
    /// stored vectors are prepared (unit length for cosine), so cosine ranks by inner
    /// product; scores are the negated operator, as ragway's are (higher is better).
    fn ops_class(&self) -> String {
        let metric = match self.settings.distance {
            Distance::Cosine | Distance::Dot => "ip",
            Distance::L2 => "l2",
        };
        format!("{}_{metric}_ops", self.vector_type())
    }

    /// The statement that builds the collection's HNSW index (`how`: `""`, or
    /// `"CONCURRENTLY"` to build it beside writes).
    fn dense_index_ddl(&self, how: &str) -> String {
        let (chunks, ops) = (&self.chunks, self.ops_class());
        let (m, efc) = (self.settings.hnsw.m, self.settings.hnsw.ef_construction);
        format!("CREATE INDEX {how} {chunks}_hnsw ON {chunks} USING hnsw (embedding {ops}) WITH (m = {m}, ef_construction = {efc})")
    }

    /// The tables of the keyword half's BM25: `_terms`, the postings (one row per lexeme of
    /// a chunk's `tsvector`: how often it occurs in the chunk and in its title, and the
    /// chunk's and its title's lengths in lexeme occurrences, so a search reads nothing
    /// else), and `_stats`, the one row of collection-wide counts (chunks, occurrences,
    /// title occurrences) that writes keep exact in their own transactions.
    fn terms_ddl(&self) -> String {
        let (terms, stats) = (&self.terms, &self.stats);
        format!(
            "CREATE TABLE {terms} (
                 lexeme text NOT NULL,
                 key bigint NOT NULL,
                 doc_key bigint NOT NULL,
                 tf smallint NOT NULL,
                 tf_title smallint NOT NULL,
                 len int NOT NULL,
                 title_len int NOT NULL
             );
             CREATE TABLE {stats} (chunks bigint NOT NULL, tokens bigint NOT NULL, title_tokens bigint NOT NULL);"
        )
    }

    /// The postings' indexes: by lexeme, covering what a search reads (an index-only scan),
    /// and by chunk, for deletes.
    fn terms_indexes_ddl(&self) -> String {
        format!("{}; CREATE INDEX {terms}_key ON {terms} (key);", self.lexeme_index_ddl(""), terms = self.terms)
    }

    /// The statement that builds the postings' index by lexeme (`how` as for
    /// [`PgStore::dense_index_ddl`]).
    fn lexeme_index_ddl(&self, how: &str) -> String {
        let terms = &self.terms;
        format!("CREATE INDEX {how} {terms}_lexeme ON {terms} (lexeme) INCLUDE (key, doc_key, tf, tf_title, len, title_len)")
    }

    /// The indexes a bulk load builds once at its end instead of row by row, with the
    /// statements that build them beside writes: the HNSW index, and the postings' index by
    /// lexeme (built at once it is also a quarter smaller). The postings' index by chunk
    /// stays: replacements during the load delete by it.
    fn deferred_indexes(&self) -> [(String, String); 2] {
        [
            (format!("{}_hnsw", self.chunks), self.dense_index_ddl("CONCURRENTLY")),
            (format!("{}_lexeme", self.terms), self.lexeme_index_ddl("CONCURRENTLY")),
        ]
    }

    /// The statement that writes the postings of the chunks (alias `c`) matching
    /// `condition`, from their `tsvector`s: weight `A` marks the title's occurrences. (A
    /// `tsvector` keeps at most 256 positions of a lexeme, so longer counts are capped.)
    fn postings_sql(&self, condition: &str) -> String {
        format!(
            "INSERT INTO {terms} (lexeme, key, doc_key, tf, tf_title, len, title_len)
             SELECT u.lexeme, c.key, c.doc_key, cardinality(u.positions)::smallint,
                    cardinality(array_positions(u.weights, 'A'))::smallint,
                    (sum(cardinality(u.positions)) OVER w)::int,
                    (sum(cardinality(array_positions(u.weights, 'A'))) OVER w)::int
             FROM {chunks} c, unnest(c.tsv) u WHERE {condition}
             WINDOW w AS (PARTITION BY c.key)",
            terms = self.terms,
            chunks = self.chunks
        )
    }

    /// The settings of a statement that builds from every chunk (an index, a migration): no
    /// statement timeout (that is meant for requests), and the configured
    /// `maintenance_work_mem`; `scope` `SESSION` or `LOCAL` (this transaction).
    fn build_settings(&self, scope: &str) -> String {
        let memory = self.db.index_memory_mb.map(|mb| format!(" SET {scope} maintenance_work_mem = '{mb}MB';"));
        format!("SET {scope} statement_timeout = 0;{}", memory.unwrap_or_default())
    }

    /// Whether an index is there: `None` when it is not, `Some(false)` when a build left it
    /// invalid (a concurrent build that failed or was interrupted).
    fn index_state(&self, client: &mut impl postgres::GenericClient, index: &str) -> Result<Option<bool>> {
        let row = client
            .query_opt("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)", &[&index])
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The state of the [deferred indexes](PgStore::deferred_indexes) together: `None` when
    /// one is missing, `Some(false)` when one is invalid, `Some(true)` when all are valid.
    fn indexes_state(&self, client: &mut impl postgres::GenericClient) -> Result<Option<bool>> {
        let mut all = Some(true);
        for (index, _) in self.deferred_indexes() {
            match self.index_state(client, &index)? {
                None => return Ok(None),
                Some(valid) => all = all.map(|a| a && valid),
            }
        }
        Ok(all)
    }

    /// Builds the deferred indexes that are missing or invalid, beside writes (`CREATE
    /// INDEX CONCURRENTLY`), without the statement timeout and with the configured
    /// `maintenance_work_mem`, under the bulk-load lock: one server builds them, and none
    /// while another loads the collection in bulk. Returns whether this call built one.
    fn build_indexes(&self) -> Result<bool> {
        match self.bulk_lock()? {
            Some(mut conn) => self.build_indexes_on(&mut conn),
            None => Ok(false),
        }
    }

    /// A connection holding the collection's bulk-load lock, or `None` when another session
    /// holds it. The connection is closed when dropped, never pooled again: the session's
    /// lock and settings must not reach another user of it.
    fn bulk_lock(&self) -> Result<Option<Conn>> {
        let mut conn = self.db.conn()?;
        conn.discard = true;
        let locked: bool =
            conn.query_one("SELECT pg_try_advisory_lock($1)", &[&self.bulk_key]).map_err(|e| self.err(e))?.get(0);
        Ok(locked.then_some(conn))
    }

    /// [`PgStore::build_indexes`] on a connection that holds the bulk-load lock.
    fn build_indexes_on(&self, conn: &mut Conn) -> Result<bool> {
        let name = &self.settings.name;
        let mut built = false;
        for (index, ddl) in self.deferred_indexes() {
            let state = self.index_state(&mut conn.client, &index)?;
            if state == Some(true) {
                continue;
            }
            if state == Some(false) {
                // One statement per call: a multi-statement query is a transaction block,
                // where concurrent index builds cannot run.
                conn.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")).map_err(|e| self.err(e))?;
            }
            if !built {
                conn.batch_execute(&self.build_settings("SESSION")).map_err(|e| self.err(e))?;
            }
            tracing::info!(collection = %name, %index, "building a collection's index in PostgreSQL");
            let start = Instant::now();
            conn.batch_execute(&ddl).map_err(|e| self.err(e))?;
            tracing::info!(collection = %name, %index, seconds = start.elapsed().as_secs_f64(), "built a collection's index");
            built = true;
        }
        if built {
            // What PostgreSQL advises after a bulk load: the rows it wrote are not yet
            // marked visible to all, so every index-only scan of the postings would also
            // read the table's pages (random reads once the table outgrows memory) until
            // autovacuum came by, and its statistics are those of an empty table. Only
            // faster searches depend on it: a failure is logged, the indexes stand.
            let start = Instant::now();
            match self.vacuum(conn) {
                Ok(()) => {
                    let seconds = start.elapsed().as_secs_f64();
                    tracing::info!(collection = %name, seconds, "vacuumed a collection's tables");
                }
                Err(e) => tracing::warn!(collection = %name, error = %e, "vacuuming a collection's tables failed"),
            }
        }
        Ok(built)
    }

    /// `VACUUM (ANALYZE)` of the collection's tables, one statement per call: several in
    /// one simple query form a transaction block, where VACUUM cannot run.
    fn vacuum(&self, conn: &mut Conn) -> Result<()> {
        for table in [&self.docs, &self.chunks, &self.terms, &self.stats] {
            conn.batch_execute(&format!("VACUUM (ANALYZE) {table}")).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The column type of the vectors: pgvector's `halfvec` (2 bytes a dimension, in the
    /// table and in the HNSW index) when the collection asks for quantization, else
    /// `vector`. pgvector has no int8 vectors, so `int8` is stored as `halfvec` too; and
    /// unlike the embedded store, PostgreSQL keeps no f32 copy to rescore from: its scores
    /// are those of the half-precision vectors.
    fn vector_type(&self) -> &'static str {
        match self.settings.quantization {
            crate::dense::Quantization::None => "vector",
            _ => "halfvec",
        }
    }

    fn operator(&self) -> &'static str {
        match self.settings.distance {
            Distance::Cosine | Distance::Dot => "<#>",
            Distance::L2 => "<->",
        }
    }

    /// Ends a write: adds what it changed to the collection's BM25 counts, numbers it
    /// (taking the collection's catalog row, held only from here to the commit, so that
    /// writes are numbered in commit order) and commits.
    fn commit_write(&self, mut tx: postgres::Transaction<'_>, change: Tally) -> Result<u64> {
        let seq: i64 = tx
            .query_one(
                &format!(
                    "WITH s AS (UPDATE {} SET chunks = chunks + $2, tokens = tokens + $3, title_tokens = title_tokens + $4)
                     UPDATE ragway_collections SET seq = seq + 1 WHERE name = $1 RETURNING seq",
                    self.stats
                ),
                &[&self.settings.name, &change.chunks, &change.tokens, &change.title_tokens],
            )
            .map_err(|e| self.err(e))?
            .get(0);
        tx.commit().map_err(|e| self.err(e))?;
        Ok(seq as u64)
    }

    /// The content hashes of those of `ids` that are stored.
    fn stored_hashes(&self, client: &mut impl postgres::GenericClient, ids: &[&str]) -> Result<HashMap<String, i64>> {
        let rows = client
            .query(&format!("SELECT doc_id, hash FROM {} WHERE doc_id = ANY($1)", self.docs), &[&ids])
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Takes the documents' locks for this transaction: writes of the same document wait for
    /// each other, writes of others run side by side (pgvector inserts into the HNSW index
    /// on one thread per write). Locks are taken in one order, so writers never deadlock;
    /// two ids whose hashes collide merely wait for each other.
    fn lock_documents(&self, tx: &mut postgres::Transaction<'_>, ids: &[&str]) -> Result<()> {
        tx.execute(
            "SELECT count(pg_advisory_xact_lock($1::int4, h))
             FROM (SELECT DISTINCT hashtext(x) AS h FROM unnest($2::text[]) AS x ORDER BY 1) s",
            &[&self.lock_space, &ids],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn write(&self, docs: Vec<NewDoc>) -> Result<WriteResult> {
        let mut result = WriteResult::default();
        if docs.is_empty() {
            return Ok(result);
        }
        let mut conn = self.db.conn()?;
        let mut tx = conn.transaction().map_err(|e| self.err(e))?;
        let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        self.lock_documents(&mut tx, &ids)?;
        // Read after the locks: a write of the same documents that committed meanwhile is seen.
        let stored = self.stored_hashes(&mut tx, &ids)?;
        let fresh: Vec<NewDoc> = docs
            .into_iter()
            .filter(|d| {
                let same = stored.get(&d.id) == Some(&(d.hash as i64));
                result.unchanged += same as usize;
                !same
            })
            .collect();
        if fresh.is_empty() {
            // Nothing changes: no sequence number.
            tx.rollback().map_err(|e| self.err(e))?;
            return Ok(result);
        }
        let n: usize = fresh.iter().map(|d| d.chunks.len()).sum();
        let keys: Vec<i64> = tx
            .query(&format!("SELECT nextval('{}') FROM generate_series(1, $1::bigint)", self.keys), &[&(n as i64)])
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Replacing a document: its old chunks and their postings go, then its row, in this
        // transaction.
        let fresh_ids: Vec<&str> = fresh.iter().map(|d| d.id.as_str()).collect();
        let (_, gone) = self.remove(
            &mut tx,
            &format!("WITH gone_chunks AS (DELETE FROM {} c WHERE c.doc_id = ANY($1) RETURNING c.key)", self.chunks),
            "0::bigint",
            &[&fresh_ids],
        )?;
        tx.execute(&format!("DELETE FROM {} WHERE doc_id = ANY($1)", self.docs), &[&fresh_ids])
            .map_err(|e| self.err(e))?;
        let (mut d_ids, mut d_titles, mut d_texts, mut d_meta, mut d_hash) = (vec![], vec![], vec![], vec![], vec![]);
        let mut c = ChunkColumns::default();
        let mut next = keys.into_iter();
        for d in fresh {
            let first = c.key.len();
            for (i, ch) in d.chunks.iter().enumerate() {
                let key = next.next().ok_or_else(|| IndexError::Internal("too few chunk keys".into()))?;
                let doc_key = if i == 0 { key } else { c.key[first] };
                let text = d
                    .text
                    .get(ch.byte_start as usize..ch.byte_end as usize)
                    .ok_or_else(|| IndexError::Internal(format!("chunk {i} of `{}` is outside the text", d.id)))?;
                c.key.push(key);
                c.doc_key.push(doc_key);
                c.doc_id.push(d.id.clone());
                c.index.push(i as i32);
                c.char_start.push(ch.char_start as i32);
                c.char_end.push(ch.char_end as i32);
                c.tokens.push(ch.tokens as i32);
                c.title.push(d.title.clone());
                c.text.push(text.to_string());
                c.metadata.push(d.metadata.clone());
                c.vector.push(Vector::from(ch.vector.clone()));
            }
            result.chunks += d.chunks.len();
            d_ids.push(d.id);
            d_titles.push(d.title);
            d_texts.push(d.text);
            d_meta.push(d.metadata);
            d_hash.push(d.hash as i64);
        }
        result.upserted = d_ids.len();
        tx.execute(
            &format!(
                "INSERT INTO {} (doc_id, title, text, metadata, hash)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bigint[])",
                self.docs
            ),
            &[&d_ids, &d_titles, &d_texts, &d_meta, &d_hash],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            &format!(
                "INSERT INTO {} (key, doc_key, doc_id, chunk_index, char_start, char_end, tokens, title, text, metadata, embedding)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::int[], $6::int[], $7::int[],
                                      $8::text[], $9::text[], $10::jsonb[], $11::vector[]::{}[])",
                self.chunks,
                self.vector_type()
            ),
            &[
                &c.key,
                &c.doc_key,
                &c.doc_id,
                &c.index,
                &c.char_start,
                &c.char_end,
                &c.tokens,
                &c.title,
                &c.text,
                &c.metadata,
                &c.vector,
            ],
        )
        .map_err(|e| self.err(e))?;
        let added: (i64, i64) = tx
            .query_one(
                &format!(
                    "WITH t AS ({} RETURNING tf, tf_title)
                     SELECT coalesce(sum(tf), 0)::bigint, coalesce(sum(tf_title), 0)::bigint FROM t",
                    self.postings_sql("c.key = ANY($1)")
                ),
                &[&c.key],
            )
            .map(|r| (r.get(0), r.get(1)))
            .map_err(|e| self.err(e))?;
        let change = Tally { chunks: n as i64, tokens: added.0, title_tokens: added.1 }.minus(&gone);
        result.seq = self.commit_write(tx, change)?;
        Ok(result)
    }

    /// Deletes the chunks a `gone_chunks` CTE deletes (`with`, returning their keys) and
    /// their postings, and says how much went: `documents` (an expression over `with`'s
    /// CTEs) and the BM25 counts. A row another transaction deleted first is not returned,
    /// so the counts are exactly what this one removed.
    fn remove(
        &self,
        tx: &mut postgres::Transaction<'_>,
        with: &str,
        documents: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(i64, Tally)> {
        let row = tx
            .query_one(
                &format!(
                    "{with},
                     gone_terms AS (DELETE FROM {} t USING gone_chunks g WHERE t.key = g.key RETURNING t.tf, t.tf_title)
                     SELECT {documents}, (SELECT count(*) FROM gone_chunks),
                            coalesce(sum(tf), 0)::bigint, coalesce(sum(tf_title), 0)::bigint
                     FROM gone_terms",
                    self.terms
                ),
                params,
            )
            .map_err(|e| self.err(e))?;
        Ok((row.get(0), Tally { chunks: row.get(1), tokens: row.get(2), title_tokens: row.get(3) }))
    }

    fn delete_sql(&self, condition: &str, params: &[&(dyn ToSql + Sync)]) -> Result<WriteResult> {
        let mut conn = self.db.conn()?;
        let mut tx = conn.transaction().map_err(|e| self.err(e))?;
        // The documents, their chunks and the chunks' postings in one statement (the
        // chunks' cascade from the documents then finds none left).
        let (docs, chunks) = (&self.docs, &self.chunks);
        let with = format!(
            "WITH gone_docs AS (DELETE FROM {docs} d WHERE {condition} RETURNING d.doc_id),
             gone_chunks AS (DELETE FROM {chunks} c USING gone_docs g WHERE c.doc_id = g.doc_id RETURNING c.key)"
        );
        let (deleted, gone) = self.remove(&mut tx, &with, "(SELECT count(*) FROM gone_docs)", params)?;
        if deleted == 0 {
            tx.rollback().map_err(|e| self.err(e))?;
            return Ok(WriteResult::default());
        }
        let seq = self.commit_write(tx, Tally::default().minus(&gone))?;
        Ok(WriteResult { deleted: deleted as usize, seq, ..Default::default() })
    }

    fn seq(&self) -> Result<u64> {
        let row = self
            .db
            .conn()?
            .query_one("SELECT seq FROM ragway_collections WHERE name = $1", &[&self.settings.name])
            .map_err(|e| self.err(e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

/// The collection-wide counts BM25 ranks by (see [`PgStore::terms_ddl`]), or a change to
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tally {
    chunks: i64,
    /// Lexeme occurrences in the chunks (title and text).
    tokens: i64,
    /// Those in the titles.
    title_tokens: i64,
}

impl Tally {
    fn minus(self, other: &Tally) -> Tally {
        Tally {
            chunks: self.chunks - other.chunks,
            tokens: self.tokens - other.tokens,
            title_tokens: self.title_tokens - other.title_tokens,
        }
    }
}

/// Column arrays of an insert of chunks.
#[derive(Default)]
struct ChunkColumns {
    key: Vec<i64>,
    doc_key: Vec<i64>,
    doc_id: Vec<String>,
    index: Vec<i32>,
    char_start: Vec<i32>,
    char_end: Vec<i32>,
    tokens: Vec<i32>,
    title: Vec<Option<String>>,
    text: Vec<String>,
    metadata: Vec<Value>,
    vector: Vec<Vector>,
}

impl ChunkStore for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn unchanged(&self, docs: &[(&str, u64)]) -> Vec<bool> {
        let mut same = vec![false; docs.len()];
        if docs.is_empty() {
            return same;
        }
        let ids: Vec<&str> = docs.iter().map(|d| d.0).collect();
        let Ok(stored) = self.db.conn().and_then(|mut conn| self.stored_hashes(&mut conn.client, &ids)) else {
            return same;
        };
        for (s, (id, hash)) in same.iter_mut().zip(docs) {
            *s = stored.get(*id) == Some(&(*hash as i64));
        }
        same
    }

    fn upsert(&self, docs: Vec<NewDoc>) -> Result<WriteResult> {
        self.write(docs)
    }

    fn parallel_writes(&self) -> usize {
        PARALLEL_WRITES
    }

    /// An empty collection (or one whose indexes an earlier load left unbuilt) is loaded
    /// without its HNSW index and its postings' index by lexeme, which are built once at the
    /// end: pgvector's build is several times faster than inserting one vector at a time into
    /// the graph (3.5x at 100,000 vectors, 6.5x at 1,000,000; docs/benchmarks.md), and the
    /// B-tree's about 2x. Searches meanwhile rank by exact distances and scan the postings.
    /// The lock this holds is the session's, so a server that dies mid-load releases it, and
    /// upkeep ([`ChunkStore::maintain`]) builds the indexes.
    fn begin_bulk_load(&self) -> Result<bool> {
        let mut held = self.bulk.lock().expect("bulk load");
        if held.is_some() {
            return Ok(false);
        }
        let Some(mut conn) = self.bulk_lock()? else { return Ok(false) };
        let empty: bool = conn
            .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", self.chunks), &[])
            .map_err(|e| self.err(e))?
            .get(0);
        // A collection whose indexes an earlier load left unbuilt goes on without them too.
        if !empty && self.indexes_state(&mut conn.client)? == Some(true) {
            return Ok(false);
        }
        for (index, _) in self.deferred_indexes() {
            conn.batch_execute(&format!("DROP INDEX IF EXISTS {index}")).map_err(|e| self.err(e))?;
        }
        tracing::info!(
            collection = %self.settings.name,
            "loading an empty collection without its dense index and postings index; they are built at the end"
        );
        *held = Some(conn);
        Ok(true)
    }

    fn end_bulk_load(&self) -> Result<()> {
        let Some(mut conn) = self.bulk.lock().expect("bulk load").take() else { return Ok(()) };
        match self.build_indexes_on(&mut conn) {
            Err(IndexError::Unavailable(_)) => {
                // The session was lost (the database restarted), and its lock with it.
                drop(conn);
                self.build_indexes().map(|_| ())
            }
            built => built.map(|_| ()),
        }
    }

    fn delete(&self, ids: &[String]) -> Result<WriteResult> {
        if ids.is_empty() {
            return Ok(WriteResult::default());
        }
        self.delete_sql("d.doc_id = ANY($1)", &[&ids])
    }

    fn delete_by_filter(&self, filter: &Filter) -> Result<WriteResult> {
        let mut sql = Sql::default();
        let condition = sql.filter(filter, "d.metadata", "d.doc_id");
        let params = sql.refs();
        self.delete_sql(&condition, &params)
    }

    fn get(&self, id: &str) -> Result<Option<DocumentView>> {
        let mut conn = self.db.conn()?;
        let mut tx = conn
            .build_transaction()
            .read_only(true)
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .map_err(|e| self.err(e))?;
        let Some(doc) = tx
            .query_opt(&format!("SELECT title, text, metadata FROM {} WHERE doc_id = $1", self.docs), &[&id])
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let chunks = tx
            .query(
                &format!(
                    "SELECT chunk_index, char_start, char_end, tokens FROM {} WHERE doc_id = $1 ORDER BY chunk_index",
                    self.chunks
                ),
                &[&id],
            )
            .map_err(|e| self.err(e))?;
        Ok(Some(DocumentView {
            id: id.to_string(),
            title: doc.get(0),
            text: doc.get(1),
            metadata: doc.get(2),
            chunks: chunks
                .iter()
                .map(|r| ChunkView {
                    chunk_id: chunk_id(id, r.get::<_, i32>(0) as usize),
                    char_start: r.get::<_, i32>(1) as u32,
                    char_end: r.get::<_, i32>(2) as u32,
                    tokens: r.get::<_, i32>(3) as u32,
                })
                .collect(),
        }))
    }

    fn commit(&self) -> Result<u64> {
        self.seq()
    }

    fn wait_visible(&self, _seq: u64) -> Result<()> {
        // Committed is visible.
        Ok(())
    }

    fn has_pending(&self) -> bool {
        false
    }

    fn view<'a>(&'a self, filter: Option<&'a Filter>) -> Result<Box<dyn StoreView + 'a>> {
        // The transaction begins with the view's first statement (one round trip less).
        let conn = self.db.read_conn()?;
        let mut sql = Sql::default();
        let condition = match filter {
            Some(f) => sql.filter(f, "c.metadata", "c.doc_id"),
            None => "true".into(),
        };
        Ok(Box::new(PgView {
            store: self,
            conn: RefCell::new(conn),
            sql,
            condition,
            seen: RefCell::new(HashMap::new()),
            loaded: RefCell::new(HashMap::new()),
            begun: std::cell::Cell::new(false),
        }))
    }

    fn sample(&self, n: usize) -> Result<Vec<SampledChunk>> {
        let rows = self
            .db
            .read_conn()?
            .query(
                &format!(
                    "SELECT embedding::vector, text FROM (
                         SELECT embedding, text, row_number() OVER (ORDER BY key) AS i, count(*) OVER () AS n FROM {}
                     ) s WHERE (i - 1) % greatest(1, ceil(n::float8 / $1::bigint)::bigint) = 0 LIMIT $1::bigint",
                    self.chunks
                ),
                &[&(n.max(1) as i64)],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| SampledChunk { vector: r.get::<_, Vector>(0).to_vec(), text: r.get(1) }).collect())
    }

    fn stats(&self) -> StoreStats {
        let read = || -> Result<StoreStats> {
            let deferred: Vec<String> = self.deferred_indexes().into_iter().map(|(index, _)| index).collect();
            let mut conn = self.db.conn()?;
            let row = conn
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM {docs}), (SELECT count(*) FROM {chunks}),
                                pg_total_relation_size('{docs}') + pg_total_relation_size('{chunks}')
                                    + pg_total_relation_size('{terms}'),
                                (SELECT seq FROM ragway_collections WHERE name = $1),
                                (SELECT count(*) = cardinality($2::text[]) AND bool_and(i.indisvalid) FROM pg_index i
                                 WHERE i.indexrelid IN (SELECT to_regclass(x) FROM unnest($2::text[]) x))",
                        docs = self.docs,
                        chunks = self.chunks,
                        terms = self.terms
                    ),
                    &[&self.settings.name, &deferred],
                )
                .map_err(|e| self.err(e))?;
            let chunks = row.get::<_, i64>(1) as usize;
            let seq = row.get::<_, i64>(3) as u64;
            Ok(StoreStats {
                documents: row.get::<_, i64>(0) as usize,
                chunks,
                dense_points: chunks,
                keyword_chunks: chunks as u64,
                last_seq: seq,
                visible_seq: seq,
                disk_bytes: row.get::<_, i64>(2) as u64,
                // Held by the database server, not by ragway.
                memory_bytes: 0,
                // Until every deferred index is built (a bulk load, or the builds after
                // it), searches rank by exact distances or scan the postings.
                state: if row.get::<_, bool>(4) { "ready" } else { "rebuilding" },
            })
        };
        read().unwrap_or_else(|e| {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not read the collection's counts");
            StoreStats { state: "unavailable", ..Default::default() }
        })
    }

    fn vectors(&self) -> Result<Vec<Vec<f32>>> {
        let rows = self
            .db
            .conn()?
            .query(&format!("SELECT embedding::vector FROM {} ORDER BY key", self.chunks), &[])
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| r.get::<_, Vector>(0).to_vec()).collect())
    }

    fn snapshot(&self, _dest: &Path) -> Result<()> {
        Err(IndexError::invalid(
            "name",
            format!(
                "collection `{}` lives in PostgreSQL: back it up with the database's own tools (pg_dump, base backups)",
                self.settings.name
            ),
        ))
    }

    fn needs_compaction(&self) -> bool {
        // PostgreSQL's autovacuum reclaims deleted rows.
        false
    }

    fn compact(&self) -> Result<()> {
        self.vacuum(&mut self.db.conn()?)
    }

    /// Builds the deferred indexes when a bulk load left them missing (a server that died
    /// mid-load, a build that failed). Once found there it is checked again after
    /// [`INDEX_CHECK_INTERVAL`]; while another server loads the collection, after
    /// [`INDEX_RETRY_INTERVAL`]. The database being down is `/ready`'s to say, not upkeep's:
    /// it waits for the next check.
    fn maintain(&self) -> Result<()> {
        if self.bulk.lock().expect("bulk load").is_some() {
            return Ok(());
        }
        if self.next_index_check.lock().expect("index check").is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let outcome = self
            .db
            .conn()
            .and_then(|mut conn| self.indexes_state(&mut conn.client))
            .and_then(|state| Ok(state == Some(true) || self.build_indexes()?));
        let wait = if matches!(outcome, Ok(false)) { INDEX_RETRY_INTERVAL } else { INDEX_CHECK_INTERVAL };
        *self.next_index_check.lock().expect("index check") = Some(Instant::now() + wait);
        match outcome {
            Err(IndexError::Unavailable(_)) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// One search's read-only transaction.
struct PgView<'a> {
    store: &'a PgStore,
    conn: RefCell<Conn>,
    /// The filter's parameters; the query vector or text and the limit come after them.
    sql: Sql,
    /// The filter as SQL over the chunks table (alias `c`).
    condition: String,
    /// The chunks the halves returned, with their documents (for `document_of`).
    seen: RefCell<HashMap<u64, u64>>,
    /// What `load` fetched of them (for `chunk`).
    loaded: RefCell<HashMap<u64, StoredChunk>>,
    /// Whether the transaction has begun.
    begun: std::cell::Cell<bool>,
}

impl Drop for PgView<'_> {
    fn drop(&mut self) {
        // A connection whose transaction cannot be ended is closed by the pool's check.
        if self.begun.get() {
            let _ = self.conn.get_mut().batch_execute("ROLLBACK");
        }
    }
}

impl PgView<'_> {
    /// Runs a query returning `score, c.key, c.doc_key`, remembering the chunks' documents.
    fn hits(&self, query: &str, extra: &[&(dyn ToSql + Sync)]) -> Result<Vec<(u64, f32)>> {
        let mut params = self.sql.refs();
        params.extend_from_slice(extra);
        let rows = self.query(query, &params)?;
        let mut seen = self.seen.borrow_mut();
        Ok(rows
            .iter()
            .map(|r| {
                let key = r.get::<_, i64>(1) as u64;
                seen.insert(key, r.get::<_, i64>(2) as u64);
                (key, r.get::<_, f64>(0) as f32)
            })
            .collect())
    }

    /// Begins the view's transaction if it has not, sending `settings` (`SET LOCAL ...;`
    /// statements) with the `BEGIN`, or on their own once it has begun.
    fn begin(&self, settings: &str) -> Result<()> {
        let batch = match self.begun.replace(true) {
            false => format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {settings}"),
            true if settings.is_empty() => return Ok(()),
            true => settings.to_string(),
        };
        self.conn.borrow_mut().batch_execute(&batch).map_err(|e| self.store.err(e))
    }

    /// Runs a statement of the view (prepared once per connection) in its transaction.
    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>> {
        self.begin("")?;
        let mut conn = self.conn.borrow_mut();
        let statement = conn.prepared(sql).map_err(|e| self.store.err(e))?;
        conn.query(&statement, params).map_err(|e| self.store.err(e))
    }

    fn next_param(&self, after: usize) -> String {
        format!("${}", self.sql.params.len() + after)
    }
}

impl StoreView for PgView<'_> {
    fn dense_search(&self, query: &DenseQuery<'_>) -> Result<DenseHits> {
        let (op, k) = (self.store.operator(), query.k);
        let ef = query.ef.max(k).min(MAX_EF_SEARCH);
        let (qp, kp) = (self.next_param(1), self.next_param(2));
        let vector = Vector::from(query.vector.to_vec());
        let limit = k as i64;
        let vt = self.store.vector_type();
        let select = format!(
            "SELECT -(c.embedding {op} {qp}::vector::{vt})::float8, c.key, c.doc_key FROM {} c WHERE {}
             ORDER BY c.embedding {op} {qp}::vector::{vt} LIMIT {kp}::bigint",
            self.store.chunks, self.condition
        );
        let exact_forced = match query.exact_scan_max {
            Some(0) | None => false,
            Some(max) => self.count_matching(max + 1)? <= max,
        };
        if !exact_forced {
            // Strict order keeps the walk's results in distance order while it widens past
            // chunks the filter rejects.
            self.begin(&format!("SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = strict_order"))?;
            let hits = self.hits(&select, &[&vector, &limit])?;
            if hits.len() == k || self.count_matching(k)? <= hits.len() {
                return Ok(DenseHits { hits, exact: false });
            }
        }
        // Too few hits while enough chunks match (or exact distances asked for): the same
        // query without the vector index ranks every matching chunk.
        self.begin("SET LOCAL enable_indexscan = off")?;
        let hits = self.hits(&select, &[&vector, &limit]);
        self.begin("SET LOCAL enable_indexscan = on")?;
        Ok(DenseHits { hits: hits?, exact: true })
    }

    fn keyword_search(&self, query: &str, k: usize, title_boost: f32) -> Result<Vec<(u64, f32)>> {
        // BM25 as the embedded store's tantivy index ranks: any of the query's words (its
        // lexemes, each as often as it occurs in the query), over the text field that holds
        // title + text, plus `title_boost` times the title field's own BM25. Document
        // frequencies count every chunk's postings, the filter applies after, as in tantivy.
        // Each lexeme's weight first (a count over its postings), then one pass over the
        // postings: no sort of them. (`LIMIT 1` tells the planner that the counts are one
        // row: a prepared statement's generic plan must not expect a table of them.)
        let (tp, kp, bp) = (self.next_param(1), self.next_param(2), self.next_param(3));
        let (terms, stats, chunks) = (&self.store.terms, &self.store.stats, &self.store.chunks);
        let idf = |df: &str| format!("q.qtf * ln(1 + (st.n - {df} + 0.5) / ({df} + 0.5))");
        let tf_part = |tf: &str, len: &str, avg: &str| {
            format!("{} * {tf} / ({tf} + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * {len} / st.{avg}))", BM25_K1 + 1.0)
        };
        let text = format!("w.idf * {}", tf_part("p.tf", "p.len", "avg_len"));
        // The title's part only when asked for (a plan of its own).
        let (title_df, title_idf, title) = match title_boost > 0.0 {
            true => (
                ", count(*) FILTER (WHERE t.tf_title > 0)::float8 AS title",
                format!(", {bp}::float8 * {} AS title_idf", idf("df.title")),
                format!(
                    " + CASE WHEN p.tf_title > 0 THEN w.title_idf * {} ELSE 0 END",
                    tf_part("p.tf_title", "p.title_len", "avg_title_len")
                ),
            ),
            false => ("", String::new(), String::new()),
        };
        let (join, condition) = match self.condition.as_str() {
            "true" => (String::new(), "true"),
            c => (format!(" JOIN {chunks} c ON c.key = p.key"), c),
        };
        let select = format!(
            "WITH q AS (SELECT u.lexeme, cardinality(u.positions)::float8 AS qtf FROM unnest(to_tsvector('english', {tp}::text)) u),
             st AS (SELECT greatest(chunks, 1)::float8 AS n, greatest(tokens, 1)::float8 / greatest(chunks, 1) AS avg_len,
                           greatest(title_tokens, 1)::float8 / greatest(chunks, 1) AS avg_title_len FROM {stats} LIMIT 1),
             w AS (SELECT q.lexeme, {idf}{title_idf} FROM q CROSS JOIN st
                   CROSS JOIN LATERAL (SELECT count(*)::float8 AS n{title_df} FROM {terms} t WHERE t.lexeme = q.lexeme) df)
             SELECT sum({text}{title})::float8 AS s, p.key, p.doc_key
             FROM w CROSS JOIN st CROSS JOIN LATERAL (
                 SELECT t.key, t.doc_key, t.tf::float8 AS tf, t.tf_title::float8 AS tf_title, t.len::float8 AS len,
                        t.title_len::float8 AS title_len
                 FROM {terms} t WHERE t.lexeme = w.lexeme) p{join}
             WHERE {condition}
             GROUP BY p.key, p.doc_key ORDER BY s DESC, p.key LIMIT {kp}::bigint",
            idf = idf("df.n") + " AS idf",
        );
        let (limit, boost) = (k as i64, title_boost as f64);
        match title_boost > 0.0 {
            true => self.hits(&select, &[&query, &limit, &boost]),
            false => self.hits(&select, &[&query, &limit]),
        }
    }

    fn document_of(&self, key: u64) -> Option<u64> {
        self.seen.borrow().get(&key).copied()
    }

    fn load(&self, keys: &[u64]) -> Result<()> {
        let keys: Vec<i64> = keys.iter().map(|k| *k as i64).collect();
        // The same transaction as the halves: the chunks they returned are there.
        let rows = self.query(
            &format!(
                "SELECT key, doc_id, chunk_index, text, title, metadata, char_start, char_end FROM {} WHERE key = ANY($1)",
                self.store.chunks
            ),
            &[&keys],
        )?;
        let mut loaded = self.loaded.borrow_mut();
        for r in rows {
            let chunk = StoredChunk {
                document_id: r.get(1),
                chunk_index: r.get::<_, i32>(2) as u32,
                text: r.get(3),
                title: r.get(4),
                metadata: r.get(5),
                char_start: r.get::<_, i32>(6) as u32,
                char_end: r.get::<_, i32>(7) as u32,
            };
            loaded.insert(r.get::<_, i64>(0) as u64, chunk);
        }
        Ok(())
    }

    fn chunk(&self, key: u64) -> Option<StoredChunk> {
        self.loaded.borrow().get(&key).cloned()
    }
}

impl PgView<'_> {
    /// How many chunks match the filter, counting up to `cap`.
    fn count_matching(&self, cap: usize) -> Result<usize> {
        let cp = self.next_param(1);
        let q = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} c WHERE {} LIMIT {cp}::bigint) s",
            self.store.chunks, self.condition
        );
        let mut params = self.sql.refs();
        let cap = cap as i64;
        params.push(&cap);
        let rows = self.query(&q, &params)?;
        let row = rows.first().ok_or_else(|| IndexError::Internal("count returned no row".into()))?;
        Ok(row.get::<_, i64>(0) as usize)
    }
}

/// A filter translated to SQL: the condition text refers to `$1..$n`, whose values are
/// kept here.
#[derive(Default)]
struct Sql {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
    }

    /// The condition of `f` over a `jsonb` metadata column and a text id column. Every
    /// part is true or false, never NULL, so `NOT` negates exactly as ragway's filters do.
    fn filter(&mut self, f: &Filter, meta: &str, id: &str) -> String {
        match f {
            Filter::And(fs) if fs.is_empty() => "true".into(),
            Filter::Or(fs) if fs.is_empty() => "false".into(),
            Filter::And(fs) => {
                let parts: Vec<String> = fs.iter().map(|f| self.filter(f, meta, id)).collect();
                format!("({})", parts.join(" AND "))
            }
            Filter::Or(fs) => {
                let parts: Vec<String> = fs.iter().map(|f| self.filter(f, meta, id)).collect();
                format!("({})", parts.join(" OR "))
            }
            Filter::Not(f) => format!("(NOT {})", self.filter(f, meta, id)),
            Filter::Cond { key, op } if key.len() == 1 && key[0] == "_id" => self.id_condition(op, id),
            Filter::Cond { key, op } => self.condition(key, op, meta),
        }
    }

    /// A condition on the document id (a string).
    fn id_condition(&mut self, op: &Op, id: &str) -> String {
        let strings = |values: &[Value]| -> Vec<String> {
            values.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
        };
        match op {
            Op::Exists(want) => want.to_string(),
            Op::Eq(Value::String(s)) => format!("({id} = {})", self.param(s.clone())),
            Op::Ne(Value::String(s)) => format!("({id} <> {})", self.param(s.clone())),
            Op::Eq(_) => "false".into(),
            Op::Ne(_) => "true".into(),
            Op::In(values) => format!("({id} = ANY({}::text[]))", self.param(strings(values))),
            Op::Nin(values) => format!("(NOT ({id} = ANY({}::text[])))", self.param(strings(values))),
            Op::Range { .. } => "false".into(),
        }
    }

    /// The value at a dotted path: `->` steps with text keys, so an array on the way is
    /// never indexed by a numeric key (ragway's paths walk objects only). NULL when missing.
    fn path(&mut self, key: &[String], meta: &str) -> String {
        let mut out = meta.to_string();
        for part in key {
            out = format!("({out} -> {}::text)", self.param(part.clone()));
        }
        out
    }

    /// True when any candidate of the value at `key` (its elements when it is an array,
    /// else itself) satisfies `test` (SQL over `e`).
    fn any_candidate(&mut self, key: &[String], meta: &str, test: &str) -> String {
        let v = self.path(key, meta);
        format!(
            "COALESCE((SELECT bool_or({test}) FROM jsonb_array_elements(CASE jsonb_typeof({v}) WHEN 'array' THEN {v} ELSE jsonb_build_array({v}) END) AS t(e) WHERE {v} IS NOT NULL), false)"
        )
    }

    /// `metadata` holds `value` at `key`, itself or as an array element: containment, which
    /// the GIN index on `metadata` answers.
    fn contains(&mut self, key: &[String], meta: &str, value: &Value) -> String {
        let nest = |leaf: Value| {
            key.iter().rev().fold(leaf, |inner, k| Value::Object([(k.clone(), inner)].into_iter().collect()))
        };
        let (one, many) = (nest(value.clone()), nest(Value::Array(vec![value.clone()])));
        format!("({meta} @> {}::jsonb OR {meta} @> {}::jsonb)", self.param(one), self.param(many))
    }

    fn equals(&mut self, key: &[String], meta: &str, value: &Value) -> String {
        match value {
            // Containment of a scalar is equality (numbers by value, as JSON means them).
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => self.contains(key, meta, value),
            // Objects and arrays: equal to a candidate, not contained in one.
            _ => {
                let p = self.param(value.clone());
                self.any_candidate(key, meta, &format!("e = {p}::jsonb"))
            }
        }
    }

    fn condition(&mut self, key: &[String], op: &Op, meta: &str) -> String {
        match op {
            Op::Exists(want) => {
                let v = self.path(key, meta);
                let present = format!("COALESCE({v} IS NOT NULL AND {v} <> 'null'::jsonb, false)");
                if *want {
                    present
                } else {
                    format!("(NOT {present})")
                }
            }
            Op::Eq(x) => self.equals(key, meta, x),
            Op::Ne(x) => format!("(NOT {})", self.equals(key, meta, x)),
            Op::In(xs) if xs.is_empty() => "false".into(),
            Op::Nin(xs) if xs.is_empty() => "true".into(),
            Op::In(xs) => {
                let parts: Vec<String> = xs.iter().map(|x| self.equals(key, meta, x)).collect();
                format!("({})", parts.join(" OR "))
            }
            Op::Nin(xs) => {
                let parts: Vec<String> = xs.iter().map(|x| self.equals(key, meta, x)).collect();
                format!("(NOT ({}))", parts.join(" OR "))
            }
            Op::Range { gt, gte, lt, lte } => {
                let mut bounds = Vec::new();
                for (bound, op) in [(gt, ">"), (gte, ">="), (lt, "<"), (lte, "<=")] {
                    if let Some(b) = bound {
                        let p = self.param(*b);
                        bounds.push(format!("n {op} {p}::float8"));
                    }
                }
                if bounds.is_empty() {
                    bounds.push("true".into());
                }
                // The number, when the candidate is one (CASE keeps the cast from others).
                let test = format!(
                    "(SELECT {} FROM (SELECT CASE WHEN jsonb_typeof(e) = 'number' THEN (e)::float8 END AS n) AS x WHERE n IS NOT NULL)",
                    bounds.join(" AND ")
                );
                self.any_candidate(key, meta, &format!("COALESCE({test}, false)"))
            }
        }
    }
}

/// A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a fresh directory
/// under `/tmp`, started on a free loopback port, stopped (and its directory removed) when
/// dropped. `install` is a PostgreSQL installation with pgvector (the `pginstall` directory
/// that `scripts/setup-postgres.sh` prints). PostgreSQL refuses to run as root: as root, the
/// server runs as the `postgres` user.
pub struct LocalServer {
    install: std::path::PathBuf,
    dir: std::path::PathBuf,
    pub port: u16,
}

impl LocalServer {
    /// The installation named by `RAGWAY_PG_INSTALL`.
    pub fn from_env() -> std::io::Result<LocalServer> {
        let install = std::env::var_os("RAGWAY_PG_INSTALL").ok_or_else(|| {
            std::io::Error::other(
                "RAGWAY_PG_INSTALL is not set: run `export RAGWAY_PG_INSTALL=$(scripts/setup-postgres.sh)` (scripts/test.sh does)",
            )
        })?;
        LocalServer::start(Path::new(&install))
    }

    pub fn start(install: &Path) -> std::io::Result<LocalServer> {
        let server = LocalServer::empty(install)?;
        run(server
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(server.data()))?;
        server.start_again()?;
        Ok(server)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.join("data")
    }

    /// A streaming replica of this server (`pg_basebackup -R -X stream`), started on a port
    /// of its own: a hot standby that serves reads.
    pub fn replica(&self) -> std::io::Result<LocalServer> {
        let replica = LocalServer::empty(&self.install)?;
        run(replica
            .command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-R", "-X", "stream", "-D"])
            .arg(replica.data()))?;
        replica.start_again()?;
        Ok(replica)
    }

    /// A directory and a free port for a server, nothing in them yet.
    fn empty(install: &Path) -> std::io::Result<LocalServer> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ragway-pg-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let server = LocalServer { install: install.to_path_buf(), dir, port };
        if is_root() {
            run(std::process::Command::new("chown").arg("postgres").arg(&server.dir))?;
        }
        Ok(server)
    }

    fn command(&self, name: &str) -> std::process::Command {
        let bin = self.install.join("bin").join(name);
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            std::process::Command::new(bin)
        }
    }

    /// Starts the server again after [`LocalServer::stop`].
    pub fn start_again(&self) -> std::io::Result<()> {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.display());
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"]))
        .map_err(|e| {
            // The server's own words are in its log.
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            std::io::Error::other(format!("{e}\nserver log:\n{}", tail.join("\n")))
        })
    }

    /// Stops the server at once, without a checkpoint (as a crash would).
    pub fn stop(&self) -> std::io::Result<()> {
        run(self.command("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut std::process::Command) -> std::io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}
