//! # ragway-prompts
//!
//! Prompt templates as versioned, validated assets, and the retrieval-augmented generation
//! pipeline that uses them. No HTTP here: the gateway exposes both.
//!
//! - [`template`]: one version — a TOML header (variables with types and defaults, model
//!   parameters, few-shot examples) and a minijinja body, checked when parsed and rendered
//!   in a sandbox (no file access, bounded steps and output).
//! - [`registry`]: versions, labels (`production`, `staging`, ...), resolution of `name`,
//!   `name@3` and `name:label`, traffic splits between versions, few-shot selection, the
//!   built-in defaults and the on-disk store for templates created through the API.
//! - [`rag`]: condense → retrieve → pack → render → (generate) → cite → check grounding.

pub mod error;
pub mod rag;
pub mod registry;
pub mod template;

pub use error::{PromptError, Result};
pub use registry::{Registry, Resolved};
pub use template::{Example, FewShotMode, Header, Message, TemplateKind, Rendered, Template};
