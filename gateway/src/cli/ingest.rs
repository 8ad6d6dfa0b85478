//! `ragway ingest`: the server's ingestion pipeline, in-process, with a progress bar.
//! It takes the data directory's lock, so it runs when no server holds that directory.

use crate::config::ServeArgs;
use ragway_engine::embed::worker::EmbedWorker;
use ragway_index::ingest::{IngestOptions, OnError, Source};
use ragway_index::jobs::JobState;
use ragway_index::CreateCollection;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// Collection to ingest into (created with default settings if it does not exist).
    #[arg(long)]
    pub collection: String,
    /// A JSONL / NDJSON / BEIR corpus.jsonl file, or a directory of .txt/.md files.
    #[arg(long)]
    pub input: PathBuf,
    /// `skip` bad records (reported with line numbers) or `fail` at the first one.
    #[arg(long, default_value = "skip", value_parser = ["skip", "fail"])]
    pub on_error: String,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn run(args: IngestArgs) -> anyhow::Result<()> {
    let settings = args.serve.resolve()?;
    if !args.input.exists() {
        anyhow::bail!("{} does not exist", args.input.display());
    }
    let handle = EmbedWorker::spawn(settings.embed_worker_config()?)?;
    std::fs::create_dir_all(&settings.data_dir)?;
    let index = crate::http::server::open_index(&settings, handle)?;
    let collection = match index.get(&args.collection) {
        Ok(c) => c,
        Err(ragway_index::IndexError::CollectionNotFound(_)) => {
            eprintln!("creating collection `{}`", args.collection);
            index.create(CreateCollection { name: args.collection.clone(), ..Default::default() })?
        }
        Err(e) => return Err(e.into()),
    };
    let on_error = if args.on_error == "fail" { OnError::Fail } else { OnError::Skip };
    let job = index.jobs().submit(collection.clone(), Source::from_path(&args.input), IngestOptions { on_error, ..Default::default() }, None)?;
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent}% {msg}")
            .expect("progress template"),
    );
    // Where stderr is not a terminal (a CI log, `docker logs`) the bar draws nothing: a line
    // every 10 s instead.
    let mut lines = (!std::io::IsTerminal::is_terminal(&std::io::stderr())).then(std::time::Instant::now);
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        let v = job.view();
        let message = if v.progress.indexing {
            format!("{} chunks written; building the dense index", v.progress.chunks_written)
        } else {
            format!(
                "{} docs, {} chunks, {:.1} docs/s, {} bad, eta {}",
                v.progress.documents_written + v.progress.documents_unchanged,
                v.progress.chunks_written,
                v.progress.documents_per_second,
                v.progress.documents_failed,
                v.progress.eta_seconds.map_or("?".into(), |s| format!("{s:.0}s"))
            )
        };
        if let Some(last) = lines.as_mut().filter(|l| l.elapsed() >= Duration::from_secs(10)) {
            eprintln!("{:.0}% {message}", v.progress.fraction * 100.0);
            *last = std::time::Instant::now();
        }
        bar.set_position((v.progress.fraction * 1000.0) as u64);
        bar.set_message(message);
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
    let view = job.view();
    for e in &view.errors {
        match (&e.line, &e.file) {
            (Some(l), _) => eprintln!("line {l}: {}", e.message),
            (_, Some(f)) => eprintln!("{f}: {}", e.message),
            _ => eprintln!("{}", e.message),
        }
    }
    println!("{}", serde_json::to_string_pretty(&view)?);
    index.flush()?;
    if view.state == JobState::Failed {
        anyhow::bail!("ingestion failed: {}", view.error.unwrap_or_default());
    }
    Ok(())
}
