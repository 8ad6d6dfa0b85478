//! What a run evaluates: retrieval, RAG answers, a chat model (the judge) and an embedder,
//! each either in-process (the index, the RAG pipeline and the engine) or remote (a ragway
//! server, or any OpenAI-compatible endpoint for the judge and embeddings).
//!
//! The traits are blocking: runs call them from their own worker threads. The in-process
//! backends drive the async engine through a tokio runtime handle.

use anyhow::{anyhow, bail, Context, Result};
use ragway_engine::generate::{GenerateHandle, GenerationRequest};
use ragway_index::fusion::FusionParams;
use ragway_index::{ChunkEmbedder, Collection, SearchMode, SearchRequest};
use ragway_prompts::rag::{chat_ids, generate_text, sampling_from, Pipeline, RagRequest, TemplateSpec};
use ragway_prompts::Message;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// One ranked document.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub doc_id: String,
    pub score: f64,
}

/// How a retrieval run searches: the mode, and the fusion and depth when the run sets them
/// (otherwise the collection's and the index's defaults).
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchOptions {
    pub mode: SearchMode,
    pub fusion: Option<FusionParams>,
    pub candidates: Option<usize>,
}

pub trait Retriever: Send + Sync {
    /// The top documents (one entry per document), best first.
    fn search(&self, query: &str, top_k: usize) -> Result<Vec<Hit>>;
    fn describe(&self) -> Value;
}

/// A passage the answer was given.
#[derive(Debug, Clone, Serialize)]
pub struct Passage {
    pub doc_id: String,
    pub text: String,
    pub cited: bool,
}

/// A RAG answer, as the evaluation needs it.
#[derive(Debug, Clone, Serialize)]
pub struct RagOutput {
    pub answer: String,
    /// Retrieval found nothing relevant; nothing was generated.
    pub dont_know: bool,
    /// The answer says it does not know.
    pub abstained: bool,
    /// The passages offered to the model, in prompt order.
    pub contexts: Vec<Passage>,
    pub grounding_score: Option<f64>,
    pub flagged: Option<bool>,
    pub template: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub trait Answerer: Send + Sync {
    fn answer(&self, question: &str) -> Result<RagOutput>;
    fn describe(&self) -> Value;
}

/// A chat model: messages in, text out (greedy).
pub trait Chat: Send + Sync {
    fn complete(&self, messages: &[Message], max_tokens: usize) -> Result<String>;
    fn describe(&self) -> Value;
}

pub trait TextEmbedder: Send + Sync {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

// ---------------------------------------------------------------- in-process

pub struct LocalRetriever {
    pub collection: Arc<Collection>,
    pub options: SearchOptions,
}

impl Retriever for LocalRetriever {
    fn search(&self, query: &str, top_k: usize) -> Result<Vec<Hit>> {
        let req = SearchRequest {
            query: query.to_string(),
            top_k,
            mode: self.options.mode,
            fusion: self.options.fusion,
            candidates: self.options.candidates,
            group_by_document: true,
            // Evaluation queries are not live traffic.
            skip_drift: true,
            ..Default::default()
        };
        let res = self.collection.search(&req)?;
        Ok(res.results.into_iter().map(|h| Hit { doc_id: h.document_id, score: h.score as f64 }).collect())
    }

    fn describe(&self) -> Value {
        json!({"backend": "in-process", "collection": self.collection.name(), "mode": self.options.mode})
    }
}

/// The RAG pipeline and the generation engine of this process.
pub struct LocalAnswerer {
    pub pipeline: Pipeline,
    pub generator: GenerateHandle,
    pub runtime: tokio::runtime::Handle,
    pub collection: String,
    pub mode: SearchMode,
    pub top_k: usize,
    pub template: Option<String>,
}

impl Answerer for LocalAnswerer {
    fn answer(&self, question: &str) -> Result<RagOutput> {
        let req = RagRequest {
            collection: self.collection.clone(),
            question: question.to_string(),
            top_k: Some(self.top_k),
            mode: Some(self.mode),
            template: self.template.clone().map(TemplateSpec::Reference),
            ..Default::default()
        };
        let (prepared, generated) = self.runtime.block_on(async {
            let prepared = self.pipeline.prepare(&self.generator, req).await?;
            if prepared.dont_know.is_some() {
                return Ok::<_, anyhow::Error>((prepared, None));
            }
            let params = &prepared.parameters;
            let mut g = GenerationRequest::new(prepared.prompt.clone(), params.max_tokens.unwrap_or(256), sampling_from(params));
            g.stop = params.stop.clone();
            let out = generate_text(&self.generator, g).await?;
            Ok((prepared, Some(out)))
        })?;
        let text = generated.as_ref().map(|g| g.text.clone()).unwrap_or_default();
        let answer = self.pipeline.finish(&prepared, &text)?;
        let cited: Vec<usize> = answer.citations.iter().map(|p| p.index).collect();
        Ok(RagOutput {
            contexts: prepared
                .passages
                .iter()
                .map(|p| Passage { doc_id: p.document_id.clone(), text: p.text.clone(), cited: cited.contains(&p.index) })
                .collect(),
            abstained: answer.grounding.abstained,
            dont_know: answer.dont_know,
            grounding_score: Some(answer.grounding.score as f64),
            flagged: Some(answer.grounding.flagged),
            template: format!("{}@{}", answer.template.name, answer.template.version),
            prompt_tokens: generated.as_ref().map_or(0, |g| g.prompt_tokens),
            completion_tokens: generated.as_ref().map_or(0, |g| g.completion_tokens),
            answer: answer.answer,
        })
    }

    fn describe(&self) -> Value {
        json!({"backend": "in-process", "collection": self.collection, "mode": self.mode, "top_k": self.top_k,
               "template": self.template.clone().unwrap_or_else(|| self.pipeline.config.template.clone()),
               "model": self.generator.model_id()})
    }
}

/// The generation engine of this process as a chat model.
pub struct LocalChat {
    pub generator: GenerateHandle,
    pub runtime: tokio::runtime::Handle,
}

impl Chat for LocalChat {
    fn complete(&self, messages: &[Message], max_tokens: usize) -> Result<String> {
        let prompt = chat_ids(&self.generator, messages)?;
        let req = GenerationRequest::new(prompt, max_tokens, sampling_from(&Default::default()));
        Ok(self.runtime.block_on(generate_text(&self.generator, req))?.text)
    }

    fn describe(&self) -> Value {
        json!({"backend": "in-process", "model": self.generator.model_id()})
    }
}

pub struct LocalEmbedder(pub Arc<dyn ChunkEmbedder>);

impl TextEmbedder for LocalEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(self.0.embed_text_batch(texts)?)
    }
}

// ---------------------------------------------------------------- remote

/// An HTTP endpoint: a ragway server or any OpenAI-compatible one.
#[derive(Clone)]
pub struct Remote {
    /// Without a trailing `/` or `/v1`.
    pub base: String,
    pub api_key: Option<String>,
    client: reqwest::blocking::Client,
}

impl Remote {
    pub fn new(url: &str, api_key: Option<String>) -> Result<Self> {
        let mut base = url.trim_end_matches('/').to_string();
        if base.ends_with("/v1") {
            base.truncate(base.len() - 3);
        }
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("`{url}` is not an http(s) URL");
        }
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
        Ok(Self { base, api_key, client })
    }

    /// GETs JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.send(reqwest::Method::GET, path, None)
    }

    /// POSTs JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(reqwest::Method::POST, path, Some(body))
    }

    /// One JSON request; an error status becomes an error carrying the server's message.
    fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut req = self.client.request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().with_context(|| format!("{method} {}{path}", self.base))?;
        let status = resp.status();
        let v: Value = resp.json().unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            bail!("{method} {}{path}: {status}: {msg}", self.base);
        }
        Ok(v)
    }

    /// The served models split into (chat models, embedding models): `/v1/models` does not
    /// say which is which, so each is probed with a one-word embedding request.
    pub fn discover_models(&self) -> Result<(Vec<String>, Vec<String>)> {
        let v = self.get("/v1/models")?;
        let (mut chat, mut embed) = (Vec::new(), Vec::new());
        for m in v["data"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let Some(id) = m["id"].as_str() else { continue };
            if self.post("/v1/embeddings", &json!({"model": id, "input": ["probe"]})).is_ok() {
                embed.push(id.to_string());
            } else {
                chat.push(id.to_string());
            }
        }
        Ok((chat, embed))
    }

}

/// `POST /v1/collections/{name}/search` of a ragway server.
pub struct RemoteRetriever {
    pub remote: Remote,
    pub collection: String,
    pub options: SearchOptions,
}

impl Retriever for RemoteRetriever {
    fn search(&self, query: &str, top_k: usize) -> Result<Vec<Hit>> {
        let mut body = json!({"query": query, "top_k": top_k, "mode": self.options.mode, "group_by_document": true});
        if let Some(f) = &self.options.fusion {
            body["fusion"] = json!(f);
        }
        if let Some(c) = self.options.candidates {
            body["candidates"] = json!(c);
        }
        let v = self.remote.post(&format!("/v1/collections/{}/search", self.collection), &body)?;
        let results = v["results"].as_array().ok_or_else(|| anyhow!("search response without `results`"))?;
        results
            .iter()
            .map(|h| {
                Ok(Hit {
                    doc_id: h["document_id"].as_str().ok_or_else(|| anyhow!("hit without document_id"))?.to_string(),
                    score: h["score"].as_f64().unwrap_or(0.0),
                })
            })
            .collect()
    }

    fn describe(&self) -> Value {
        json!({"backend": self.remote.base, "collection": self.collection, "mode": self.options.mode})
    }
}

/// `POST /v1/rag` of a ragway server.
pub struct RemoteAnswerer {
    pub remote: Remote,
    pub collection: String,
    pub mode: SearchMode,
    pub top_k: usize,
    pub template: Option<String>,
    pub model: Option<String>,
}

impl Answerer for RemoteAnswerer {
    fn answer(&self, question: &str) -> Result<RagOutput> {
        let mut body = json!({"collection": self.collection, "query": question, "top_k": self.top_k, "mode": self.mode});
        if let Some(t) = &self.template {
            body["template"] = json!(t);
        }
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        let v = self.remote.post("/v1/rag", &body)?;
        let passages = |key: &str, cited: bool| -> Vec<(u64, Passage)> {
            v[key]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    let c = Passage {
                        doc_id: p["document_id"].as_str().unwrap_or_default().to_string(),
                        text: p["text"].as_str().unwrap_or_default().to_string(),
                        cited,
                    };
                    (p["index"].as_u64().unwrap_or(0), c)
                })
                .collect()
        };
        let mut contexts = passages("citations", true);
        contexts.extend(passages("uncited", false));
        contexts.sort_by_key(|(i, _)| *i);
        Ok(RagOutput {
            answer: v["answer"].as_str().unwrap_or_default().to_string(),
            dont_know: v["dont_know"].as_bool().unwrap_or(false),
            abstained: v["grounding"]["abstained"].as_bool().unwrap_or(false),
            contexts: contexts.into_iter().map(|(_, c)| c).collect(),
            grounding_score: v["grounding"]["score"].as_f64(),
            flagged: v["grounding"]["flagged"].as_bool(),
            template: format!("{}@{}", v["template"]["name"].as_str().unwrap_or_default(), v["template"]["version"]),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
        })
    }

    fn describe(&self) -> Value {
        json!({"backend": self.remote.base, "collection": self.collection, "mode": self.mode, "top_k": self.top_k, "template": self.template, "model": self.model})
    }
}

/// `POST /v1/chat/completions` of any OpenAI-compatible server.
pub struct RemoteChat {
    pub remote: Remote,
    pub model: String,
}

impl Chat for RemoteChat {
    fn complete(&self, messages: &[Message], max_tokens: usize) -> Result<String> {
        let msgs: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let v = self.remote.post(
            "/v1/chat/completions",
            &json!({"model": self.model, "messages": msgs, "temperature": 0.0, "max_tokens": max_tokens}),
        )?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("chat completion without choices[0].message.content"))
    }

    fn describe(&self) -> Value {
        json!({"backend": self.remote.base, "model": self.model})
    }
}

/// `POST /v1/embeddings` of any OpenAI-compatible server.
pub struct RemoteEmbedder {
    pub remote: Remote,
    pub model: String,
}

impl TextEmbedder for RemoteEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let v = self.remote.post("/v1/embeddings", &json!({"model": self.model, "input": texts}))?;
        let data = v["data"].as_array().ok_or_else(|| anyhow!("embeddings response without `data`"))?;
        let mut out = vec![Vec::new(); texts.len()];
        for d in data {
            let i = d["index"].as_u64().unwrap_or(0) as usize;
            let e = d["embedding"].as_array().ok_or_else(|| anyhow!("embedding is not a list"))?;
            if let Some(slot) = out.get_mut(i) {
                *slot = e.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect();
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- systems under test

/// How a run reaches the system it evaluates.
pub trait System: Send + Sync {
    /// A collection holding `corpus` (BEIR JSONL), ingested if need be; its name.
    fn collection_for(&self, corpus: &std::path::Path, progress: &crate::runner::Progress) -> Result<String>;
    fn retriever(&self, collection: &str, options: SearchOptions) -> Result<Arc<dyn Retriever>>;
    fn answerer(&self, collection: &str, mode: SearchMode, top_k: usize, template: Option<String>, model: Option<String>) -> Result<Arc<dyn Answerer>>;
    /// The judge's chat model (the generation model unless a judge endpoint is configured).
    fn chat(&self) -> Result<Arc<dyn Chat>>;
    fn embedder(&self) -> Result<Arc<dyn TextEmbedder>>;
    fn registry(&self) -> Arc<ragway_prompts::Registry>;
    fn describe(&self) -> Value;
}

/// The index, RAG pipeline and engine of this process.
pub struct InProcess {
    pub index: Arc<ragway_index::IndexService>,
    pub generator: Option<GenerateHandle>,
    pub registry: Arc<ragway_prompts::Registry>,
    pub rag: ragway_prompts::rag::RagConfig,
    pub runtime: tokio::runtime::Handle,
    /// Overrides the judge's chat model.
    pub judge: Option<Arc<dyn Chat>>,
}

impl InProcess {
    fn generator(&self) -> Result<GenerateHandle> {
        self.generator.clone().ok_or_else(|| anyhow!("no generation model is loaded"))
    }
}

impl System for InProcess {
    fn collection_for(&self, corpus: &std::path::Path, progress: &crate::runner::Progress) -> Result<String> {
        crate::runner::ensure_collection(&self.index, corpus, progress)
    }

    fn retriever(&self, collection: &str, options: SearchOptions) -> Result<Arc<dyn Retriever>> {
        Ok(Arc::new(LocalRetriever { collection: self.index.get(collection)?, options }))
    }

    fn answerer(&self, collection: &str, mode: SearchMode, top_k: usize, template: Option<String>, model: Option<String>) -> Result<Arc<dyn Answerer>> {
        let generator = self.generator()?;
        if let Some(m) = model.filter(|m| m != generator.model_id()) {
            bail!("model `{m}` is not loaded in this process (it serves `{}`); use --url for another server", generator.model_id());
        }
        self.index.get(collection)?;
        Ok(Arc::new(LocalAnswerer {
            pipeline: Pipeline::new(self.index.clone(), self.registry.clone(), self.rag.clone()),
            generator,
            runtime: self.runtime.clone(),
            collection: collection.to_string(),
            mode,
            top_k,
            template,
        }))
    }

    fn chat(&self) -> Result<Arc<dyn Chat>> {
        if let Some(j) = &self.judge {
            return Ok(j.clone());
        }
        Ok(Arc::new(LocalChat { generator: self.generator()?, runtime: self.runtime.clone() }))
    }

    fn embedder(&self) -> Result<Arc<dyn TextEmbedder>> {
        let model = self.index.default_embedder().ok_or_else(|| anyhow!("no embedding model"))?;
        Ok(Arc::new(LocalEmbedder(model)))
    }

    fn registry(&self) -> Arc<ragway_prompts::Registry> {
        self.registry.clone()
    }

    fn describe(&self) -> Value {
        json!({"backend": "in-process", "generation_model": self.generator.as_ref().map(|g| g.model_id().to_string()),
               "embedding_model": self.index.default_embedder().map(|e| e.model_id().to_string())})
    }
}

/// A ragway server over HTTP (the judge and embeddings through its OpenAI-compatible API
/// unless a judge endpoint is configured).
pub struct RemoteSystem {
    pub remote: Remote,
    pub registry: Arc<ragway_prompts::Registry>,
    pub judge: Option<Arc<dyn Chat>>,
    /// The model named in chat and embedding requests.
    pub model: Option<String>,
    pub embedding_model: Option<String>,
}

impl System for RemoteSystem {
    fn collection_for(&self, corpus: &std::path::Path, _: &crate::runner::Progress) -> Result<String> {
        bail!(
            "a remote run needs --collection: ingest {} into a collection on {} first (`ragway ingest` or POST /v1/collections/{{name}}/ingest)",
            corpus.display(),
            self.remote.base
        )
    }

    fn retriever(&self, collection: &str, options: SearchOptions) -> Result<Arc<dyn Retriever>> {
        Ok(Arc::new(RemoteRetriever { remote: self.remote.clone(), collection: collection.into(), options }))
    }

    fn answerer(&self, collection: &str, mode: SearchMode, top_k: usize, template: Option<String>, model: Option<String>) -> Result<Arc<dyn Answerer>> {
        Ok(Arc::new(RemoteAnswerer { remote: self.remote.clone(), collection: collection.into(), mode, top_k, template, model: model.or_else(|| self.model.clone()) }))
    }

    fn chat(&self) -> Result<Arc<dyn Chat>> {
        if let Some(j) = &self.judge {
            return Ok(j.clone());
        }
        Ok(Arc::new(RemoteChat { remote: self.remote.clone(), model: self.model.clone().unwrap_or_else(|| "default".into()) }))
    }

    fn embedder(&self) -> Result<Arc<dyn TextEmbedder>> {
        Ok(Arc::new(RemoteEmbedder { remote: self.remote.clone(), model: self.embedding_model.clone().unwrap_or_else(|| "default".into()) }))
    }

    fn registry(&self) -> Arc<ragway_prompts::Registry> {
        self.registry.clone()
    }

    fn describe(&self) -> Value {
        json!({"backend": self.remote.base, "model": self.model})
    }
}
