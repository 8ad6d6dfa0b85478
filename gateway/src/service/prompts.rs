//! Prompt templates: create versions (whole files or parts), move labels, render.

use crate::app::AppState;
use crate::service::error::ServiceError;
use ragway_prompts::rag::chat_text;
use ragway_prompts::registry::{Detail, VersionView};
use ragway_prompts::template::Parameters;
use ragway_prompts::{FewShotMode, Header, Message, Rendered, Template, TemplateKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A new version: the file text as `source`, or its parts (`template` is the body, the
/// other fields are the header's).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CreatePrompt {
    /// The whole file: `+++`, TOML header, `+++`, minijinja body.
    source: Option<String>,
    name: Option<String>,
    /// Default: the latest version + 1.
    version: Option<u32>,
    description: Option<String>,
    /// `chat` (sections `::system::`, `::user::`, `::assistant::`, `::examples::`) or `text`.
    kind: Option<String>,
    #[schema(value_type = Object)]
    variables: Option<Value>,
    #[schema(value_type = Object)]
    parameters: Option<Value>,
    #[schema(value_type = Object)]
    fewshot: Option<Value>,
    dont_know: Option<String>,
    /// Labels pointed at the new version.
    labels: Option<Vec<String>>,
    /// The minijinja body.
    template: Option<String>,
}

/// Parses a creation body into a template; `path_name` is the `{name}` of the URL.
pub fn template_from_body(body: Value, path_name: Option<&str>) -> Result<Template, ServiceError> {
    let Value::Object(mut o) = body else {
        return Err(ServiceError::invalid("body", "the body must be a JSON object"));
    };
    if let Some(name) = path_name {
        match o.get("name") {
            None => {
                o.insert("name".into(), Value::String(name.to_string()));
            }
            Some(Value::String(n)) if n == name => {}
            Some(_) if o.contains_key("source") => {}
            Some(_) => return Err(ServiceError::invalid("name", format!("the body names another template than `{name}`"))),
        }
    }
    let t = if let Some(source) = o.remove("source") {
        let Value::String(source) = source else {
            return Err(ServiceError::invalid("source", "source must be a string"));
        };
        if let Some(k) = o.keys().find(|k| *k != "name") {
            return Err(ServiceError::invalid(k.clone(), "give the whole file as `source`, or its parts, not both"));
        }
        Template::parse(&source)?
    } else {
        let body = match o.remove("template") {
            Some(Value::String(b)) => b,
            Some(_) => return Err(ServiceError::invalid("template", "template must be a string (the minijinja body)")),
            None => return Err(ServiceError::invalid("template", "`template` (the body) or `source` (the whole file) is required")),
        };
        let header: Header = serde_json::from_value(Value::Object(o)).map_err(|e| ServiceError::invalid("body", e.to_string()))?;
        Template::from_parts(header, body)?
    };
    if let Some(name) = path_name {
        if t.name() != name {
            return Err(ServiceError::invalid("name", format!("the template is named `{}`, not `{name}`", t.name())));
        }
    }
    Ok(t)
}

/// A version as created: the template's labels and the version in full.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionCreated {
    pub name: String,
    pub version: u32,
    pub labels: BTreeMap<String, u32>,
    pub detail: Option<VersionView>,
}

fn version_created(d: Detail, v: u32) -> VersionCreated {
    let detail = d.versions.into_iter().find(|x| x.version == v);
    VersionCreated { name: d.name, version: v, labels: d.labels, detail }
}

/// Adds a version; the flag is false when the same version already existed.
pub async fn create_version(state: &AppState, body: Value, path_name: Option<&str>) -> Result<(VersionCreated, bool), ServiceError> {
    let t = template_from_body(body, path_name)?;
    let reg = state.prompts.clone();
    let (v, created, detail) = crate::service::limits::blocking(move || -> Result<_, ServiceError> {
        let (v, created) = reg.create(t)?;
        let detail = reg.get(v.template.name())?;
        Ok((v.template.version(), created, detail))
    })
    .await?;
    Ok((version_created(detail, v), created))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelBody {
    /// The version the label points at from now on.
    pub version: u32,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderBody {
    /// The template's variables.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: Map<String, Value>,
    /// Few-shot override: `zero`, `fixed` or `similar`.
    #[serde(default)]
    pub fewshot_mode: Option<FewShotMode>,
    /// Few-shot override: how many examples.
    #[serde(default)]
    pub fewshot_k: Option<usize>,
    /// Also apply this model's chat template and count the prompt's tokens.
    #[serde(default)]
    pub model: Option<String>,
}

/// Which version rendered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateRef {
    pub name: String,
    pub version: u32,
    /// The label the reference named, if any.
    pub label: Option<String>,
}

/// A rendered template: chat `messages` or `text`, and with `model` the prompt after the
/// model's chat template and its token count.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RenderedPrompt {
    pub template: TemplateRef,
    pub kind: TemplateKind,
    pub parameters: Parameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
}

/// Renders `reference` (`name`, `name@3`, `name:label`).
pub async fn render_prompt(state: &AppState, reference: &str, body: RenderBody) -> Result<RenderedPrompt, ServiceError> {
    let r = state.prompts.resolve(reference)?;
    let reg = state.prompts.clone();
    let embedder = state.embedder.get().cloned();
    let (vars, mode, k) = (body.variables, body.fewshot_mode, body.fewshot_k);
    let r2 = r.clone();
    let rendered = crate::service::limits::blocking(move || -> Result<Rendered, ServiceError> {
        let embed = |texts: &[String]| -> ragway_prompts::Result<Vec<Vec<f32>>> {
            let e = embedder.as_ref().ok_or_else(|| {
                ragway_prompts::PromptError::invalid("fewshot_mode", "the embedding model is still loading")
            })?;
            Ok(ragway_index::ChunkEmbedder::embed_text_batch(e, texts)?)
        };
        Ok(reg.render(&r2, &vars, mode, k, Some(&embed))?)
    })
    .await?;
    let t = &r.version.template;
    let mut out = RenderedPrompt {
        template: TemplateRef { name: t.name().to_string(), version: t.version(), label: r.label.clone() },
        kind: t.header.kind,
        parameters: t.header.parameters.clone(),
        messages: None,
        text: None,
        prompt: None,
        prompt_tokens: None,
    };
    match &rendered {
        Rendered::Chat { messages } => out.messages = Some(messages.clone()),
        Rendered::Text { text } => out.text = Some(text.clone()),
    }
    if let Some(model) = body.model {
        let h = crate::service::completions::generator(state, &model)?;
        let prompt = chat_text(&h, &rendered.into_messages())?;
        out.prompt_tokens = Some(h.tokenizer().encode(&prompt, false).map_err(|e| ServiceError::from_engine(e, "messages"))?.len());
        out.prompt = Some(prompt);
    }
    Ok(out)
}

/// Where a label points.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LabelSet {
    pub name: String,
    pub label: String,
    pub version: u32,
}

/// Points a label at a version (a rollback is moving it back).
pub async fn move_label(state: &AppState, name: String, label: String, version: u32) -> Result<LabelSet, ServiceError> {
    let reg = state.prompts.clone();
    let (n, l) = (name.clone(), label.clone());
    crate::service::limits::blocking(move || reg.set_label(&n, &l, version).map_err(ServiceError::from)).await?;
    Ok(LabelSet { name, label, version })
}

/// Removes a label.
pub async fn delete_label(state: &AppState, name: String, label: String) -> Result<(), ServiceError> {
    let reg = state.prompts.clone();
    crate::service::limits::blocking(move || reg.delete_label(&name, &label).map_err(ServiceError::from)).await
}

/// Deletes a template created through the API.
pub async fn delete(state: &AppState, name: String) -> Result<(), ServiceError> {
    let reg = state.prompts.clone();
    crate::service::limits::blocking(move || reg.delete(&name).map_err(ServiceError::from)).await
}

