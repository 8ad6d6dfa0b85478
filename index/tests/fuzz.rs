//! Property tests over what the index parses from untrusted bytes: log records (a log is
//! whatever the disk returns) and the filter language (request JSON). No input may panic.
//! CI runs proptest's default number of cases; `scripts/fuzz.sh` runs long campaigns
//! (`PROPTEST_CASES`).

use proptest::prelude::*;
use ragway_index::wal::{self, ChunkRecord, DocRecord, Record, Wal};
use ragway_index::Filter;
use serde_json::{json, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("key".to_string()),
        Just("eq".to_string()),
        Just("ne".to_string()),
        Just("gt".to_string()),
        Just("gte".to_string()),
        Just("lt".to_string()),
        Just("lte".to_string()),
        Just("in".to_string()),
        Just("nin".to_string()),
        Just("exists".to_string()),
        Just("and".to_string()),
        Just("or".to_string()),
        Just("not".to_string()),
        Just("_id".to_string()),
        Just("year".to_string()),
        Just("tags".to_string()),
        "[a-z._]{0,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[a-z0-9.]{0,10}".prop_map(Value::String),
        key.clone().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn record(seq: u64, n_docs: usize, dim: usize) -> Record {
    let docs: Vec<DocRecord> = (0..n_docs)
        .map(|i| DocRecord {
            id: format!("d{seq}-{i}"),
            title: None,
            text: "text".into(),
            metadata: json!({"i": i}),
            hash: seq,
            chunks: vec![ChunkRecord { key: seq * 100 + i as u64, byte_start: 0, byte_end: 4, char_start: 0, char_end: 4, tokens: 1 }],
        })
        .collect();
    Record::Upsert { seq, vectors: vec![0.5; n_docs * dim], docs }
}

fn replay(path: &std::path::Path) -> Result<Vec<Record>, ragway_index::IndexError> {
    let mut out = Vec::new();
    Wal::open(path, |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

proptest! {
    /// Any bytes as a log: opening either replays something or refuses; never a panic.
    #[test]
    fn arbitrary_log_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        std::fs::write(&path, &bytes).unwrap();
        let _ = replay(&path);
        let _ = wal::repair(&path);
        let _ = replay(&path);
    }

    /// A valid log with one damaged byte: opening gives back every record before the damage
    /// and refuses when acknowledged records follow it — it never silently drops records
    /// after the damaged one.
    #[test]
    fn one_damaged_byte_is_a_torn_tail_or_a_refusal(n in 1usize..8, at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let records: Vec<Record> = (1..=n as u64).map(|s| record(s, 1 + (s as usize % 3), 4)).collect();
        let encoded: Vec<Vec<u8>> = records.iter().map(wal::encode).collect();
        let mut bytes: Vec<u8> = encoded.concat();
        let pos = at.index(bytes.len());
        bytes[pos] ^= flip;
        std::fs::write(&path, &bytes).unwrap();
        // Which record holds the damaged byte.
        let mut end = 0;
        let damaged = encoded.iter().position(|e| { end += e.len(); pos < end }).unwrap();
        match replay(&path) {
            Ok(got) => {
                prop_assert_eq!(damaged, n - 1, "records after the damage were dropped without an error");
                prop_assert_eq!(&got[..], &records[..damaged]);
            }
            Err(e) => {
                prop_assert!(damaged < n - 1, "a damaged last record must be cut, not refused: {}", e);
                prop_assert!(e.to_string().contains("ragway repair"));
                // Repair keeps the records before the damage.
                let r = wal::repair(&path).unwrap();
                prop_assert!(r.backup.is_some());
                prop_assert_eq!(replay(&path).unwrap(), records[..damaged].to_vec());
            }
        }
    }

    /// Filters: any JSON either parses or is refused; a parsed filter matches any metadata
    /// without panicking.
    #[test]
    fn filters_parse_and_match_without_panicking(filter in json_value(), metadata in json_value()) {
        if let Ok(f) = Filter::parse(&filter) {
            let _ = f.matches("doc-1", &metadata);
        }
    }
}
