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

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key needed (probes when left open, the GraphiQL page, the OpenAPI document).
    Open,
    /// A valid key; the handler checks scopes itself (GraphQL, per field).
    Authenticated,
    Scoped(Scope),
}

/// The access rule of a request, by method and path (one table for the whole REST API).
pub fn access_for(method: &str, path: &str, open_probes: bool) -> Access {
    let path = path.trim_end_matches('/');
    match path {
        "/health" | "/ready" | "/metrics" if open_probes => return Access::Open,
        "/openapi.json" => return Access::Open,
        "/graphql" if method == "GET" => return Access::Open,
        "/graphql" | "/graphql/ws" => return Access::Authenticated,
        _ => {}
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_collections = segs.first() == Some(&"v1") && segs.get(1) == Some(&"collections");
    if segs.first() == Some(&"v1") && segs.get(1) == Some(&"admin") {
        // The model registry: its views show upstream addresses, its writes move traffic.
        return Access::Scoped(Scope::Admin);
    }
    if method == "GET" || method == "HEAD" {
        return Access::Scoped(Scope::Read);
    }
    if segs.first() == Some(&"v1") && segs.get(1) == Some(&"prompts") {
        // Rendering only reads; creating versions and moving labels writes.
        return Access::Scoped(if segs.last() == Some(&"render") { Scope::Read } else { Scope::Write });
    }
    if segs.first() == Some(&"v1") && segs.get(1) == Some(&"evals") {
        // Starting a run spends the engine for minutes and writes under the data dir.
        return Access::Scoped(Scope::Write);
    }
    if !is_collections {
        // Inference, tokenization and anything else that only reads.
        return Access::Scoped(Scope::Read);
    }
    match (method, segs.len(), segs.get(3).copied()) {
        // POST /v1/collections, DELETE /v1/collections/{name}
        ("POST", 2, _) | ("DELETE", 3, _) => Access::Scoped(Scope::Admin),
        (_, _, Some("search")) => Access::Scoped(Scope::Read),
        (_, _, Some("documents" | "ingest")) => Access::Scoped(Scope::Write),
        (_, _, Some("snapshot" | "restore" | "compact")) => Access::Scoped(Scope::Admin),
        _ => Access::Scoped(Scope::Admin),
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
    fn access_table() {
        use Access::*;
        use Scope::*;
        assert_eq!(access_for("GET", "/health", true), Open);
        assert_eq!(access_for("GET", "/metrics", false), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/chat/completions", true), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/collections", true), Scoped(Admin));
        assert_eq!(access_for("DELETE", "/v1/collections/a", true), Scoped(Admin));
        assert_eq!(access_for("POST", "/v1/collections/a/search", true), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/collections/a/documents", true), Scoped(Write));
        assert_eq!(access_for("DELETE", "/v1/collections/a/documents/x/y", true), Scoped(Write));
        assert_eq!(access_for("POST", "/v1/collections/a/ingest", true), Scoped(Write));
        assert_eq!(access_for("POST", "/v1/collections/a/snapshot", true), Scoped(Admin));
        assert_eq!(access_for("GET", "/v1/collections/a/documents/x", true), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/rag", true), Scoped(Read));
        assert_eq!(access_for("GET", "/v1/prompts/rag-answer", true), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/prompts/rag-answer/render", true), Scoped(Read));
        assert_eq!(access_for("POST", "/v1/prompts/rag-answer/versions", true), Scoped(Write));
        assert_eq!(access_for("PUT", "/v1/prompts/rag-answer/labels/production", true), Scoped(Write));
        assert_eq!(access_for("DELETE", "/v1/prompts/mine", true), Scoped(Write));
        assert_eq!(access_for("POST", "/graphql", true), Authenticated);
        assert_eq!(access_for("GET", "/graphql", true), Open);
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
