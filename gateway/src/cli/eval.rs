//! `ragway eval retrieval|rag|halueval|compare`: offline evaluation runs, in-process (the
//! models and index of `--data-dir`, loaded here) or against a remote ragway server
//! (`--url`). Exit codes: 0 done, 1 error, 2 usage, 3 a `--fail-under` threshold missed.

use crate::config::{ServeArgs, Settings};
use ragway_engine::embed::worker::EmbedWorker;
use ragway_engine::generate::{GenerateHandle, GenerateWorker};
use ragway_eval::backend::{Chat, InProcess, Remote, RemoteChat, RemoteSystem, System};
use ragway_eval::retrieval::EmptyQueries;
use ragway_eval::runner::{self, EvalKind, Progress, RunContext, RunSpec};
use ragway_index::SearchMode;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

/// The exit code of a run that misses a `--fail-under` threshold.
pub const EXIT_THRESHOLD: i32 = 3;

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Retrieval quality on a BEIR dataset: nDCG, MAP, recall, precision, MRR, hit rate at k.
    Retrieval(RunArgs),
    /// RAG answers: exact match, F1, faithfulness, context precision/recall, answer relevancy.
    Rag(RunArgs),
    /// Hallucination recognition on HaluEval QA with the model as judge.
    Halueval(RunArgs),
    /// Two finished runs side by side: deltas, paired significance, flipped samples.
    Compare(CompareArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// BEIR folder (retrieval), or a QA JSONL / SQuAD JSON / HaluEval QA JSONL file.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Where samples.jsonl, summary.json and report.html go (a rerun resumes there).
    #[arg(long)]
    pub out: PathBuf,
    /// BEIR qrels split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Collection to search; default: the dataset's corpus, ingested (once) into a fresh one.
    #[arg(long)]
    pub collection: Option<String>,
    #[arg(long, default_value = "hybrid", value_parser = ["dense", "keyword", "hybrid"])]
    pub mode: String,
    /// Results per query [default: 100 for retrieval, 5 for rag].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Retrieval: hybrid fusion, `convex`, `rrf` or `dbsf` (their default constants) or the
    /// search API's JSON object (`{"method":"rrf","rrf_k":10}`) [default: the collection's].
    #[arg(long, value_parser = parse_fusion)]
    pub fusion: Option<ragway_index::fusion::FusionParams>,
    /// Retrieval: candidates each half hands to fusion [default: max(2·top_k, 300) for
    /// hybrid, max(2·top_k, 50) for dense or keyword].
    #[arg(long)]
    pub candidates: Option<usize>,
    /// RAG template reference: `name`, `name@3`, `name:label`.
    #[arg(long)]
    pub template: Option<String>,
    /// Generation model (with --url: the `model` of the requests).
    #[arg(long)]
    pub model: Option<String>,
    /// Judge template reference [default: hallucination-judge].
    #[arg(long)]
    pub judge_template: Option<String>,
    /// Skip the judge-based RAG metrics (faithfulness; context metrics without gold ids).
    #[arg(long)]
    pub no_judge: bool,
    /// Only the first N samples.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Queries without results: `beir` (left out, as BEIR/pytrec_eval) or `trec-c` (0).
    #[arg(long, default_value = "beir", value_parser = ["beir", "trec-c"])]
    pub empty_queries: String,
    /// Samples in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Bootstrap resamples of the confidence intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// CI gate: `ndcg@10=0.70,faithfulness=0.8`; a miss exits with code 3.
    #[arg(long)]
    pub fail_under: Option<String>,
    /// Evaluate a running ragway server instead of this process's models.
    #[arg(long)]
    pub url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "RAGWAY_EVAL_API_KEY", hide_env_values = true)]
    pub url_api_key: Option<String>,
    /// An OpenAI-compatible server to judge with (default: the model under evaluation).
    #[arg(long)]
    pub judge_url: Option<String>,
    #[arg(long)]
    pub judge_model: Option<String>,
    #[arg(long, env = "RAGWAY_JUDGE_API_KEY", hide_env_values = true)]
    pub judge_api_key: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The baseline run folder (A).
    pub a: PathBuf,
    /// The candidate run folder (B).
    pub b: PathBuf,
    /// Where compare.json and compare.html go [default: B/compare].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 10000)]
    pub resamples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--fusion`: a method's name, or the search API's JSON object.
fn parse_fusion(s: &str) -> Result<ragway_index::fusion::FusionParams, String> {
    let json = if s.trim_start().starts_with('{') { s.to_string() } else { format!("{{\"method\": {s:?}}}") };
    serde_json::from_str(&json).map_err(|e| format!("not a fusion (`convex`, `rrf`, `dbsf` or a JSON object): {e}"))
}

/// Runs the subcommand; returns the process exit code.
pub fn run(cmd: EvalCommand) -> anyhow::Result<i32> {
    let (kind, args) = match cmd {
        EvalCommand::Compare(c) => return compare(c),
        EvalCommand::Retrieval(a) => (EvalKind::Retrieval, a),
        EvalCommand::Rag(a) => (EvalKind::Rag, a),
        EvalCommand::Halueval(a) => (EvalKind::Halueval, a),
    };
    let thresholds = args.fail_under.as_deref().map(runner::parse_thresholds).transpose()?;
    let mut spec = RunSpec::new(kind, args.dataset.clone());
    spec.split = args.split.clone();
    spec.collection = args.collection.clone();
    spec.mode = SearchMode::parse(&args.mode).expect("clap checked the mode");
    spec.top_k = args.top_k;
    spec.fusion = args.fusion;
    spec.candidates = args.candidates;
    spec.template = args.template.clone();
    spec.model = args.model.clone();
    spec.judge_template = args.judge_template.clone();
    spec.judge = !args.no_judge;
    spec.limit = args.limit;
    spec.seed = args.seed;
    spec.empty_queries = EmptyQueries::parse(&args.empty_queries).expect("clap checked it");
    spec.concurrency = args.concurrency.max(1);
    spec.bootstrap = args.bootstrap.max(1);
    let settings = args.serve.clone().resolve()?;
    let judge: Option<Arc<dyn Chat>> = match &args.judge_url {
        Some(url) => {
            let remote = Remote::new(url, args.judge_api_key.clone())?;
            let model = match &args.judge_model {
                Some(m) => m.clone(),
                None => remote.discover_models()?.0.into_iter().next().ok_or_else(|| anyhow::anyhow!("{url} serves no chat model"))?,
            };
            Some(Arc::new(RemoteChat { remote, model }))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let system: Box<dyn System> = match &args.url {
        Some(url) => {
            let remote = Remote::new(url, args.url_api_key.clone())?;
            let (chat, embed) = remote.discover_models()?;
            let registry = ragway_prompts::Registry::open(&settings.prompts_dirs, None)?;
            Box::new(RemoteSystem {
                remote,
                registry: Arc::new(registry),
                judge,
                model: args.model.clone().or_else(|| chat.first().cloned()),
                embedding_model: embed.first().cloned(),
            })
        }
        None => {
            // Retrieval needs only the embedder; answers and judging need the generator too.
            let needs_generator = kind != EvalKind::Retrieval && !(kind == EvalKind::Halueval && judge.is_some());
            Box::new(in_process(&settings, needs_generator, judge, runtime.handle().clone())?)
        }
    };
    let progress = Progress::with_bar();
    let summary = runner::run(&spec, RunContext { system: system.as_ref(), progress: &progress }, &args.out)?;
    print_summary(&summary);
    println!("wrote {}/samples.jsonl, summary.json and report.html", args.out.display());
    if let Some(t) = thresholds {
        let missed = runner::check_thresholds(&summary, &t)?;
        if !missed.is_empty() {
            eprintln!("fail-under: {}", missed.join("; "));
            return Ok(EXIT_THRESHOLD);
        }
    }
    Ok(0)
}

/// The models and index of this process, as `serve` would load them.
pub fn in_process(settings: &Settings, generator: bool, judge: Option<Arc<dyn Chat>>, runtime: tokio::runtime::Handle) -> anyhow::Result<InProcess> {
    let embed = EmbedWorker::spawn(settings.embed_worker_config()?)?;
    std::fs::create_dir_all(&settings.data_dir)?;
    let index = crate::http::server::open_index(settings, embed)?;
    let generator: Option<GenerateHandle> = if generator {
        Some(GenerateWorker::spawn(settings.generate_config())?)
    } else {
        None
    };
    let registry = ragway_prompts::Registry::open(&settings.prompts_dirs, Some(settings.data_dir.join("prompts")))?;
    Ok(InProcess { index, generator, registry: Arc::new(registry), rag: settings.rag.clone(), runtime, judge })
}

fn print_summary(summary: &Value) {
    println!("{:<28} {:>9}  {:<22} {:>6}", "metric", "value", "95% CI", "n");
    for (k, v) in ragway_eval::report::metrics_of(summary) {
        let ci = ragway_eval::report::ci_of(summary, &k).map_or(String::new(), |(a, b)| format!("[{a:.4}, {b:.4}]"));
        println!("{k:<28} {v:>9.4}  {ci:<22} {:>6}", summary["n_by_metric"][&k]);
    }
    if summary["judge"].is_object() {
        println!("judge: {} calls, {} unparseable", summary["judge"]["calls"], summary["judge"]["unparseable"]);
    }
    println!("{} samples in {:.1} s ({} errors)", summary["n"], summary["run"]["duration_s"].as_f64().unwrap_or(0.0), summary["run"]["errors"]);
}

fn compare(c: CompareArgs) -> anyhow::Result<i32> {
    let cmp = ragway_eval::compare::compare(&c.a, &c.b, c.resamples.max(1), c.seed)?;
    print!("{}", ragway_eval::compare::table(&cmp));
    let out = c.out.unwrap_or_else(|| c.b.join("compare"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("compare.json"), serde_json::to_vec_pretty(&cmp)?)?;
    std::fs::write(out.join("compare.html"), ragway_eval::report::compare_report(&cmp))?;
    println!("wrote {}/compare.json and compare.html", out.display());
    Ok(0)
}
