//! Metadata filters, applied to both halves of a search and to delete-by-filter.
//!
//! JSON shape (documented in the README):
//!
//! ```json
//! {"and": [
//!   {"key": "year", "gte": 2000, "lt": 2010},
//!   {"or": [{"key": "lang", "eq": "en"}, {"key": "tags", "in": ["a", "b"]}]},
//!   {"not": {"key": "draft", "eq": true}}
//! ]}
//! ```
//!
//! `key` is a dotted path into the document's metadata; `_id` is the document id. A condition
//! on an array value matches when any element matches (as in Qdrant and Elasticsearch).
//! Conditions: `eq`, `ne`, `in`, `nin`, `gt`, `gte`, `lt`, `lte` (numbers; one condition may
//! carry several bounds), `exists` (true/false).

use crate::error::{IndexError, Result};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Cond { key: Vec<String>, op: Op },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Range { gt: Option<f64>, gte: Option<f64>, lt: Option<f64>, lte: Option<f64> },
    Exists(bool),
}

impl Filter {
    /// Parses a filter; errors name the offending part (`filter.and[1].gte`).
    pub fn parse(value: &Value) -> Result<Filter> {
        parse_at(value, "filter")
    }

    /// Evaluates the filter against a document's id and metadata.
    pub fn matches(&self, doc_id: &str, metadata: &Value) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc_id, metadata)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc_id, metadata)),
            Filter::Not(f) => !f.matches(doc_id, metadata),
            Filter::Cond { key, op } => {
                let id_value;
                let found = if key.len() == 1 && key[0] == "_id" {
                    id_value = Value::String(doc_id.to_string());
                    Some(&id_value)
                } else {
                    lookup(metadata, key)
                };
                eval(op, found)
            }
        }
    }
}

fn lookup<'a>(mut v: &'a Value, path: &[String]) -> Option<&'a Value> {
    for part in path {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

/// Values that a condition compares: an array matches when any element does.
fn candidates(v: &Value) -> Box<dyn Iterator<Item = &Value> + '_> {
    match v {
        Value::Array(items) => Box::new(items.iter()),
        other => Box::new(std::iter::once(other)),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // 3 == 3.0, as JSON means it.
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn eval(op: &Op, found: Option<&Value>) -> bool {
    match op {
        Op::Exists(want) => found.is_some_and(|v| !v.is_null()) == *want,
        Op::Eq(x) => found.is_some_and(|v| candidates(v).any(|c| equal(c, x))),
        Op::Ne(x) => !found.is_some_and(|v| candidates(v).any(|c| equal(c, x))),
        Op::In(xs) => found.is_some_and(|v| candidates(v).any(|c| xs.iter().any(|x| equal(c, x)))),
        Op::Nin(xs) => !found.is_some_and(|v| candidates(v).any(|c| xs.iter().any(|x| equal(c, x)))),
        Op::Range { gt, gte, lt, lte } => found.is_some_and(|v| {
            candidates(v).any(|c| {
                let Some(n) = c.as_f64() else { return false };
                gt.is_none_or(|b| n > b)
                    && gte.is_none_or(|b| n >= b)
                    && lt.is_none_or(|b| n < b)
                    && lte.is_none_or(|b| n <= b)
            })
        }),
    }
}

fn parse_at(value: &Value, at: &str) -> Result<Filter> {
    let obj = value.as_object().ok_or_else(|| IndexError::invalid(at, format!("`{at}` must be an object")))?;
    if let Some(list) = obj.get("and").or_else(|| obj.get("or")) {
        let which = if obj.contains_key("and") { "and" } else { "or" };
        if obj.len() != 1 {
            return Err(IndexError::invalid(at, format!("`{at}` must hold `{which}` alone")));
        }
        let items = list
            .as_array()
            .ok_or_else(|| IndexError::invalid(format!("{at}.{which}"), format!("`{at}.{which}` must be an array")))?;
        let parsed = items
            .iter()
            .enumerate()
            .map(|(i, v)| parse_at(v, &format!("{at}.{which}[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        return Ok(if which == "and" { Filter::And(parsed) } else { Filter::Or(parsed) });
    }
    if let Some(inner) = obj.get("not") {
        if obj.len() != 1 {
            return Err(IndexError::invalid(at, format!("`{at}` must hold `not` alone")));
        }
        return Ok(Filter::Not(Box::new(parse_at(inner, &format!("{at}.not"))?)));
    }
    let key = obj
        .get("key")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| IndexError::invalid(format!("{at}.key"), format!("`{at}` needs `and`, `or`, `not` or a string `key`")))?;
    let key: Vec<String> = key.split('.').map(str::to_string).collect();
    let mut op = None;
    let mut range = (None, None, None, None);
    let mut has_range = false;
    for (name, v) in obj {
        let param = format!("{at}.{name}");
        let number = |v: &Value| {
            v.as_f64().ok_or_else(|| IndexError::invalid(param.clone(), format!("`{param}` must be a number")))
        };
        let array = |v: &Value| {
            v.as_array().cloned().ok_or_else(|| IndexError::invalid(param.clone(), format!("`{param}` must be an array")))
        };
        let single = match name.as_str() {
            "key" => continue,
            "eq" => Op::Eq(v.clone()),
            "ne" => Op::Ne(v.clone()),
            "in" => Op::In(array(v)?),
            "nin" => Op::Nin(array(v)?),
            "exists" => Op::Exists(
                v.as_bool().ok_or_else(|| IndexError::invalid(param.clone(), format!("`{param}` must be a boolean")))?,
            ),
            "gt" | "gte" | "lt" | "lte" => {
                let n = number(v)?;
                match name.as_str() {
                    "gt" => range.0 = Some(n),
                    "gte" => range.1 = Some(n),
                    "lt" => range.2 = Some(n),
                    _ => range.3 = Some(n),
                }
                has_range = true;
                continue;
            }
            other => {
                return Err(IndexError::invalid(
                    param.clone(),
                    format!("unknown filter condition `{other}` (expected eq, ne, in, nin, gt, gte, lt, lte, exists)"),
                ))
            }
        };
        if op.replace(single).is_some() {
            return Err(IndexError::invalid(at, format!("`{at}` holds more than one condition; combine them with `and`")));
        }
    }
    let op = match (op, has_range) {
        (Some(_), true) => {
            return Err(IndexError::invalid(at, format!("`{at}` mixes a range with another condition; use `and`")))
        }
        (Some(op), false) => op,
        (None, true) => Op::Range { gt: range.0, gte: range.1, lt: range.2, lte: range.3 },
        (None, false) => return Err(IndexError::invalid(at, format!("`{at}` has a `key` but no condition"))),
    };
    Ok(Filter::Cond { key, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(v: Value) -> Filter {
        Filter::parse(&v).unwrap()
    }

    #[test]
    fn conditions_and_combinators() {
        let meta = json!({"year": 2005, "lang": "en", "tags": ["a", "x"], "nested": {"n": 3}, "draft": false});
        assert!(f(json!({"key": "year", "gte": 2000, "lt": 2010})).matches("d", &meta));
        assert!(!f(json!({"key": "year", "gt": 2005})).matches("d", &meta));
        assert!(f(json!({"key": "year", "eq": 2005.0})).matches("d", &meta));
        assert!(f(json!({"key": "tags", "in": ["b", "x"]})).matches("d", &meta));
        assert!(!f(json!({"key": "tags", "nin": ["a"]})).matches("d", &meta));
        assert!(f(json!({"key": "nested.n", "lte": 3})).matches("d", &meta));
        assert!(f(json!({"key": "missing", "ne": 1})).matches("d", &meta));
        assert!(!f(json!({"key": "missing", "exists": true})).matches("d", &meta));
        assert!(f(json!({"key": "_id", "in": ["d", "e"]})).matches("d", &meta));
        let combined = f(json!({"and": [
            {"or": [{"key": "lang", "eq": "de"}, {"key": "tags", "eq": "a"}]},
            {"not": {"key": "draft", "eq": true}}
        ]}));
        assert!(combined.matches("d", &meta));
        assert!(!combined.matches("d", &json!({"lang": "de", "draft": true})));
        // A string never satisfies a numeric range.
        assert!(!f(json!({"key": "lang", "gte": 0})).matches("d", &meta));
    }

    #[test]
    fn errors_name_the_part() {
        let err = |v: Value| match Filter::parse(&v).unwrap_err() {
            IndexError::InvalidRequest { param, .. } => param.unwrap(),
            e => panic!("{e}"),
        };
        assert_eq!(err(json!({"and": [{"key": "a", "eq": 1}, {"key": "b", "gte": "x"}]})), "filter.and[1].gte");
        assert_eq!(err(json!({"key": "a", "like": 1})), "filter.like");
        assert_eq!(err(json!({"key": "a"})), "filter");
        assert_eq!(err(json!({"or": {}})), "filter.or");
        assert_eq!(err(json!([1])), "filter");
        assert_eq!(err(json!({"key": "a", "eq": 1, "ne": 2})), "filter");
    }
}
