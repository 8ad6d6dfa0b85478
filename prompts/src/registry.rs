//! The registry: every version of every template, the labels pointing at them, and the
//! few-shot example sets.
//!
//! Sources, in load order: the defaults built into the binary, the `*.prompt` files under
//! the configured prompt directories (with example sets in `fewshot/<set>.jsonl`), and the
//! store under the data directory, where versions and label moves made through the API
//! are written (one file per version, fsynced and renamed into place before the call
//! returns). Versions are immutable: the same name and version with other content is
//! refused. A label is moved by pointing it at another version, which is also how a
//! release is rolled back; `latest` always means the highest version.

use crate::error::{PromptError, Result};
use crate::template::{check_name, Example, FewShotMode, Rendered, Template, MAX_SOURCE_BYTES};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The templates shipped with ragway (`prompts/templates/`).
pub const BUILTIN: &[(&str, &str)] = &[
    ("rag-answer", include_str!("../templates/rag-answer.prompt")),
    ("rag-condense-question", include_str!("../templates/rag-condense-question.prompt")),
    ("summarize", include_str!("../templates/summarize.prompt")),
    ("classify", include_str!("../templates/classify.prompt")),
    ("hallucination-judge", include_str!("../templates/hallucination-judge.prompt")),
];

/// Embeds texts (for few-shot selection by similarity).
pub type EmbedFn<'a> = dyn Fn(&[String]) -> Result<Vec<Vec<f32>>> + 'a;

/// The label a bare name resolves to when it exists (else `latest`).
pub const DEFAULT_LABEL: &str = "production";

/// Where a version came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "kind", content = "path")]
pub enum Origin {
    Builtin,
    File(String),
    Store,
}

/// One stored version.
#[derive(Debug)]
pub struct Version {
    pub template: Template,
    pub origin: Origin,
}

#[derive(Debug, Default)]
struct Entry {
    versions: BTreeMap<u32, Arc<Version>>,
    labels: BTreeMap<String, u32>,
}

impl Entry {
    fn latest(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }
}

#[derive(Debug, Default)]
struct Inner {
    templates: BTreeMap<String, Entry>,
    sets: BTreeMap<String, Vec<Example>>,
}

/// A version picked by a reference (`name`, `name@3`, `name:staging`) or a split.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub version: Arc<Version>,
    /// The label the reference went through, if any.
    pub label: Option<String>,
}

impl Resolved {
    pub fn name(&self) -> &str {
        self.version.template.name()
    }

    pub fn number(&self) -> u32 {
        self.version.template.version()
    }
}

/// A template's listing entry.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Summary {
    pub name: String,
    pub description: String,
    pub kind: crate::template::TemplateKind,
    pub latest: u32,
    pub versions: Vec<u32>,
    pub labels: BTreeMap<String, u32>,
}

/// One version in full.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionView {
    pub version: u32,
    #[serde(flatten)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub header: crate::template::Header,
    pub template: String,
    pub source: String,
    pub origin: Origin,
}

/// A template with all its versions and labels.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Detail {
    pub name: String,
    pub latest: u32,
    pub labels: BTreeMap<String, u32>,
    pub versions: Vec<VersionView>,
}

/// One arm of an A/B split: a label or `@version`, and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    pub target: String,
    pub weight: f64,
}

pub struct Registry {
    store: Option<PathBuf>,
    inner: RwLock<Inner>,
    /// Stored files that could not be loaded, with the reason.
    skipped: std::sync::Mutex<Vec<String>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PromptError {
    PromptError::Io(format!("{}: {e}", path.display()))
}

/// Writes a file so that it is either wholly there or not at all after a crash.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("store paths have a parent");
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
    Ok(())
}

fn prompt_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> =
        fs::read_dir(dir).map_err(|e| io_err(dir, e))?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "fewshot") {
                prompt_files(&p, out)?;
            }
        } else if p.extension().is_some_and(|e| e == "prompt") {
            out.push(p);
        }
    }
    Ok(())
}

fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(line).map_err(|e| {
            PromptError::at_line("fewshot", i + 1, format!("{} line {}: {e} (want {{\"input\", \"output\"}})", path.display(), i + 1))
        })?;
        out.push(ex);
    }
    Ok(out)
}

impl Registry {
    /// Loads the built-in templates, then `dirs` (read-only), then the store (writable).
    pub fn open(dirs: &[PathBuf], store: Option<PathBuf>) -> Result<Registry> {
        let reg = Registry { store: store.clone(), inner: RwLock::new(Inner::default()), skipped: Default::default() };
        {
            let mut inner = reg.inner.write().expect("registry lock");
            // Example sets first: templates are checked against them.
            for dir in dirs {
                let fs_dir = dir.join("fewshot");
                if fs_dir.is_dir() {
                    for e in fs::read_dir(&fs_dir).map_err(|e| io_err(&fs_dir, e))?.flatten() {
                        let p = e.path();
                        if p.extension().is_some_and(|x| x == "jsonl") {
                            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
                            check_name("few-shot set", &name)?;
                            inner.sets.insert(name, read_examples(&p)?);
                        }
                    }
                }
            }
            for (name, source) in BUILTIN {
                let t = Template::parse(source)
                    .map_err(|e| PromptError::Io(format!("built-in template {name} is invalid: {e}")))?;
                Self::insert_loaded(&mut inner, t, Origin::Builtin)?;
            }
            for dir in dirs {
                let mut files = Vec::new();
                prompt_files(dir, &mut files)?;
                for p in files {
                    let text = fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
                    let t = Template::parse(&text).map_err(|e| match e {
                        PromptError::Invalid { line: Some(l), message, .. } => {
                            PromptError::Io(format!("{}:{l}: {message}", p.display()))
                        }
                        e => PromptError::Io(format!("{}: {e}", p.display())),
                    })?;
                    Self::insert_loaded(&mut inner, t, Origin::File(p.display().to_string()))?;
                }
            }
            if let Some(store) = &store {
                fs::create_dir_all(store).map_err(|e| io_err(store, e))?;
                let mut names: Vec<PathBuf> =
                    fs::read_dir(store).map_err(|e| io_err(store, e))?.flatten().map(|e| e.path()).collect();
                names.sort();
                // The store is written by the API: one file it cannot read (damaged on disk,
                // or written by a version with other rules) is reported and skipped, so that it
                // can never keep the server from starting.
                for dir in names.into_iter().filter(|p| p.is_dir() && p.extension().is_none_or(|e| e != "deleted")) {
                    let mut files = Vec::new();
                    if let Err(e) = prompt_files(&dir, &mut files) {
                        reg.skip(&dir, &e);
                        continue;
                    }
                    for p in files {
                        let loaded = fs::read_to_string(&p)
                            .map_err(|e| io_err(&p, e))
                            .and_then(|text| Template::parse(&text))
                            .and_then(|t| Self::insert_loaded(&mut inner, t, Origin::Store));
                        if let Err(e) = loaded {
                            reg.skip(&p, &e);
                        }
                    }
                    let labels = dir.join("labels.json");
                    if labels.is_file() {
                        let moved: BTreeMap<String, Option<u32>> = match fs::read_to_string(&labels)
                            .map_err(|e| io_err(&labels, e))
                            .and_then(|text| serde_json::from_str(&text).map_err(|e| io_err(&labels, e)))
                        {
                            Ok(m) => m,
                            Err(e) => {
                                reg.skip(&labels, &e);
                                continue;
                            }
                        };
                        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                        if let Some(entry) = inner.templates.get_mut(name) {
                            for (label, v) in moved {
                                match v {
                                    Some(v) if entry.versions.contains_key(&v) => {
                                        entry.labels.insert(label, v);
                                    }
                                    Some(_) => {}
                                    None => {
                                        entry.labels.remove(&label);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(reg)
    }

    fn insert_loaded(inner: &mut Inner, t: Template, origin: Origin) -> Result<()> {
        Self::check_sets(inner, &t)?;
        let Some(v) = t.header.version else {
            return Err(PromptError::Io(format!("template `{}` ({origin:?}) has no version", t.name())));
        };
        let entry = inner.templates.entry(t.name().to_string()).or_default();
        if let Some(old) = entry.versions.get(&v) {
            if old.template != t {
                return Err(PromptError::Io(format!(
                    "template {}@{v} is defined twice with different content ({:?} and {origin:?}); versions are immutable",
                    t.name(),
                    old.origin
                )));
            }
            return Ok(());
        }
        for l in &t.header.labels {
            entry.labels.insert(l.clone(), v);
        }
        entry.versions.insert(v, Arc::new(Version { template: t, origin }));
        Ok(())
    }

    fn check_sets(inner: &Inner, t: &Template) -> Result<()> {
        if let Some(set) = t.header.fewshot.as_ref().and_then(|f| f.set.as_ref()) {
            if !inner.sets.contains_key(set) {
                return Err(PromptError::invalid(
                    "fewshot.set",
                    format!("template `{}` uses the few-shot set `{set}`, which does not exist (add fewshot/{set}.jsonl to a prompts directory)", t.name()),
                ));
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<Summary> {
        let inner = self.inner.read().expect("registry lock");
        inner
            .templates
            .iter()
            .filter_map(|(name, e)| {
                let latest = e.latest()?;
                let t = &e.versions[&latest].template;
                Some(Summary {
                    name: name.clone(),
                    description: t.header.description.clone(),
                    kind: t.header.kind,
                    latest,
                    versions: e.versions.keys().copied().collect(),
                    labels: e.labels.clone(),
                })
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<Detail> {
        let inner = self.inner.read().expect("registry lock");
        let e = inner.templates.get(name).ok_or_else(|| not_found(name))?;
        Ok(Detail {
            name: name.to_string(),
            latest: e.latest().unwrap_or(0),
            labels: e.labels.clone(),
            versions: e
                .versions
                .iter()
                .map(|(&v, ver)| VersionView {
                    version: v,
                    header: ver.template.header.clone(),
                    template: ver.template.body.clone(),
                    source: ver.template.to_source(),
                    origin: ver.origin.clone(),
                })
                .collect(),
        })
    }

    /// Resolves `name` (its `production` label, else its latest version), `name@3` or
    /// `name:label` (`latest` included).
    pub fn resolve(&self, reference: &str) -> Result<Resolved> {
        let (name, target) = match (reference.split_once('@'), reference.split_once(':')) {
            (Some((n, v)), _) => (n, Some(format!("@{v}"))),
            (None, Some((n, l))) => (n, Some(l.to_string())),
            (None, None) => (reference, None),
        };
        self.resolve_target(name, target.as_deref())
    }

    fn resolve_target(&self, name: &str, target: Option<&str>) -> Result<Resolved> {
        let inner = self.inner.read().expect("registry lock");
        let e = inner.templates.get(name).ok_or_else(|| not_found(name))?;
        let (v, label) = match target {
            Some(t) if t.starts_with('@') => {
                let v: u32 = t[1..]
                    .parse()
                    .map_err(|_| PromptError::invalid("template", format!("`{name}{t}`: a version is a positive integer")))?;
                (v, None)
            }
            Some("latest") => (e.latest().unwrap_or(0), Some("latest".to_string())),
            Some(l) => {
                let v = *e.labels.get(l).ok_or_else(|| {
                    PromptError::NotFound(format!(
                        "template `{name}` has no label `{l}` (labels: {})",
                        e.labels.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                (v, Some(l.to_string()))
            }
            None => match e.labels.get(DEFAULT_LABEL) {
                Some(&v) => (v, Some(DEFAULT_LABEL.to_string())),
                None => (e.latest().unwrap_or(0), Some("latest".to_string())),
            },
        };
        let version = e
            .versions
            .get(&v)
            .cloned()
            .ok_or_else(|| PromptError::NotFound(format!("template `{name}` has no version {v}")))?;
        Ok(Resolved { version, label })
    }

    /// Picks one arm of a traffic split with `u` uniform in [0, 1): arms are labels or
    /// `@version`, weights are relative.
    pub fn choose(&self, name: &str, arms: &[Arm], u: f64) -> Result<Resolved> {
        if arms.is_empty() {
            return self.resolve_target(name, None);
        }
        let weights: Vec<f64> = arms.iter().map(|a| a.weight).collect();
        let i = weighted_index(&weights, u).ok_or_else(|| {
            PromptError::invalid("template.split", "split weights must be non-negative with a positive sum")
        })?;
        self.resolve_target(name, Some(&arms[i].target))
    }

    fn skip(&self, path: &Path, e: &PromptError) {
        tracing::error!(file = %path.display(), error = %e, "skipping a stored prompt file that cannot be loaded");
        self.skipped.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{}: {e}", path.display()));
    }

    /// Stored files skipped at start-up, each with its reason.
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn store_dir(&self, name: &str) -> Result<PathBuf> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| PromptError::Conflict("this registry has no store: templates are read-only".into()))?;
        Ok(store.join(name))
    }

    /// Adds a version. Without a version number it becomes latest + 1. The same content
    /// under an existing number is accepted as is (`false`: nothing new); other content is
    /// a conflict. Labels in the header are pointed at the new version.
    pub fn create(&self, mut t: Template) -> Result<(Arc<Version>, bool)> {
        let mut inner = self.inner.write().expect("registry lock");
        Self::check_sets(&inner, &t)?;
        let dir = self.store_dir(t.name())?;
        for l in &t.header.labels {
            check_name("label", l)?;
            if l == "latest" {
                return Err(PromptError::invalid("labels", "`latest` always means the highest version; it cannot be set"));
            }
        }
        let entry = inner.templates.get(t.name());
        let v = match t.header.version {
            Some(v) => v,
            None => entry.and_then(Entry::latest).unwrap_or(0) + 1,
        };
        t.header.version = Some(v);
        if let Some(old) = entry.and_then(|e| e.versions.get(&v)) {
            if old.template.body == t.body && Self::same_header(&old.template, &t) {
                return Ok((old.clone(), false));
            }
            return Err(PromptError::Conflict(format!(
                "{}@{v} already exists with other content; versions are immutable (leave out `version` to add the next one)",
                t.name()
            )));
        }
        let labels = std::mem::take(&mut t.header.labels);
        // What is stored must load again, whole: the size limit applies to the stored file,
        // and the file must parse back to this very template (a header value holding a
        // `+++` line, say, would end the header early on the next start).
        let source = t.to_source();
        if source.len() > MAX_SOURCE_BYTES {
            return Err(PromptError::invalid(
                "template",
                format!("the template's file would be {} bytes, over the limit of {MAX_SOURCE_BYTES}", source.len()),
            ));
        }
        match Template::parse(&source) {
            Ok(back) if back.header == t.header && back.body == t.body => {}
            Ok(_) => {
                return Err(PromptError::invalid("template", "the template does not read back as written (a header value that looks like template syntax?)"))
            }
            Err(e) => return Err(PromptError::invalid("template", format!("the template does not read back as written: {e}"))),
        }
        write_durably(&dir.join(format!("{v}.prompt")), source.as_bytes())?;
        let name = t.name().to_string();
        let version = Arc::new(Version { template: t, origin: Origin::Store });
        let entry = inner.templates.entry(name.clone()).or_default();
        entry.versions.insert(v, version.clone());
        for l in labels {
            entry.labels.insert(l, v);
        }
        Self::write_labels(&dir, entry)?;
        Ok((version, true))
    }

    fn same_header(a: &Template, b: &Template) -> bool {
        let mut ha = a.header.clone();
        let mut hb = b.header.clone();
        ha.labels.clear();
        hb.labels.clear();
        ha == hb
    }

    fn write_labels(dir: &Path, entry: &Entry) -> Result<()> {
        let labels: BTreeMap<&str, Option<u32>> = entry.labels.iter().map(|(k, &v)| (k.as_str(), Some(v))).collect();
        write_durably(&dir.join("labels.json"), serde_json::to_string_pretty(&labels).expect("labels").as_bytes())
    }

    /// Points `label` at `version` (creating the label, or moving it: a rollback).
    pub fn set_label(&self, name: &str, label: &str, version: u32) -> Result<()> {
        check_name("label", label)?;
        if label == "latest" {
            return Err(PromptError::invalid("label", "`latest` always means the highest version; it cannot be set"));
        }
        let dir = self.store_dir(name)?;
        let mut inner = self.inner.write().expect("registry lock");
        let e = inner.templates.get_mut(name).ok_or_else(|| not_found(name))?;
        if !e.versions.contains_key(&version) {
            return Err(PromptError::NotFound(format!("template `{name}` has no version {version}")));
        }
        let old = e.labels.insert(label.to_string(), version);
        if let Err(err) = Self::write_labels(&dir, e) {
            match old {
                Some(v) => e.labels.insert(label.to_string(), v),
                None => e.labels.remove(label),
            };
            return Err(err);
        }
        Ok(())
    }

    /// Removes a label.
    pub fn delete_label(&self, name: &str, label: &str) -> Result<()> {
        let dir = self.store_dir(name)?;
        let mut inner = self.inner.write().expect("registry lock");
        let e = inner.templates.get_mut(name).ok_or_else(|| not_found(name))?;
        let Some(old) = e.labels.remove(label) else {
            return Err(PromptError::NotFound(format!("template `{name}` has no label `{label}`")));
        };
        // A removed label must stay removed even when a file's header sets it.
        let mut labels: BTreeMap<&str, Option<u32>> = e.labels.iter().map(|(k, &v)| (k.as_str(), Some(v))).collect();
        labels.insert(label, None);
        if let Err(err) =
            write_durably(&dir.join("labels.json"), serde_json::to_string_pretty(&labels).expect("labels").as_bytes())
        {
            e.labels.insert(label.to_string(), old);
            return Err(err);
        }
        Ok(())
    }

    /// Deletes a template created through the API (all its versions and labels).
    pub fn delete(&self, name: &str) -> Result<()> {
        let dir = self.store_dir(name)?;
        let mut inner = self.inner.write().expect("registry lock");
        let e = inner.templates.get(name).ok_or_else(|| not_found(name))?;
        if let Some(v) = e.versions.values().find(|v| v.origin != Origin::Store) {
            return Err(PromptError::Conflict(format!(
                "template `{name}` is defined by files ({:?}); remove them from the prompts directory instead",
                v.origin
            )));
        }
        if dir.exists() {
            // Renamed away first, so a crash never leaves half a template behind.
            let trash = dir.with_extension("deleted");
            let _ = fs::remove_dir_all(&trash);
            fs::rename(&dir, &trash).map_err(|e| io_err(&dir, e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            let _ = fs::remove_dir_all(&trash);
        }
        inner.templates.remove(name);
        Ok(())
    }

    /// The examples `t` renders with: none, its first `k`, or the `k` most similar to its
    /// input variable (cosine of `embed`'s vectors).
    pub fn examples(
        &self,
        t: &Template,
        vars: &Map<String, Value>,
        mode: Option<FewShotMode>,
        k: Option<usize>,
        embed: Option<&EmbedFn>,
    ) -> Result<Vec<Example>> {
        let Some(f) = &t.header.fewshot else {
            return Ok(Vec::new());
        };
        let all: Vec<Example> = match &f.set {
            Some(s) => self.inner.read().expect("registry lock").sets.get(s).cloned().unwrap_or_default(),
            None => f.examples.clone(),
        };
        let k = k.unwrap_or(f.k).min(all.len());
        match mode.unwrap_or(f.mode) {
            FewShotMode::Zero => Ok(Vec::new()),
            FewShotMode::Fixed => Ok(all.into_iter().take(k).collect()),
            FewShotMode::Similar => {
                let var = f.input.as_deref().unwrap_or_default();
                let input = vars.get(var).and_then(Value::as_str).ok_or_else(|| {
                    PromptError::invalid(format!("variables.{var}"), format!("similar few-shot selection needs `{var}`"))
                })?;
                let embed = embed.ok_or_else(|| {
                    PromptError::invalid("fewshot.mode", "similar few-shot selection needs an embedding model")
                })?;
                let mut texts: Vec<String> = all.iter().map(|e| e.input.clone()).collect();
                texts.push(input.to_string());
                let vecs = embed(&texts)?;
                let (q, ex) = vecs.split_last().expect("at least the input");
                let mut scored: Vec<(f32, usize)> = ex.iter().enumerate().map(|(i, v)| (cosine(q, v), i)).collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                // Most similar last: nearest to the question the model answers next.
                let mut picked: Vec<Example> = scored.iter().take(k).map(|&(_, i)| all[i].clone()).collect();
                picked.reverse();
                Ok(picked)
            }
        }
    }

    /// Resolves, picks the examples and renders in one call.
    pub fn render(
        &self,
        r: &Resolved,
        vars: &Map<String, Value>,
        mode: Option<FewShotMode>,
        k: Option<usize>,
        embed: Option<&EmbedFn>,
    ) -> Result<Rendered> {
        let t = &r.version.template;
        let examples = self.examples(t, vars, mode, k, embed)?;
        t.render(vars, &examples)
    }
}

fn not_found(name: &str) -> PromptError {
    PromptError::NotFound(format!("template `{name}` does not exist"))
}

/// Cosine similarity (the index's, one definition for the workspace).
pub use ragway_index::simd::cosine;

/// A deterministic uniform draw in [0, 1) from a routing key (splitmix64), so a user's
/// requests keep landing on the same arm of a split.
pub fn uniform_from_key(key: u64) -> f64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The arm a draw `u` in [0, 1) falls in, arms taking shares proportional to their weights;
/// `None` when a weight is negative or not finite, or none is positive.
pub fn weighted_index(weights: &[f64], u: f64) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if weights.iter().any(|w| !(*w >= 0.0 && w.is_finite())) || total <= 0.0 {
        return None;
    }
    let mut x = u.clamp(0.0, 1.0 - f64::EPSILON) * total;
    for (i, &w) in weights.iter().enumerate() {
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    weights.iter().rposition(|&w| w > 0.0)
}

/// A routing key from a string (FNV-1a).
pub fn key_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
