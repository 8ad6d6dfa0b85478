//! The payload index: chunk keys by metadata value, so that a selective filter finds its
//! chunks without testing the filter on every chunk of the table (Qdrant keeps payload
//! indexes for the same reason).
//!
//! Every scalar in a document's metadata is indexed under its dotted path (objects are
//! walked; an array's scalar elements are indexed under the array's path, as the filter
//! language matches any element): exact values for `eq`/`in`, and numbers in order for
//! ranges. Strings longer than [`MAX_STRING`] bytes are not indexed (a condition naming
//! one is answered by a scan). The index answers with a superset of the matching chunks —
//! keys of removed chunks may linger until the next rebuild — and the caller tests the
//! filter and visibility on each, so it can only make a search cheaper, never different.

use crate::filter::{Filter, Op};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// Longest string value indexed.
pub const MAX_STRING: usize = 256;
/// Joins a path's parts (a byte no JSON key in practice holds; a key that does hold it only
/// costs that condition its index).
const SEP: char = '\u{1f}';

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scalar {
    Null,
    Bool(bool),
    /// An f64's bits, -0 folded into 0 (JSON numbers compare by value: `3 == 3.0`).
    Num(u64),
    Str(Box<str>),
}

fn num_bits(x: f64) -> u64 {
    if x == 0.0 {
        0
    } else {
        x.to_bits()
    }
}

fn scalar(v: &Value) -> Option<Scalar> {
    match v {
        Value::Null => Some(Scalar::Null),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Number(n) => n.as_f64().map(|x| Scalar::Num(num_bits(x))),
        Value::String(s) if s.len() <= MAX_STRING => Some(Scalar::Str(s.as_str().into())),
        _ => None,
    }
}

/// An f64 ordered by `total_cmp` (never NaN here: JSON has none), -0 folded into 0.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ordered(f64);

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn ordered(x: f64) -> Ordered {
    Ordered(if x == 0.0 { 0.0 } else { x })
}

#[derive(Default)]
pub(crate) struct PayloadIndex {
    values: HashMap<String, HashMap<Scalar, Vec<u64>>>,
    numbers: HashMap<String, BTreeMap<Ordered, Vec<u64>>>,
    /// Keys added (each chunk once, whatever its number of values).
    added: usize,
    /// Keys of removed chunks still in the lists.
    stale: usize,
}

impl PayloadIndex {
    /// Indexes chunk `key` of a document with this metadata.
    pub fn add(&mut self, key: u64, metadata: &Value) {
        self.added += 1;
        let mut path = String::new();
        self.walk(key, metadata, &mut path);
    }

    fn walk(&mut self, key: u64, v: &Value, path: &mut String) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let len = path.len();
                    if len > 0 {
                        path.push(SEP);
                    }
                    path.push_str(k);
                    self.walk(key, child, path);
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.leaf(key, item, path);
                }
            }
            other => self.leaf(key, other, path),
        }
    }

    fn leaf(&mut self, key: u64, v: &Value, path: &str) {
        if path.is_empty() {
            return;
        }
        fn push(list: &mut Vec<u64>, key: u64) {
            // A document's array may repeat a value: one entry per chunk and value.
            if list.last() != Some(&key) {
                list.push(key);
            }
        }
        if let Some(s) = scalar(v) {
            // The path's map exists after its first value: no allocation for the key then.
            if !self.values.contains_key(path) {
                self.values.insert(path.to_string(), HashMap::new());
            }
            push(self.values.get_mut(path).expect("inserted").entry(s).or_default(), key);
        }
        if let Some(x) = v.as_f64().filter(|_| v.is_number()) {
            if !self.numbers.contains_key(path) {
                self.numbers.insert(path.to_string(), BTreeMap::new());
            }
            push(self.numbers.get_mut(path).expect("inserted").entry(ordered(x)).or_default(), key);
        }
    }

    /// A chunk left the table: its keys stay in the lists until [`PayloadIndex::needs_rebuild`].
    pub fn removed(&mut self) {
        self.stale += 1;
    }

    /// When more than half the keys are stale (the caller rebuilds from the live chunks).
    pub fn needs_rebuild(&self) -> bool {
        self.stale > 1024 && self.stale * 2 > self.added
    }

    /// Chunk keys that may match `f` (a superset, possibly with repeats: the caller tests
    /// the filter on each), or `None` when the index cannot narrow the filter down.
    pub fn candidates(&self, f: &Filter) -> Option<Vec<u64>> {
        match f {
            Filter::And(fs) => {
                // The narrowest indexed condition; the caller tests the rest.
                let best = fs.iter().filter_map(|f| self.count(f).map(|n| (n, f))).min_by_key(|(n, _)| *n)?;
                self.candidates(best.1)
            }
            Filter::Or(fs) => {
                let mut out = Vec::new();
                for f in fs {
                    out.extend(self.candidates(f)?);
                }
                Some(out)
            }
            Filter::Not(_) => None,
            Filter::Cond { key, op } => {
                let path = self.path(key)?;
                match op {
                    Op::Eq(x) => Some(self.exact(&path, x)?.to_vec()),
                    Op::In(xs) => {
                        let mut out = Vec::new();
                        for x in xs {
                            out.extend_from_slice(self.exact(&path, x)?);
                        }
                        Some(out)
                    }
                    Op::Range { .. } => Some(self.range(&path, op).flat_map(|l| l.iter().copied()).collect()),
                    Op::Ne(_) | Op::Nin(_) | Op::Exists(_) => None,
                }
            }
        }
    }

    /// How many keys [`PayloadIndex::candidates`] would answer, without collecting them.
    pub fn count(&self, f: &Filter) -> Option<usize> {
        match f {
            Filter::And(fs) => fs.iter().filter_map(|f| self.count(f)).min(),
            Filter::Or(fs) => fs.iter().map(|f| self.count(f)).sum(),
            Filter::Not(_) => None,
            Filter::Cond { key, op } => {
                let path = self.path(key)?;
                match op {
                    Op::Eq(x) => self.exact(&path, x).map(<[u64]>::len),
                    Op::In(xs) => xs.iter().map(|x| self.exact(&path, x).map(<[u64]>::len)).sum(),
                    Op::Range { .. } => Some(self.range(&path, op).map(Vec::len).sum()),
                    Op::Ne(_) | Op::Nin(_) | Op::Exists(_) => None,
                }
            }
        }
    }

    /// The joined path of a condition's key (`None` for `_id` and keys holding [`SEP`]).
    fn path(&self, key: &[String]) -> Option<String> {
        if key.is_empty() || (key.len() == 1 && key[0] == "_id") || key.iter().any(|k| k.contains(SEP)) {
            return None;
        }
        Some(key.join(&SEP.to_string()))
    }

    /// Keys whose value at `path` equals `x`; `None` when `x` is not an indexed kind.
    fn exact(&self, path: &str, x: &Value) -> Option<&[u64]> {
        let s = scalar(x)?;
        Some(self.values.get(path).and_then(|m| m.get(&s)).map_or(&[], Vec::as_slice))
    }

    fn range<'a>(&'a self, path: &str, op: &Op) -> Box<dyn Iterator<Item = &'a Vec<u64>> + 'a> {
        use std::ops::Bound::*;
        let Op::Range { gt, gte, lt, lte } = op else { return Box::new(std::iter::empty()) };
        let Some(tree) = self.numbers.get(path) else { return Box::new(std::iter::empty()) };
        // The tightest of each side's bounds.
        let low = match (gt, gte) {
            (Some(a), Some(b)) if a >= b => Excluded(ordered(*a)),
            (_, Some(b)) => Included(ordered(*b)),
            (Some(a), None) => Excluded(ordered(*a)),
            (None, None) => Unbounded,
        };
        let high = match (lt, lte) {
            (Some(a), Some(b)) if a <= b => Excluded(ordered(*a)),
            (_, Some(b)) => Included(ordered(*b)),
            (Some(a), None) => Excluded(ordered(*a)),
            (None, None) => Unbounded,
        };
        let empty = match (&low, &high) {
            (Included(a) | Excluded(a), Included(b) | Excluded(b)) if a > b => true,
            (Excluded(a), Excluded(b)) | (Included(a), Excluded(b)) | (Excluded(a), Included(b)) if a == b => true,
            _ => false,
        };
        if empty {
            return Box::new(std::iter::empty());
        }
        Box::new(tree.range((low, high)).map(|(_, v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn metadata() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..4).prop_map(|i| json!(i)),
            (-3i64..4).prop_map(|i| json!(i as f64 / 2.0)),
            prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(|s| json!(s)),
        ];
        let value = prop_oneof![
            3 => scalar.clone(),
            1 => prop::collection::vec(scalar.clone(), 0..4).prop_map(Value::Array),
            1 => (scalar.clone(), scalar.clone()).prop_map(|(a, b)| json!({"x": a, "y": b})),
        ];
        prop::collection::btree_map(prop_oneof![Just("p"), Just("q"), Just("r")], value, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    fn filter() -> impl Strategy<Value = Filter> {
        let key = prop_oneof![Just("p"), Just("q"), Just("p.x"), Just("r.y"), Just("_id")];
        let val = prop_oneof![
            Just(json!(1)),
            Just(json!(1.0)),
            Just(json!(-0.0)),
            Just(json!("a")),
            Just(json!(true)),
            Just(json!(null))
        ];
        let bound = prop::option::of((-4i64..5).prop_map(|i| i as f64 / 2.0));
        let cond = prop_oneof![
            (key.clone(), val.clone()).prop_map(|(k, v)| json!({"key": k, "eq": v})),
            (key.clone(), prop::collection::vec(val.clone(), 1..3)).prop_map(|(k, v)| json!({"key": k, "in": v})),
            (key.clone(), val.clone()).prop_map(|(k, v)| json!({"key": k, "ne": v})),
            (key.clone(), bound.clone(), bound.clone(), bound.clone(), bound).prop_filter_map(
                "a range needs a bound",
                |(k, a, b, c, d)| {
                    let mut o = json!({"key": k});
                    for (name, x) in [("gt", a), ("gte", b), ("lt", c), ("lte", d)] {
                        if let Some(x) = x {
                            o[name] = json!(x);
                        }
                    }
                    (o.as_object().unwrap().len() > 1).then_some(o)
                }
            ),
        ];
        let cond = cond.prop_map(|v| Filter::parse(&v).unwrap());
        cond.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..3).prop_map(Filter::And),
                prop::collection::vec(inner.clone(), 1..3).prop_map(Filter::Or),
                inner.prop_map(|f| Filter::Not(Box::new(f))),
            ]
        })
    }

    proptest! {
        /// Whenever the index answers, its answer holds every matching chunk, and its count
        /// is the answer's size.
        #[test]
        fn candidates_hold_every_match(docs in prop::collection::vec(metadata(), 0..40), f in filter()) {
            let mut index = PayloadIndex::default();
            for (k, m) in docs.iter().enumerate() {
                index.add(k as u64, m);
            }
            if let Some(found) = index.candidates(&f) {
                prop_assert_eq!(index.count(&f), Some(found.len()));
                let found: std::collections::HashSet<u64> = found.into_iter().collect();
                for (k, m) in docs.iter().enumerate() {
                    if f.matches(&format!("d{k}"), m) {
                        prop_assert!(found.contains(&(k as u64)), "chunk {} of {:?} missed by {:?}", k, m, f);
                    }
                }
            }
        }
    }

    #[test]
    fn selective_conditions_are_answered_narrowly() {
        let mut index = PayloadIndex::default();
        for k in 0..1000u64 {
            index.add(k, &json!({"bucket": k % 100, "lang": if k % 2 == 0 { "en" } else { "de" }, "tags": ["x", "y"]}));
        }
        let f = |v: Value| Filter::parse(&v).unwrap();
        assert_eq!(index.count(&f(json!({"key": "bucket", "eq": 7}))), Some(10));
        assert_eq!(index.count(&f(json!({"key": "bucket", "lt": 3}))), Some(30));
        assert_eq!(index.count(&f(json!({"key": "bucket", "gt": 97.5}))), Some(20));
        assert_eq!(index.count(&f(json!({"key": "tags", "eq": "y"}))), Some(1000));
        // An `and` is answered by its narrowest indexed part.
        let both = f(json!({"and": [{"key": "lang", "eq": "en"}, {"key": "bucket", "in": [4, 5]}]}));
        assert_eq!(index.count(&both), Some(20));
        assert_eq!(index.candidates(&both).unwrap().len(), 20);
        // What the index cannot answer.
        assert_eq!(index.count(&f(json!({"key": "lang", "ne": "en"}))), None);
        assert_eq!(index.count(&f(json!({"key": "_id", "eq": "d1"}))), None);
        assert_eq!(index.count(&f(json!({"key": "lang", "eq": "x".repeat(MAX_STRING + 1)}))), None);
    }
}
