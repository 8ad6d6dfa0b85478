//! Token usage of a request, as OpenAI reports it, built in one place: every operation that
//! reports usage also charges it to the caller's token budget here.

use crate::service::auth::Principal;
use serde::Serialize;

/// `{"prompt_tokens", "completion_tokens", "total_tokens"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// The usage of `prompt` and `completion` tokens, charged to `caller` (when known).
    pub fn charged(prompt: usize, completion: usize, caller: Option<&Principal>) -> Self {
        let total = prompt.saturating_add(completion);
        if let Some(p) = caller {
            p.charge_tokens(total);
        }
        Self { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total }
    }

    /// Usage that was charged elsewhere (or costs nothing: a RAG "don't know" answer).
    pub fn uncharged(prompt: usize, completion: usize) -> Self {
        Self::charged(prompt, completion, None)
    }

    pub fn json(self) -> serde_json::Value {
        serde_json::to_value(self).expect("usage serializes")
    }
}
