//! The retrieval-augmented generation pipeline:
//!
//! 1. **condense** — with chat history, the follow-up is rewritten into a standalone
//!    question by the `rag-condense-question` template and the generation model;
//! 2. **retrieve** — the collection's search (mode, `top_k`, filter); every hit gets a
//!    relevance, the cosine between the question's and the passage's embeddings;
//! 3. **rerank** (optional) — maximal marginal relevance over a wider candidate list;
//! 4. **pack** — passages best first into the token budget of the generation model (its
//!    tokenizer counts), duplicates dropped, the last one cut at a sentence boundary;
//! 5. **render** the template (`question`, `passages`) and apply the model's chat template;
//! 6. **generate** (the caller runs the engine, streaming or not);
//! 7. **cite and check** — `[n]` markers become citations, and every answer sentence is
//!    scored against the passages it cites ([`Grounding`]).
//!
//! When no passage reaches `min_relevance`, step 6 is skipped and the answer is the
//! template's `dont_know` text: nothing unsupported gets generated.

use crate::error::{PromptError, Result};
use crate::registry::{cosine, Arm, Registry, Resolved};
use crate::template::{Message, Parameters};
use ragway_engine::generate::{ChatMessage, FinishReason, GenEvent, GenerateHandle, GenerationRequest, SamplingParams};
use ragway_index::{ChunkEmbedder, Filter, IndexService, SearchHit, SearchMode, SearchRequest};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// Server-wide defaults; requests override them.
#[derive(Debug, Clone)]
pub struct RagConfig {
    /// Template used when a request names none.
    pub template: String,
    /// Template that condenses a follow-up with its history.
    pub condense_template: String,
    pub top_k: usize,
    /// Passages whose relevance (query–passage cosine) is below this are not offered to
    /// the model; with none left the answer is the template's "don't know".
    pub min_relevance: f32,
    /// Answers whose grounding score is below this are flagged.
    pub grounding_threshold: f32,
    /// Token budget of the packed passages (also capped by the model's context).
    pub context_tokens: usize,
}

impl Default for RagConfig {
    fn default() -> Self {
        Self {
            template: "rag-answer".into(),
            condense_template: "rag-condense-question".into(),
            top_k: 5,
            min_relevance: DEFAULT_MIN_RELEVANCE,
            grounding_threshold: DEFAULT_GROUNDING_THRESHOLD,
            context_tokens: 2048,
        }
    }
}

/// Calibrated on HaluEval QA (items 200–599 of dev): see `docs/benchmarks.md`.
pub const DEFAULT_MIN_RELEVANCE: f32 = 0.3;
/// Calibrated on HaluEval QA (right vs hallucinated answers): see `docs/benchmarks.md`.
pub const DEFAULT_GROUNDING_THRESHOLD: f32 = 0.7;

/// Which template version answers: a reference (`name`, `name@3`, `name:staging`) or a
/// traffic split between versions of one template.
#[derive(Debug, Clone)]
pub enum TemplateSpec {
    Reference(String),
    Split { name: String, arms: Vec<Arm> },
}

/// How retrieved candidates are re-ordered before packing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rerank {
    /// Maximal marginal relevance: `lambda`·relevance − (1−`lambda`)·max similarity to the
    /// passages already picked (LangChain's and Qdrant's MMR), over 3·`top_k` candidates.
    Mmr { lambda: f32 },
}

/// One RAG request.
#[derive(Debug, Clone, Default)]
pub struct RagRequest {
    pub collection: String,
    pub question: String,
    /// Earlier turns (user/assistant); non-empty turns on condensing.
    pub history: Vec<ChatMessage>,
    pub top_k: Option<usize>,
    pub mode: Option<SearchMode>,
    pub filter: Option<Filter>,
    pub template: Option<TemplateSpec>,
    /// Deterministic key for a split (a user id or seed); `None`: a random draw.
    pub routing_key: Option<u64>,
    /// More variables for templates that declare them.
    pub variables: Map<String, Value>,
    pub min_relevance: Option<f32>,
    pub grounding_threshold: Option<f32>,
    pub context_tokens: Option<usize>,
    /// Completion tokens reserved in the context (default: the template's `max_tokens`).
    pub max_tokens: Option<usize>,
    pub rerank: Option<Rerank>,
    /// Condense with the history (default: true when there is history).
    pub condense: Option<bool>,
}

/// A passage offered to the model; with `index` it is what `[index]` cites.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Passage {
    pub index: usize,
    pub chunk_id: String,
    pub document_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The text the model saw (possibly cut at a sentence boundary).
    pub text: String,
    /// The retrieval score (fused for hybrid search).
    pub score: f32,
    /// Cosine between the question's and the passage's embeddings.
    pub relevance: f32,
    /// Character offsets of the chunk in its document.
    pub char_start: u32,
    pub char_end: u32,
    /// True when packing cut the passage short.
    pub truncated: bool,
    pub metadata: Value,
}

/// The template version that answered.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateUsed {
    pub name: String,
    pub version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl From<&Resolved> for TemplateUsed {
    fn from(r: &Resolved) -> Self {
        Self { name: r.name().to_string(), version: r.number(), label: r.label.clone() }
    }
}

/// Everything up to generation.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub collection: String,
    pub template: TemplateUsed,
    /// The template's generation parameters (request fields override them).
    pub parameters: Parameters,
    /// The question that was searched and answered (condensed when there was history).
    pub question: String,
    pub condensed: bool,
    pub passages: Vec<Passage>,
    /// Document ids of every retrieved hit, best first (before the relevance cut).
    pub retrieved: Vec<String>,
    pub messages: Vec<Message>,
    /// The prompt token ids; empty when the answer is `dont_know`.
    pub prompt: Vec<u32>,
    /// Set when retrieval found nothing relevant: the answer, without generating.
    pub dont_know: Option<String>,
    /// The template's "don't know" text (recognizes abstaining answers).
    pub dont_know_text: Option<String>,
    /// Tokens spent condensing (prompt, completion).
    pub condense_tokens: (usize, usize),
    pub grounding_threshold: f32,
}

/// Support of one answer sentence.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SentenceSupport {
    pub text: String,
    /// 0.5·lexical + 0.5·semantic.
    pub score: f32,
    /// Share of the sentence's content words (those not already in the question) found in
    /// the passages it is checked against; 1 when it adds none.
    pub lexical: f32,
    /// Highest cosine between the sentence and a sentence of those passages (≥ 0).
    pub semantic: f32,
    /// The passages it was checked against: its own citations, else the answer's, else all.
    pub passages: Vec<usize>,
    /// The passage holding the sentence's closest match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_passage: Option<usize>,
    pub supported: bool,
}

/// The grounding check of one answer.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Grounding {
    /// Mean sentence score, in [0, 1]; 1 for an abstention.
    pub score: f32,
    /// `score < threshold`.
    pub flagged: bool,
    pub threshold: f32,
    /// The answer says it does not know (nothing to check).
    pub abstained: bool,
    pub sentences: Vec<SentenceSupport>,
}

/// A finished answer.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RagAnswer {
    pub answer: String,
    /// Passages the answer cites, in citation order of first appearance.
    pub citations: Vec<Passage>,
    /// Passages offered but not cited.
    pub uncited: Vec<Passage>,
    /// True when the answer had no valid `[n]` marker and the citations were inferred: each
    /// supported sentence cites the passage holding its closest match (small models often
    /// leave the markers out).
    pub citations_inferred: bool,
    /// `[n]` markers that name no offered passage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_citations: Vec<usize>,
    pub grounding: Grounding,
    pub template: TemplateUsed,
    pub question: String,
    pub condensed: bool,
    /// Answered with the "don't know" path (nothing relevant retrieved).
    pub dont_know: bool,
}


/// The collection's embedding model: retrieval-augmented answers embed the question and
/// the passages, so a collection without one cannot serve them.
fn needs_model(c: &ragway_index::Collection) -> Result<Arc<dyn ragway_index::ChunkEmbedder>> {
    c.embedder().cloned().ok_or_else(|| {
        PromptError::invalid(
            "collection",
            format!("collection `{}` has no embedding model; answers need one to embed the question", c.name()),
        )
    })
}

/// The pipeline over the index and the template registry.
pub struct Pipeline {
    pub index: Arc<IndexService>,
    pub registry: Arc<Registry>,
    pub config: RagConfig,
}

const GENERIC_DONT_KNOW: &str = "I don't know: the provided documents do not contain the answer.";

impl Pipeline {
    pub fn new(index: Arc<IndexService>, registry: Arc<Registry>, config: RagConfig) -> Self {
        Self { index, registry, config }
    }

    fn resolve(&self, spec: Option<&TemplateSpec>, key: Option<u64>) -> Result<Resolved> {
        match spec {
            None => self.registry.resolve(&self.config.template),
            Some(TemplateSpec::Reference(r)) if r.is_empty() => self.registry.resolve(&self.config.template),
            Some(TemplateSpec::Reference(r)) => self.registry.resolve(r),
            Some(TemplateSpec::Split { name, arms }) => {
                let u = match key {
                    Some(k) => crate::registry::uniform_from_key(k),
                    None => crate::registry::uniform_from_key(ragway_engine::generate::sampling::random_seed()),
                };
                self.registry.choose(name, arms, u)
            }
        }
    }

    /// Condenses, retrieves, packs and renders; the prompt is ready for the engine.
    pub async fn prepare(&self, gen: &GenerateHandle, req: RagRequest) -> Result<Prepared> {
        let resolved = self.resolve(req.template.as_ref(), req.routing_key)?;
        let t = &resolved.version.template;
        for var in ["question", "passages"] {
            if !t.header.variables.contains_key(var) {
                return Err(PromptError::invalid(
                    "template",
                    format!("template `{}` cannot answer with retrieval: it declares no `{var}` variable", t.name()),
                ));
            }
        }
        if req.collection.is_empty() {
            return Err(PromptError::invalid("collection", "collection is required"));
        }
        let question = req.question.trim().to_string();
        if question.is_empty() {
            return Err(PromptError::invalid("query", "the question is empty"));
        }
        let top_k = req.top_k.unwrap_or(self.config.top_k);
        if top_k == 0 || top_k > 50 {
            return Err(PromptError::invalid("top_k", format!("top_k must be between 1 and 50, got {top_k}")));
        }
        let min_relevance = req.min_relevance.unwrap_or(self.config.min_relevance);
        let threshold = req.grounding_threshold.unwrap_or(self.config.grounding_threshold);
        for (p, v) in [("min_relevance", min_relevance), ("grounding_threshold", threshold)] {
            if !(-1.0..=1.0).contains(&v) {
                return Err(PromptError::invalid(p, format!("{p} must be between -1 and 1")));
            }
        }
        if let Some(Rerank::Mmr { lambda }) = req.rerank {
            if !(0.0..=1.0).contains(&lambda) {
                return Err(PromptError::invalid("rerank.lambda", "lambda must be between 0 and 1"));
            }
        }
        let collection = self.index.get(&req.collection)?;

        // 1. Condense.
        let mut condense_tokens = (0, 0);
        let condense = req.condense.unwrap_or(true) && !req.history.is_empty();
        let question = if condense {
            let (q, p, c) = self.condense(gen, &req.history, &question).await?;
            condense_tokens = (p, c);
            q
        } else {
            question
        };

        // 2–3. Retrieve (and rerank) off the async workers: embedding and search block.
        let (mode, filter, rerank) = (req.mode.unwrap_or_default(), req.filter.clone(), req.rerank);
        let q = question.clone();
        let hits = tokio::task::spawn_blocking(move || -> Result<Vec<(SearchHit, f32)>> {
            let embedder = needs_model(&collection)?;
            let qv = embedder.embed_query(&q)?;
            let wanted = if rerank.is_some() { (3 * top_k).min(150) } else { top_k };
            let resp = collection.search(&SearchRequest {
                query: q,
                top_k: wanted,
                mode,
                filter,
                vector: Some(qv.clone()),
                ..Default::default()
            })?;
            let hits = resp.results;
            let vecs = embedder.embed_text_batch(&hits.iter().map(|h| h.text.clone()).collect::<Vec<_>>())?;
            let mut scored: Vec<(SearchHit, f32, Vec<f32>)> =
                hits.into_iter().zip(vecs).map(|(h, v): (SearchHit, Vec<f32>)| { let r = cosine(&qv, &v); (h, r, v) }).collect();
            if let Some(Rerank::Mmr { lambda }) = rerank {
                scored = mmr(scored, top_k, lambda);
            }
            Ok(scored.into_iter().take(top_k).map(|(h, r, _)| (h, r)).collect())
        })
        .await
        .map_err(|e| PromptError::Io(format!("retrieval task: {e}")))??;
        let retrieved: Vec<String> = hits.iter().map(|(h, _)| h.document_id.clone()).collect();
        let relevant: Vec<(SearchHit, f32)> = hits.into_iter().filter(|(_, r)| *r >= min_relevance).collect();
        let mut prepared = Prepared {
            collection: req.collection.clone(),
            template: TemplateUsed::from(&resolved),
            parameters: t.header.parameters.clone(),
            question: question.clone(),
            condensed: condense,
            passages: Vec::new(),
            retrieved,
            messages: Vec::new(),
            prompt: Vec::new(),
            dont_know: None,
            dont_know_text: t.header.dont_know.clone(),
            condense_tokens,
            grounding_threshold: threshold,
        };
        if relevant.is_empty() {
            let text = prepared.dont_know_text.clone().unwrap_or_else(|| GENERIC_DONT_KNOW.to_string());
            prepared.dont_know = Some(text);
            return Ok(prepared);
        }

        // 4. Pack: the budget is what the rendered template leaves of the context.
        let max_tokens = req.max_tokens.or(t.header.parameters.max_tokens).unwrap_or(256);
        let mut vars = req.variables.clone();
        vars.insert("question".into(), Value::String(question));
        vars.insert("passages".into(), Value::Array(Vec::new()));
        let count = |s: &str| gen.tokenizer().encode(s, false).map(|ids| ids.len()).map_err(PromptError::from);
        let empty = self.prompt_ids(gen, &resolved, &vars)?;
        let room = gen.context_length().saturating_sub(empty.len() + max_tokens + 8);
        let budget = req.context_tokens.unwrap_or(self.config.context_tokens).min(room);
        let passages = pack(relevant, budget, &count)?;
        if passages.is_empty() {
            return Err(PromptError::invalid(
                "context_tokens",
                format!("no passage fits the context budget of {budget} tokens"),
            ));
        }

        // 5. Render.
        let items: Vec<Value> = passages
            .iter()
            .map(|p| json!({"index": p.index, "title": p.title, "text": p.text, "document_id": p.document_id}))
            .collect();
        vars.insert("passages".into(), Value::Array(items));
        prepared.messages = self.render_messages(&resolved, &vars)?;
        prepared.prompt = chat_ids(gen, &prepared.messages)?;
        prepared.passages = passages;
        Ok(prepared)
    }

    fn render_messages(&self, r: &Resolved, vars: &Map<String, Value>) -> Result<Vec<Message>> {
        Ok(self.registry.render(r, vars, None, None, None)?.into_messages())
    }

    fn prompt_ids(&self, gen: &GenerateHandle, r: &Resolved, vars: &Map<String, Value>) -> Result<Vec<u32>> {
        chat_ids(gen, &self.render_messages(r, vars)?)
    }

    /// Rewrites `question` into a standalone one; returns it with the tokens spent.
    pub async fn condense(
        &self,
        gen: &GenerateHandle,
        history: &[ChatMessage],
        question: &str,
    ) -> Result<(String, usize, usize)> {
        let r = self.registry.resolve(&self.config.condense_template)?;
        let mut vars = Map::new();
        vars.insert(
            "history".into(),
            Value::Array(history.iter().map(|m| json!({"role": m.role, "content": m.content})).collect()),
        );
        vars.insert("question".into(), Value::String(question.to_string()));
        let prompt = self.prompt_ids(gen, &r, &vars)?;
        let params = &r.version.template.header.parameters;
        let mut req = GenerationRequest::new(prompt, params.max_tokens.unwrap_or(64), sampling_from(params));
        req.stop = params.stop.clone();
        let Generated { text, prompt_tokens: p, completion_tokens: c, .. } = generate_text(gen, req).await?;
        let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
        let line = line.trim_start_matches("Standalone question:").trim().trim_matches('"').trim();
        Ok((if line.is_empty() { question.to_string() } else { line.to_string() }, p, c))
    }

    /// Cites and checks a finished answer (embeds: call off the async workers).
    pub fn finish(&self, prepared: &Prepared, answer: &str) -> Result<RagAnswer> {
        self.finish_with(prepared, answer, &[])
    }

    /// [`finish`](Self::finish) for an answer that lists its citations apart from its text
    /// (a structured answer's `citations` array): they count as if written as `[n]` markers.
    pub fn finish_with(&self, prepared: &Prepared, answer: &str, listed: &[usize]) -> Result<RagAnswer> {
        let answer = answer.trim().to_string();
        if let Some(dk) = &prepared.dont_know {
            return Ok(RagAnswer {
                answer: if answer.is_empty() { dk.clone() } else { answer },
                citations: Vec::new(),
                uncited: Vec::new(),
                invalid_citations: Vec::new(),
                citations_inferred: false,
                grounding: abstained(prepared.grounding_threshold),
                template: prepared.template.clone(),
                question: prepared.question.clone(),
                condensed: prepared.condensed,
                dont_know: true,
            });
        }
        let n = prepared.passages.len();
        let mut markers = citations(&answer);
        markers.extend_from_slice(listed);
        let mut cited: Vec<usize> = Vec::new();
        let mut invalid = Vec::new();
        for &m in &markers {
            if (1..=n).contains(&m) {
                if !cited.contains(&m) {
                    cited.push(m);
                }
            } else if !invalid.contains(&m) {
                invalid.push(m);
            }
        }
        let grounding = if is_abstention(&answer, prepared.dont_know_text.as_deref()) {
            abstained(prepared.grounding_threshold)
        } else {
            let embedder = needs_model(&*self.index.get(&prepared.collection)?)?;
            check_grounding(embedder.as_ref(), &prepared.question, &answer, &prepared.passages, &cited, prepared.grounding_threshold)?
        };
        let by_index = |i: usize| prepared.passages.iter().find(|p| p.index == i).cloned();
        let inferred = cited.is_empty() && !grounding.abstained;
        if inferred {
            for s in grounding.sentences.iter().filter(|s| s.supported) {
                if let Some(b) = s.best_passage {
                    if !cited.contains(&b) {
                        cited.push(b);
                    }
                }
            }
        }
        Ok(RagAnswer {
            citations_inferred: inferred && !cited.is_empty(),
            citations: cited.iter().filter_map(|&i| by_index(i)).collect(),
            uncited: prepared.passages.iter().filter(|p| !cited.contains(&p.index)).cloned().collect(),
            invalid_citations: invalid,
            answer,
            grounding,
            template: prepared.template.clone(),
            question: prepared.question.clone(),
            condensed: prepared.condensed,
            dont_know: false,
        })
    }
}

fn abstained(threshold: f32) -> Grounding {
    Grounding { score: 1.0, flagged: false, threshold, abstained: true, sentences: Vec::new() }
}

/// Generation settings from a template's parameters (greedy unless it says otherwise).
pub fn sampling_from(p: &Parameters) -> SamplingParams {
    let mut s = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    if let Some(t) = p.temperature {
        s.temperature = t;
    }
    if let Some(v) = p.top_p {
        s.top_p = v;
    }
    if let Some(v) = p.top_k {
        s.top_k = v;
    }
    if let Some(v) = p.min_p {
        s.min_p = v;
    }
    if let Some(v) = p.repetition_penalty {
        s.repetition_penalty = v;
    }
    s
}

/// Messages through the model's chat template (the prompt text).
pub fn chat_text(gen: &GenerateHandle, messages: &[Message]) -> Result<String> {
    let chat: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(m.role.clone(), m.content.clone())).collect();
    let ct = gen.chat_template().ok_or_else(|| {
        PromptError::invalid("model", "the generation model has no chat template; RAG needs one")
    })?;
    Ok(ct.render(&chat, true)?)
}

/// Messages through the model's chat template, tokenized.
pub fn chat_ids(gen: &GenerateHandle, messages: &[Message]) -> Result<Vec<u32>> {
    Ok(gen.tokenizer().encode(&chat_text(gen, messages)?, false)?)
}

/// One engine request run to the end.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Runs one request to the end, gathering its text.
pub async fn generate_text(gen: &GenerateHandle, req: GenerationRequest) -> Result<Generated> {
    let mut stream = gen.submit(req)?;
    let mut text = String::new();
    while let Some(ev) = stream.next().await {
        match ev {
            GenEvent::Token { text: t, .. } | GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Done { finish_reason, prompt_tokens, completion_tokens, .. } => {
                return Ok(Generated { text, finish_reason, prompt_tokens, completion_tokens })
            }
            GenEvent::Error { message } => return Err(PromptError::Io(format!("generation failed: {message}"))),
        }
    }
    Err(PromptError::Io("generation ended without finishing".into()))
}

fn mmr(mut pool: Vec<(SearchHit, f32, Vec<f32>)>, k: usize, lambda: f32) -> Vec<(SearchHit, f32, Vec<f32>)> {
    let mut picked: Vec<(SearchHit, f32, Vec<f32>)> = Vec::new();
    while picked.len() < k && !pool.is_empty() {
        let best = pool
            .iter()
            .enumerate()
            .map(|(i, (_, rel, v))| {
                let redundancy = picked.iter().map(|(_, _, p)| cosine(v, p)).reduce(f32::max).unwrap_or(0.0);
                (i, lambda * rel - (1.0 - lambda) * redundancy)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
            .expect("pool is not empty");
        picked.push(pool.remove(best));
    }
    picked
}

/// Lowercased, whitespace-collapsed text (for deduplication).
fn normalized(s: &str) -> String {
    s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// Passages in rank order into `budget` tokens: duplicates (same text, or contained in a
/// passage already taken) are dropped; a passage that does not fit whole is cut at the
/// last sentence end that fits, or skipped when not even its first sentence does.
pub fn pack(
    hits: Vec<(SearchHit, f32)>,
    budget: usize,
    count: &dyn Fn(&str) -> Result<usize>,
) -> Result<Vec<Passage>> {
    let mut out: Vec<Passage> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut used = 0usize;
    for (h, relevance) in hits {
        let norm = normalized(&h.text);
        if norm.is_empty() || seen.iter().any(|s| s.contains(&norm) || norm.contains(s.as_str())) {
            continue;
        }
        // "[n] Title: " and the line break around it.
        let overhead = 4 + h.title.as_deref().map(count).transpose()?.unwrap_or(0);
        let left = budget.saturating_sub(used + overhead);
        let whole = count(&h.text)?;
        let (text, cost, truncated) = if whole <= left {
            (h.text.clone(), whole, false)
        } else {
            let ends = sentence_ends(&h.text);
            let mut fit = None;
            for &e in ends.iter().rev() {
                let c = count(&h.text[..e])?;
                if c <= left {
                    fit = Some((h.text[..e].trim_end().to_string(), c));
                    break;
                }
            }
            match fit {
                Some((t, c)) if !t.is_empty() => (t, c, true),
                _ => continue,
            }
        };
        used += cost + overhead;
        seen.push(norm);
        out.push(Passage {
            index: out.len() + 1,
            chunk_id: h.chunk_id,
            document_id: h.document_id,
            title: h.title,
            text,
            score: h.score,
            relevance,
            char_start: h.char_start,
            char_end: h.char_end,
            truncated,
            metadata: h.metadata,
        });
    }
    Ok(out)
}

/// Byte offsets just past each sentence end (`.`, `!`, `?` followed by space or the end;
/// line breaks), excluding the text's end when it has no terminator.
pub fn sentence_ends(s: &str) -> Vec<usize> {
    let b = s.as_bytes();
    let mut ends = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        let next = b.get(i + 1).copied();
        let end = match c {
            b'.' | b'!' | b'?' => next.is_none_or(|n| n.is_ascii_whitespace() || n == b'"' || n == b')'),
            b'\n' => true,
            _ => false,
        };
        if end {
            // Keep a closing quote or bracket with its sentence.
            let mut e = i + 1;
            while matches!(b.get(e), Some(b'"') | Some(b')')) {
                e += 1;
            }
            if ends.last() != Some(&e) {
                ends.push(e);
            }
        }
    }
    ends
}

/// Sentences of `s`, trimmed, empty ones dropped.
pub fn sentences(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut ends = sentence_ends(s);
    if ends.last() != Some(&s.len()) {
        ends.push(s.len());
    }
    for e in ends {
        if e <= start {
            continue;
        }
        let t = s[start..e].trim();
        if !t.is_empty() {
            out.push(t.to_string());
        }
        start = e;
    }
    out
}

/// The passage numbers cited in `text`: `[1]`, `[1, 3]`, `[1][2]`, `[2-4]`, in order of
/// appearance (repeats kept).
pub fn citations(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inner = &after[..close];
        if !inner.is_empty() && inner.chars().all(|c| c.is_ascii_digit() || matches!(c, ',' | ' ' | '-' | ';')) {
            for part in inner.split([',', ';']) {
                let part = part.trim();
                if let Some((a, b)) = part.split_once('-') {
                    if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                        if a <= b && b - a < 50 {
                            out.extend(a..=b);
                        }
                    }
                } else if let Ok(n) = part.parse::<usize>() {
                    out.push(n);
                }
            }
        }
        rest = &after[close..];
    }
    out
}

/// `text` without its citation markers, tidied: whitespace collapsed, no space before `.`/`,`.
fn strip_citations(text: &str) -> String {
    remove_citation_markers(text).split_whitespace().collect::<Vec<_>>().join(" ").replace(" .", ".").replace(" ,", ",")
}

/// `text` with every marker [`citations`] recognizes removed, and nothing else changed.
pub fn remove_citation_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if !citations(&rest[open..open + close + 2]).is_empty() => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether an answer abstains (says it does not know).
pub fn is_abstention(answer: &str, dont_know: Option<&str>) -> bool {
    let a = normalized(&strip_citations(answer)).replace('’', "'");
    if let Some(dk) = dont_know {
        let dk = normalized(dk).replace('’', "'");
        if !dk.is_empty() && a.starts_with(&dk) {
            return true;
        }
    }
    ["i don't know", "i do not know", "the provided documents do not contain", "the passages do not contain"]
        .iter()
        .any(|p| a.starts_with(p))
}

const STOPWORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do",
    "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he",
    "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than",
    "that", "the", "their", "theirs", "them", "then", "there", "these", "they", "this", "those", "through", "to",
    "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who",
    "whom", "why", "will", "with", "would", "you", "your", "yours", "according", "passage", "passages", "context",
    "answer", "based", "provided", "yes",
];

/// Content words of `s`: lowercase alphanumeric runs minus stopwords, with a plural `s`
/// dropped (`films` matches `film`).
pub fn content_words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()) && (w.chars().count() > 1 || w.chars().all(|c| c.is_ascii_digit())))
        .map(|w| if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") { w[..w.len() - 1].to_string() } else { w })
        .collect()
}

/// Scores every sentence of `answer` against the passages it cites (see [`SentenceSupport`]).
pub fn check_grounding(
    embedder: &dyn ChunkEmbedder,
    question: &str,
    answer: &str,
    passages: &[Passage],
    answer_citations: &[usize],
    threshold: f32,
) -> Result<Grounding> {
    let question_words: HashSet<String> = content_words(question).into_iter().collect();
    // Sentences of the answer with their own citations.
    let mut items: Vec<(String, Vec<usize>)> = Vec::new();
    for s in sentences(answer) {
        let own: Vec<usize> = citations(&s).into_iter().filter(|i| (1..=passages.len()).contains(i)).collect();
        let text = strip_citations(&s);
        if text.chars().any(char::is_alphanumeric) {
            items.push((text, own));
        } else if let Some(last) = items.last_mut() {
            // A marker standing alone after a sentence belongs to it.
            last.1.extend(own);
        }
    }
    if items.is_empty() {
        return Ok(Grounding { score: 0.0, flagged: true, threshold, abstained: false, sentences: Vec::new() });
    }
    // Passage sentences, embedded once.
    let mut psent: Vec<(usize, String)> = Vec::new();
    for p in passages {
        for s in sentences(&p.text) {
            psent.push((p.index, s));
        }
    }
    let mut texts: Vec<String> = psent.iter().map(|(_, s)| s.clone()).collect();
    for (s, _) in &items {
        // A short answer ("Philadelphia") is a claim about the question: embed them together.
        let t = if content_words(s).len() < 3 { format!("{question} {s}") } else { s.clone() };
        texts.push(t);
    }
    let vecs = embedder.embed_text_batch(&texts)?;
    let (pvecs, svecs) = vecs.split_at(psent.len());
    let all: Vec<usize> = passages.iter().map(|p| p.index).collect();
    let mut out = Vec::new();
    for ((text, own), sv) in items.into_iter().zip(svecs) {
        let against: Vec<usize> = if !own.is_empty() {
            own
        } else if !answer_citations.is_empty() {
            answer_citations.to_vec()
        } else {
            all.clone()
        };
        let words: HashSet<String> = passages
            .iter()
            .filter(|p| against.contains(&p.index))
            .flat_map(|p| content_words(&format!("{} {}", p.title.as_deref().unwrap_or_default(), p.text)))
            .collect();
        let novel: Vec<String> = content_words(&text).into_iter().filter(|w| !question_words.contains(w)).collect();
        let lexical = if novel.is_empty() {
            1.0
        } else {
            novel.iter().filter(|w| words.contains(*w)).count() as f32 / novel.len() as f32
        };
        let (semantic, best_passage) = psent
            .iter()
            .zip(pvecs)
            .filter(|((i, _), _)| against.contains(i))
            .map(|((i, _), v)| (cosine(sv, v), Some(*i)))
            .fold((0.0f32, None), |a, b| if b.0 > a.0 { b } else { a });
        let score = 0.5 * lexical + 0.5 * semantic;
        out.push(SentenceSupport {
            text,
            score,
            lexical,
            semantic,
            passages: against,
            best_passage,
            supported: score >= threshold,
        });
    }
    let score = out.iter().map(|s| s.score).sum::<f32>() / out.len() as f32;
    Ok(Grounding { score, flagged: score < threshold, threshold, abstained: false, sentences: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str, text: &str) -> SearchHit {
        SearchHit {
            chunk_id: format!("{id}#0"),
            document_id: id.into(),
            chunk_index: 0,
            text: text.into(),
            title: None,
            score: 1.0,
            metadata: Value::Null,
            char_start: 0,
            char_end: text.len() as u32,
            dense: None,
            keyword: None,
        }
    }

    #[test]
    fn citation_markers() {
        assert_eq!(citations("A [1]. B [2, 3] and [4][5]; C [6-8]."), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(citations("see [note] and [x1] and [] and [2"), Vec::<usize>::new());
        assert_eq!(strip_citations("Paris is the capital [1]. It is big [2, 3]."), "Paris is the capital. It is big.");
        assert_eq!(strip_citations("an [array] stays"), "an [array] stays");
    }

    #[test]
    fn sentence_splitting() {
        assert_eq!(sentences("One. Two? Three!\nFour"), ["One.", "Two?", "Three!", "Four"]);
        assert_eq!(sentences("Pi is 3.14 exactly. \"Quoted.\" Next"), ["Pi is 3.14 exactly.", "\"Quoted.\"", "Next"]);
        assert_eq!(sentence_ends("No end"), Vec::<usize>::new());
    }

    #[test]
    fn content_words_drop_stopwords_and_plurals() {
        // Crude on purpose: both sides get the same treatment (`paris` → `pari` too).
        assert_eq!(content_words("The films of 1989 were shown in Paris's cinemas"), ["film", "1989", "shown", "pari", "cinema"]);
        assert_eq!(content_words("class glass"), ["class", "glass"]);
    }

    #[test]
    fn packing_dedupes_and_cuts_at_sentence_ends() {
        let words = |s: &str| -> Result<usize> { Ok(s.split_whitespace().count()) };
        let hits = vec![
            (hit("a", "Alpha one two three. Alpha four five six."), 0.9),
            (hit("b", "alpha one   two three. ALPHA four five six."), 0.8), // same text, other case/spacing
            (hit("c", "Gamma one two. Gamma three four five six seven. Gamma eight."), 0.7),
            (hit("d", "Delta is a long sentence that never fits anywhere at all."), 0.6),
        ];
        // 8 words for a + 4 overhead = 12; c gets 20 - 12 - 4 = 4 words: its first sentence (3).
        let p = pack(hits, 20, &words).unwrap();
        assert_eq!(p.iter().map(|p| p.document_id.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(p[1].text, "Gamma one two.");
        assert!(p[1].truncated && !p[0].truncated);
        assert_eq!(p.iter().map(|p| p.index).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn abstentions_are_recognized() {
        let dk = Some("I don't know: the provided documents do not contain the answer.");
        assert!(is_abstention("I don't know: the provided documents do not contain the answer.", dk));
        assert!(is_abstention("I do not know.", dk));
        assert!(!is_abstention("Paris [1].", dk));
    }
}
