//! `ragway repair`: cuts a collection's log at its first damaged record after keeping a
//! backup of the whole log. The server refuses to open a collection whose log is damaged
//! before its end (only a torn tail, never acknowledged, is cut by itself); this is the
//! explicit step that accepts losing the records after the damage.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RepairArgs {
    /// The server's data directory.
    #[arg(long, env = "RAGWAY_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// The collection whose log to repair.
    pub collection: String,
}

pub fn run(args: RepairArgs) -> anyhow::Result<()> {
    let r = ragway_index::IndexService::repair_log(&args.data_dir, &args.collection)?;
    match r.backup {
        None => println!("collection `{}`: the log has no damage; nothing changed", args.collection),
        Some(backup) => println!(
            "collection `{}`: kept {} bytes, cut {} bytes; the whole log before the cut is in {}",
            args.collection,
            r.kept,
            r.dropped,
            backup.display()
        ),
    }
    Ok(())
}
