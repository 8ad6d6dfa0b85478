//! The `ragway` binary.

use clap::{Parser, Subcommand};
use ragway_gateway::config::ServeArgs;

/// ragway: a retrieval-augmented LLM serving gateway with its own vector store.
#[derive(Parser)]
#[command(name = "ragway", version, about)]
struct Cli {
    /// Log format on stderr: `text`, or `json` (one object per line, with the request span's
    /// fields) for log collectors.
    #[arg(long, global = true, env = "RAGWAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API with the configured models.
    Serve(ServeArgs),
    /// Ingest a JSONL / BEIR corpus file or a directory of text files into a collection.
    Ingest(ragway_gateway::cli::ingest::IngestArgs),
    /// Cut a collection's damaged log at the damage, keeping a backup (server stopped).
    Repair(ragway_gateway::cli::repair::RepairArgs),
    /// Offline evaluation runs (retrieval, RAG, HaluEval) and run comparison.
    #[command(subcommand)]
    Eval(ragway_gateway::cli::eval::EvalCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal (and not under NO_COLOR): logs piped to a file, a
    // journal or a collector stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if cli.log_format == "json" {
        logs.json().with_current_span(true).with_span_list(false).init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Serve(args) => {
            let settings = args.resolve()?;
            actix_web::rt::System::new().block_on(ragway_gateway::http::server::serve(settings))
        }
        Command::Ingest(args) => ragway_gateway::cli::ingest::run(args),
        Command::Repair(args) => ragway_gateway::cli::repair::run(args),
        Command::Eval(cmd) => {
            let code = ragway_gateway::cli::eval::run(cmd)?;
            std::process::exit(code)
        }
    }
}
