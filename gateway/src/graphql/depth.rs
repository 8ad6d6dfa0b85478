//! The query depth limit, with introspection counted apart: the standard introspection query
//! (what GraphiQL, Apollo codegen and `gql` send) nests `ofType` about ten levels deep, over
//! the limit that keeps ordinary queries cheap. Introspection only reads the schema, so its
//! own, larger limit applies below `__schema` and `__type`; every other path keeps the
//! configured one. Fragments are walked once each (memoized), so a document that spreads
//! fragments into each other many times costs no more to check than its size.

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ServerError, ServerResult, Variables};
use std::collections::HashMap;
use std::sync::Arc;

/// Deepest introspection path accepted (the standard query needs about 13).
pub const MAX_INTROSPECTION_DEPTH: usize = 24;

/// The extension (see the module docs).
pub struct DepthLimit {
    pub max: usize,
}

impl ExtensionFactory for DepthLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(DepthCheck { max: self.max })
    }
}

struct DepthCheck {
    max: usize,
}

/// The deepest ordinary path and the deepest introspection path below a selection set.
#[derive(Clone, Copy, Default)]
struct Depths {
    plain: usize,
    introspection: usize,
}

struct Walker<'a> {
    doc: &'a ExecutableDocument,
    memo: HashMap<(&'a str, bool), Depths>,
    /// Fragments being walked (a cycle, which validation refuses later, stops here).
    open: Vec<&'a str>,
}

impl<'a> Walker<'a> {
    fn set(&mut self, set: &'a SelectionSet, in_introspection: bool) -> Depths {
        let mut out = Depths::default();
        for item in &set.items {
            let d = match &item.node {
                Selection::Field(f) => {
                    let intro = in_introspection || f.node.name.node.starts_with("__");
                    let below = self.set(&f.node.selection_set.node, intro);
                    let deepest = 1 + below.plain.max(below.introspection);
                    if intro {
                        Depths { plain: 0, introspection: deepest }
                    } else {
                        Depths { plain: 1 + below.plain, introspection: if below.introspection > 0 { 1 + below.introspection } else { 0 } }
                    }
                }
                Selection::InlineFragment(i) => self.set(&i.node.selection_set.node, in_introspection),
                Selection::FragmentSpread(s) => {
                    let name = s.node.fragment_name.node.as_str();
                    if let Some(d) = self.memo.get(&(name, in_introspection)) {
                        *d
                    } else if self.open.contains(&name) {
                        Depths::default()
                    } else if let Some(fragment) = self.doc.fragments.get(&s.node.fragment_name.node) {
                        self.open.push(name);
                        let d = self.set(&fragment.node.selection_set.node, in_introspection);
                        self.open.pop();
                        self.memo.insert((name, in_introspection), d);
                        d
                    } else {
                        Depths::default()
                    }
                }
            };
            out.plain = out.plain.max(d.plain);
            out.introspection = out.introspection.max(d.introspection);
        }
        out
    }
}

/// Checks a parsed document against the limits.
pub fn check(doc: &ExecutableDocument, max: usize) -> Result<(), String> {
    let mut walker = Walker { doc, memo: HashMap::new(), open: Vec::new() };
    for (_, op) in doc.operations.iter() {
        let d = walker.set(&op.node.selection_set.node, false);
        if d.plain > max {
            return Err(format!("the query is nested too deep ({} levels; the limit is {max})", d.plain));
        }
        if d.introspection > MAX_INTROSPECTION_DEPTH {
            return Err(format!(
                "the introspection query is nested too deep ({} levels; the limit is {MAX_INTROSPECTION_DEPTH})",
                d.introspection
            ));
        }
    }
    Ok(())
}

#[async_graphql::async_trait::async_trait]
impl Extension for DepthCheck {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        check(&doc, self.max).map_err(|m| ServerError::new(m, None))?;
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(query: &str, max: usize) -> Option<String> {
        check(&async_graphql::parser::parse_query(query).unwrap(), max).err()
    }

    #[test]
    fn introspection_has_its_own_limit_and_plain_queries_keep_theirs() {
        // The TypeRef fragment of graphql-js's introspection query: ofType nine levels deep.
        let mut type_ref = String::from("kind name");
        for _ in 0..9 {
            type_ref = format!("kind name ofType {{ {type_ref} }}");
        }
        let standard = format!(
            "query IntrospectionQuery {{ __schema {{ queryType {{ name }} types {{ ...FullType }} }} }}
             fragment FullType on __Type {{ kind name fields(includeDeprecated: true) {{ name args {{ ...InputValue }} type {{ ...TypeRef }} }}
               inputFields {{ ...InputValue }} interfaces {{ ...TypeRef }} possibleTypes {{ ...TypeRef }} }}
             fragment InputValue on __InputValue {{ name type {{ ...TypeRef }} defaultValue }}
             fragment TypeRef on __Type {{ {type_ref} }}"
        );
        assert_eq!(depth_error(&standard, 12), None);
        let mut deep = String::from("name");
        for _ in 0..40 {
            deep = format!("ofType {{ {deep} }}");
        }
        assert!(depth_error(&format!("{{ __type(name: \"Query\") {{ {deep} }} }}"), 12).unwrap().contains("introspection"));
        assert!(depth_error("{ a { b { c { d } } } }", 3).unwrap().contains("4 levels"));
        assert_eq!(depth_error("{ a { b { c } } }", 3), None);
        // A fragment spread into itself ends the walk instead of looping.
        assert_eq!(depth_error("{ a { ...F } } fragment F on T { b { ...F } }", 5), None);
    }

    #[test]
    fn a_fragment_bomb_is_checked_in_linear_time() {
        let mut q = String::from("{ a { ...F39 } } fragment F0 on T { x }");
        for i in 1..40 {
            q.push_str(&format!(" fragment F{i} on T {{ x1: y {{ ...F{} }} x2: y {{ ...F{} }} }}", i - 1, i - 1));
        }
        // 2^40 paths if walked naively; depth 41 here.
        assert!(depth_error(&q, 12).unwrap().contains("too deep"));
    }
}
