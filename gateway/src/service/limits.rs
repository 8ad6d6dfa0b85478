//! Limits that outlive one request: concurrent WebSocket connections and subscriptions per
//! key. A slot is taken when a connection is accepted (or a subscription starts) and given
//! back when its guard drops, whatever ends it (client gone, server stop, error).
//!
//! Per-request sizes (bodies, prompts, `max_tokens`, `n`, `top_k`, vectors) are checked where
//! the request is parsed, against the constants and settings named there.

use crate::service::error::{ServiceError, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts of live connections and subscriptions, per key name.
#[derive(Debug)]
pub struct StreamLimits {
    max_connections: usize,
    max_subscriptions: usize,
    live: Mutex<HashMap<(String, SlotKind), usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SlotKind {
    Connection,
    Subscription,
}

/// A held slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<StreamLimits>,
    key: (String, SlotKind),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut live = self.owner.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}

impl StreamLimits {
    pub fn new(max_connections: usize, max_subscriptions: usize) -> Arc<Self> {
        Arc::new(Self { max_connections, max_subscriptions, live: Mutex::new(HashMap::new()) })
    }

    fn take(self: &Arc<Self>, key: &str, kind: SlotKind) -> Result<Slot, ServiceError> {
        let max = match kind {
            SlotKind::Connection => self.max_connections,
            SlotKind::Subscription => self.max_subscriptions,
        };
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let n = live.entry((key.to_string(), kind)).or_insert(0);
        if *n >= max {
            let what = match kind {
                SlotKind::Connection => "WebSocket connections",
                SlotKind::Subscription => "subscriptions",
            };
            return Err(ServiceError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: Some("too_many_streams"),
                kind: "rate_limit_error",
                retry_after: Some(1),
                ..ServiceError::invalid("", format!("the API key `{key}` already holds {n} open {what} (limit {max})"))
            });
        }
        *n += 1;
        Ok(Slot { owner: self.clone(), key: (key.to_string(), kind) })
    }

    /// A WebSocket connection for the key `key`.
    pub fn connection(self: &Arc<Self>, key: &str) -> Result<Slot, ServiceError> {
        self.take(key, SlotKind::Connection)
    }

    /// A running subscription for the key `key`.
    pub fn subscription(self: &Arc<Self>, key: &str) -> Result<Slot, ServiceError> {
        self.take(key, SlotKind::Subscription)
    }

    /// Live slots of a key (for tests and metrics).
    pub fn held(&self, key: &str) -> (usize, usize) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let get = |k| live.get(&(key.to_string(), k)).copied().unwrap_or(0);
        (get(SlotKind::Connection), get(SlotKind::Subscription))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_freed_on_drop() {
        let limits = StreamLimits::new(2, 1);
        let a = limits.connection("k").unwrap();
        let _b = limits.connection("k").unwrap();
        let err = limits.connection("k").unwrap_err();
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(limits.connection("other").is_ok(), "another key has its own slots");
        drop(a);
        assert!(limits.connection("k").is_ok());
        let s = limits.subscription("k").unwrap();
        assert!(limits.subscription("k").is_err());
        drop(s);
        assert_eq!(limits.held("k").1, 0);
    }
}

/// Largest prompt, in bytes of text, that is rendered and tokenized. Checked before the
/// tokenizer sees it: tokenizing costs memory in proportion (a 14 MiB message peaked at
/// 1.7 GB), and no context ragway serves holds more than this many bytes of text.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Refuses a prompt of `bytes` bytes over [`MAX_PROMPT_BYTES`] on parameter `param`.
pub fn check_prompt_bytes(bytes: usize, param: &str) -> Result<(), ServiceError> {
    if bytes > MAX_PROMPT_BYTES {
        return Err(ServiceError {
            code: Some("context_length_exceeded"),
            ..ServiceError::invalid(
                param,
                format!("the prompt is {bytes} bytes of text; at most {MAX_PROMPT_BYTES} are accepted (more cannot fit any context served here)"),
            )
        });
    }
    Ok(())
}

/// Runs CPU-heavy request work (template rendering, tokenizing, index calls) on the blocking
/// pool, at most a few jobs at a time, so the HTTP workers keep answering (`/health`
/// included) whatever one request costs.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        tokio::sync::Semaphore::new((cores * 4).max(8))
    });
    let _permit = permits.acquire().await.map_err(|_| ServiceError::internal("the blocking pool is closed"))?;
    tokio::task::spawn_blocking(f).await.map_err(|e| ServiceError::internal(format!("worker failed: {e}")))?
}
