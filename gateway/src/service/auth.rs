//! API keys, scopes and per-key rate limits.
//!
//! Keys come from `--api-key` (repeatable; every scope, no limits) and from a keys file
//! (`--api-keys-file`, TOML `[[keys]]` tables with `key` or `key_sha256`, `name`, `scopes`,
//! `requests_per_minute`, `tokens_per_minute`). Clients send `Authorization: Bearer <key>`
//! (or `api-key: <key>`, as Azure-style clients do). Keys are looked up by their SHA-256, so
//! the comparison does not leak the key through timing and a keys file need not hold them
//! in clear.
//!
//! Scopes nest: `admin` ⊇ `write` ⊇ `read`. Authentication is off only when no key is
//! configured; the server then refuses to listen beyond loopback unless told to.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a key may do; each scope includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Inference (chat, completions, embeddings, tokenize), search, reading collections,
    /// documents and jobs.
    Read,
    /// Writing documents and running ingestion jobs.
    Write,
    /// Creating and deleting collections, snapshots, restores and compaction.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// One entry of the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key itself.
    #[serde(default)]
    pub key: Option<String>,
    /// Or the hex SHA-256 of the key, to keep keys out of the file.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Name used in logs [default: key-N].
    #[serde(default)]
    pub name: Option<String>,
    /// Scopes [default: read].
    #[serde(default)]
    pub scopes: Option<Vec<Scope>>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt plus generated tokens (and embedded tokens) per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// A token bucket refilled continuously at `capacity` per minute. The balance may go
/// negative when a request is charged after the fact (tokens); callers wait until it is
/// positive again.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    balance: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: f64) -> Self {
        Self { capacity: per_minute, balance: per_minute, at: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64();
        self.balance = (self.balance + secs * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Seconds until the balance reaches `need` (0 when it already has).
    fn wait_for(&self, need: f64) -> u32 {
        if self.balance >= need {
            0
        } else {
            (((need - self.balance) * 60.0 / self.capacity).ceil() as u32).max(1)
        }
    }
}

/// The caller of a request, as the auth middleware established it.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    pub scope: Scope,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

impl Principal {
    /// The caller when authentication is off: every scope, no limits.
    pub fn anonymous() -> Arc<Self> {
        Arc::new(Self { name: "anonymous".into(), scope: Scope::Admin, requests: None, tokens: None })
    }

    pub fn allows(&self, needed: Scope) -> bool {
        self.scope >= needed
    }

    /// Takes one request from the key's budget; `Err(seconds)` to wait when it is spent
    /// (requests per minute, or tokens per minute overdrawn by earlier requests).
    pub fn admit(&self) -> Result<(), u32> {
        if let Some(t) = &self.tokens {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.refill();
            let wait = t.wait_for(0.0);
            if wait > 0 {
                return Err(wait);
            }
        }
        if let Some(r) = &self.requests {
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            r.refill();
            let wait = r.wait_for(1.0);
            if wait > 0 {
                return Err(wait);
            }
            r.balance -= 1.0;
        }
        Ok(())
    }

    /// Charges tokens a request used (known only once it ran).
    pub fn charge_tokens(&self, n: usize) {
        if let Some(t) = &self.tokens {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.refill();
            t.balance -= n as f64;
        }
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashMap<[u8; 32], Arc<Principal>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl KeyStore {
    /// Builds the store from plain keys (all scopes) and an optional keys file.
    pub fn load(plain: &[String], file: Option<&Path>) -> anyhow::Result<Self> {
        let mut entries: Vec<KeyConfig> = plain
            .iter()
            .map(|k| KeyConfig {
                key: Some(k.clone()),
                key_sha256: None,
                name: None,
                scopes: Some(vec![Scope::Admin]),
                requests_per_minute: None,
                tokens_per_minute: None,
            })
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read keys file {}: {e}", path.display()))?;
            let parsed: KeysFile =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid keys file {}: {e}", path.display()))?;
            entries.extend(parsed.keys);
        }
        let mut by_digest = HashMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            let name = e.name.clone().unwrap_or_else(|| format!("key-{}", i + 1));
            let d = match (&e.key, &e.key_sha256) {
                (Some(k), None) if !k.trim().is_empty() => digest(k.trim()),
                (None, Some(h)) => parse_hex32(&h.to_ascii_lowercase())
                    .ok_or_else(|| anyhow::anyhow!("key `{name}`: key_sha256 must be 64 hex digits"))?,
                _ => anyhow::bail!("key `{name}`: give exactly one of `key` and `key_sha256`"),
            };
            let scope = e.scopes.as_deref().unwrap_or(&[Scope::Read]).iter().copied().max().unwrap_or(Scope::Read);
            let bucket = |per_minute: Option<u64>| -> anyhow::Result<Option<Mutex<Bucket>>> {
                match per_minute {
                    Some(0) => anyhow::bail!("key `{name}`: rate limits must be positive"),
                    Some(n) => Ok(Some(Mutex::new(Bucket::new(n as f64)))),
                    None => Ok(None),
                }
            };
            let principal = Principal {
                requests: bucket(e.requests_per_minute.map(u64::from))?,
                tokens: bucket(e.tokens_per_minute)?,
                name: name.clone(),
                scope,
            };
            if by_digest.insert(d, Arc::new(principal)).is_some() {
                anyhow::bail!("key `{name}` is configured twice");
            }
        }
        Ok(Self { by_digest })
    }

    /// True when at least one key is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The principal of a presented key.
    pub fn lookup(&self, key: &str) -> Option<Arc<Principal>> {
        self.by_digest.get(&digest(key.trim())).cloned()
    }
}

/// The key of an `Authorization: Bearer` (or `api-key`) header value.
pub fn bearer(authorization: Option<&str>, api_key: Option<&str>) -> Option<String> {
    if let Some(v) = authorization {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Some(rest.trim().to_string());
        }
        return None;
    }
    api_key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty())
}

/// Every operation ragway offers, over REST and GraphQL alike, and the scope it needs. This
/// table is the one place access is decided: handlers and resolvers name the operation they
/// run, never a path, so a path spelled another way (percent-encoding, slashes, case) cannot
/// change who may run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    // Inference.
    ListModels,
    GetModel,
    Chat,
    Completions,
    Embeddings,
    Tokenize,
    Detokenize,
    Rag,
    // Collections and documents.
    ListCollections,
    GetCollection,
    CreateCollection,
    DeleteCollection,
    UpsertDocuments,
    GetDocument,
    DeleteDocuments,
    Search,
    Ingest,
    ListJobs,
    GetJob,
    Snapshot,
    Restore,
    Compact,
    DriftReport,
    SetDriftReference,
    ResetDriftReference,
    // Prompt templates.
    ListPrompts,
    GetPrompt,
    RenderPrompt,
    CreatePromptVersion,
    DeletePrompt,
    SetPromptLabel,
    DeletePromptLabel,
    // Evaluation.
    StartEval,
    ListEvals,
    GetEval,
    // The model registry: its views show upstream addresses, its writes move traffic.
    ListModelVersions,
    GetModelVersions,
    RegisterModelVersion,
    SetModelRouting,
    RetireModelVersion,
    // Operations' own views (open when the server is told so; see `Settings`).
    Metrics,
    Probe,
    ApiDocs,
    /// Opening a GraphQL WebSocket (each subscription then authorizes its own operation).
    Subscribe,
}

impl Operation {
    /// The scope the operation needs.
    pub const fn scope(self) -> Scope {
        use Operation::*;
        match self {
            ListModels | GetModel | Chat | Completions | Embeddings | Tokenize | Detokenize | Rag | ListCollections
            | GetCollection | GetDocument | Search | ListJobs | GetJob | DriftReport | ListPrompts | GetPrompt
            | RenderPrompt | ListEvals | GetEval | Metrics | Probe | ApiDocs | Subscribe => Scope::Read,
            // Starting an eval spends the engine for minutes and writes under the data dir.
            UpsertDocuments | DeleteDocuments | Ingest | CreatePromptVersion | DeletePrompt | SetPromptLabel
            | DeletePromptLabel | StartEval => Scope::Write,
            CreateCollection | DeleteCollection | Snapshot | Restore | Compact | SetDriftReference
            | ResetDriftReference | ListModelVersions | GetModelVersions | RegisterModelVersion | SetModelRouting
            | RetireModelVersion => Scope::Admin,
        }
    }

    /// Whether running the operation spends one request of the caller's budget. Every
    /// operation does, except the ones monitoring systems poll.
    const fn metered(self) -> bool {
        !matches!(self, Operation::Metrics | Operation::Probe | Operation::ApiDocs)
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or one that is not configured (the message says which).
    Unauthenticated(&'static str),
    /// The key lacks the scope.
    Forbidden { key: String, needed: Scope },
    /// The key's request or token budget is spent; seconds to wait.
    RateLimited { key: String, retry_after: u32 },
}

/// Who is calling, as the transport established it from the request's credentials.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A configured key (or the anonymous principal when authentication is off).
    Known(Arc<Principal>),
    /// Authentication is on and no key came with the request.
    Missing,
    /// A key came that is not configured.
    Invalid,
}

impl Caller {
    /// The caller of a request carrying `key` (None: no credentials).
    pub fn identify(keys: &KeyStore, key: Option<&str>) -> Self {
        if !keys.enabled() {
            return Caller::Known(Principal::anonymous());
        }
        match key {
            None => Caller::Missing,
            Some(k) => keys.lookup(k).map(Caller::Known).unwrap_or(Caller::Invalid),
        }
    }

    /// The principal when the caller is authenticated (a transport refusing keyless
    /// requests as a whole; what the caller may do is still [`Caller::authorize`]'s call).
    pub fn authenticated(&self) -> Result<&Arc<Principal>, Denied> {
        match self {
            Caller::Known(p) => Ok(p),
            Caller::Missing => Err(Denied::Unauthenticated(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            )),
            Caller::Invalid => Err(Denied::Unauthenticated("Incorrect API key provided.")),
        }
    }

    /// Decides whether this caller may run `op` now: authenticated, holding the scope, and
    /// (for metered operations) within its request and token budgets. Each call is one
    /// operation: a GraphQL document with five aliased mutations is charged five times.
    pub fn authorize(&self, op: Operation) -> Result<Arc<Principal>, Denied> {
        let p = self.authenticated()?;
        let needed = op.scope();
        if !p.allows(needed) {
            return Err(Denied::Forbidden { key: p.name.clone(), needed });
        }
        if op.metered() {
            p.admit().map_err(|retry_after| Denied::RateLimited { key: p.name.clone(), retry_after })?;
        }
        Ok(p.clone())
    }

    /// The key's name for logs (None when unauthenticated).
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Known(p) => Some(&p.name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer abc"), None).as_deref(), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc "), None).as_deref(), Some("abc"));
        assert_eq!(bearer(Some("Basic abc"), None), None);
        assert_eq!(bearer(Some("Bearer "), None), None);
        assert_eq!(bearer(None, Some("xyz")).as_deref(), Some("xyz"));
        assert_eq!(bearer(None, None), None);
    }

    #[test]
    fn operations_need_their_scope_and_are_metered_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            "[[keys]]\nkey = \"r\"\nscopes = [\"read\"]\nrequests_per_minute = 3\n\
             [[keys]]\nkey = \"w\"\nscopes = [\"write\"]\n",
        )
        .unwrap();
        let keys = KeyStore::load(&[], Some(&path)).unwrap();
        let reader = Caller::identify(&keys, Some("r"));
        assert!(reader.authorize(Operation::Search).is_ok());
        assert!(matches!(reader.authorize(Operation::CreateCollection), Err(Denied::Forbidden { needed: Scope::Admin, .. })));
        assert!(matches!(reader.authorize(Operation::UpsertDocuments), Err(Denied::Forbidden { needed: Scope::Write, .. })));
        // Refused operations are not charged; unmetered ones are free.
        assert!(reader.authorize(Operation::Metrics).is_ok());
        assert!(reader.authorize(Operation::Chat).is_ok() && reader.authorize(Operation::Chat).is_ok());
        assert!(matches!(reader.authorize(Operation::Chat), Err(Denied::RateLimited { .. })));
        let writer = Caller::identify(&keys, Some("w"));
        assert!(writer.authorize(Operation::Ingest).is_ok());
        assert!(matches!(writer.authorize(Operation::RegisterModelVersion), Err(Denied::Forbidden { .. })));
        assert!(matches!(Caller::identify(&keys, None).authorize(Operation::ListModels), Err(Denied::Unauthenticated(_))));
        assert!(matches!(Caller::identify(&keys, Some("x")).authorize(Operation::Probe), Err(Denied::Unauthenticated(_))));
        // Authentication off: everything, unmetered.
        let open = KeyStore::default();
        assert!(Caller::identify(&open, None).authorize(Operation::RetireModelVersion).is_ok());
    }

    #[test]
    fn keys_file_scopes_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let hash: String = digest("hashed-key").iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            &path,
            format!(
                "[[keys]]\nkey = \"reader\"\nscopes = [\"read\"]\nrequests_per_minute = 2\n\n\
                 [[keys]]\nkey_sha256 = \"{hash}\"\nname = \"ops\"\nscopes = [\"admin\"]\n"
            ),
        )
        .unwrap();
        let store = KeyStore::load(&["plain".into()], Some(&path)).unwrap();
        assert_eq!(store.len(), 3);
        let reader = store.lookup("reader").unwrap();
        assert!(reader.allows(Scope::Read) && !reader.allows(Scope::Write));
        assert!(reader.admit().is_ok() && reader.admit().is_ok());
        let wait = reader.admit().unwrap_err();
        assert!((1..=30).contains(&wait), "{wait}");
        let ops = store.lookup("hashed-key").unwrap();
        assert_eq!(ops.name, "ops");
        assert!(ops.allows(Scope::Admin));
        assert!(store.lookup("plain").unwrap().allows(Scope::Admin));
        assert!(store.lookup("nope").is_none());

        std::fs::write(&path, "[[keys]]\nkey = \"a\"\nscope = [\"read\"]\n").unwrap();
        assert!(KeyStore::load(&[], Some(&path)).unwrap_err().to_string().contains("scope"));
    }

    #[test]
    fn tokens_overdraw_blocks_until_refilled() {
        let p = Principal {
            name: "t".into(),
            scope: Scope::Read,
            requests: None,
            tokens: Some(Mutex::new(Bucket::new(600.0))),
        };
        assert!(p.admit().is_ok());
        p.charge_tokens(900);
        // 300 tokens overdrawn at 10 tokens/s: about 30 s to wait.
        let wait = p.admit().unwrap_err();
        assert!((29..=31).contains(&wait), "{wait}");
    }
}
