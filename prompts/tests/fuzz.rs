//! Property tests over template files (the API and the prompts directories hand ragway
//! arbitrary text) and the prompt store's round trip: no input panics, and whatever the
//! store accepts loads back, unchanged, after a restart. CI runs proptest's default number
//! of cases; `scripts/fuzz.sh` runs long campaigns (`PROPTEST_CASES`).

use proptest::prelude::*;
use ragway_prompts::{Registry, Template};
use serde_json::{json, Map, Value};

/// Text built from the pieces template files are made of, so that cases reach the parser's
/// and renderer's deeper paths instead of failing at the first line.
fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("+++\n".to_string()),
        Just("name = \"t\"\n".to_string()),
        Just("kind = \"chat\"\n".to_string()),
        Just("kind = \"text\"\n".to_string()),
        Just("[variables.x]\ntype = \"string\"\n".to_string()),
        Just("[variables.n]\ntype = \"integer\"\ndefault = 3\n".to_string()),
        Just("{% system %}".to_string()),
        Just("{% user %}".to_string()),
        Just("{% examples %}".to_string()),
        Just("{{ x }}".to_string()),
        Just("{% for i in range(n) %}{{ i }}{% endfor %}".to_string()),
        Just("{% if x %}".to_string()),
        Just("{% endif %}".to_string()),
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{#".to_string()),
        Just("\n".to_string()),
        ".{0,8}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

proptest! {
    /// Any text: parsing either succeeds or names what is wrong; a parsed template renders
    /// (or refuses) any variables without panicking.
    #[test]
    fn template_files_never_panic(source in template_text(), x in ".{0,40}", n in -5i64..50) {
        if let Ok(t) = Template::parse(&source) {
            let mut vars = Map::new();
            vars.insert("x".into(), Value::String(x));
            vars.insert("n".into(), json!(n));
            let _ = t.render(&vars, &[]);
            let _ = t.render(&Map::new(), &[]);
        }
    }

    /// Whatever the store accepts is read back, unchanged, by a new registry on the same
    /// store (what a restart does), whatever the header's text holds.
    #[test]
    fn the_prompt_store_round_trips(description in "(.|\n){0,80}", body in "[^{}%#]{1,60}") {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("prompts");
        let source = "+++\nname = \"fz\"\nkind = \"text\"\n+++\nHello";
        let mut header = Template::parse(source).unwrap().header;
        header.description = description;
        let Ok(t) = Template::from_parts(header, body) else { return Ok(()) };
        let reg = Registry::open(&[], Some(store.clone())).unwrap();
        let accepted = reg.create(t.clone());
        drop(reg);
        let reopened = Registry::open(&[], Some(store)).unwrap();
        prop_assert!(reopened.skipped().is_empty(), "{:?}", reopened.skipped());
        if let Ok((v, _)) = accepted {
            let back = reopened.resolve("fz@1").unwrap();
            prop_assert_eq!(&back.version.template.header.description, &t.header.description);
            prop_assert_eq!(&back.version.template.body, &v.template.body);
        }
    }
}
