//! The registry end to end on disk: golden renders of the shipped templates, validation
//! errors with their variable and line, versions and labels (rollback) surviving a
//! reopen, and the statistics of a seeded A/B split.
//!
//! Golden files live in `tests/golden/`; `UPDATE_GOLDEN=1 cargo test -p ragway-prompts`
//! rewrites them after an intended change (review the diff).

use ragway_prompts::registry::{key_of, uniform_from_key, Arm};
use ragway_prompts::{FewShotMode, PromptError, Registry, Template};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

fn vars(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing; run with UPDATE_GOLDEN=1 to create it", path.display()));
    assert_eq!(actual, expected, "render of `{name}` changed; if intended, rerun with UPDATE_GOLDEN=1");
}

fn render_text(reg: &Registry, reference: &str, v: Value, mode: Option<FewShotMode>) -> String {
    let r = reg.resolve(reference).unwrap();
    let out = reg.render(&r, &vars(v), mode, None, None).unwrap();
    let mut s = String::new();
    for m in out.into_messages() {
        s.push_str(&format!("<<{}>>\n{}\n", m.role, m.content));
    }
    s
}

#[test]
fn shipped_templates_render_as_their_snapshots() {
    let reg = Registry::open(&[], None).unwrap();
    let names: Vec<String> = reg.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["classify", "hallucination-judge", "rag-answer", "rag-condense-question", "summarize"]);
    golden(
        "rag-answer",
        &render_text(
            &reg,
            "rag-answer",
            json!({"question": "Which magazine was started first, Arthur's Magazine or First for Women?",
                   "passages": [
                       {"index": 1, "title": "Arthur's Magazine", "text": "Arthur's Magazine (1844–1846) was an American literary periodical published in Philadelphia in the 19th century."},
                       {"index": 2, "text": "First for Women is a woman's magazine published by Bauer Media Group in the USA. The magazine was started in 1989."}
                   ]}),
            None,
        ),
    );
    golden(
        "rag-condense-question",
        &render_text(
            &reg,
            "rag-condense-question",
            json!({"history": [{"role": "user", "content": "Who founded Bauer Media Group?"},
                               {"role": "assistant", "content": "Ludwig Bauer, in 1875."}],
                   "question": "Where is it based?"}),
            None,
        ),
    );
    golden("summarize", &render_text(&reg, "summarize", json!({"text": "Ragway serves embeddings and chat completions. It also stores vectors."}), None));
    golden(
        "summarize-max-words",
        &render_text(&reg, "summarize:production", json!({"text": "Short text.", "max_words": 12}), None),
    );
    golden(
        "classify-fixed",
        &render_text(&reg, "classify@1", json!({"text": "The fries were soggy."}), Some(FewShotMode::Fixed)),
    );
    golden("classify-zero", &render_text(&reg, "classify", json!({"text": "The fries were soggy.", "labels": ["food", "service"]}), Some(FewShotMode::Zero)));
    golden(
        "hallucination-judge",
        &render_text(
            &reg,
            "hallucination-judge",
            json!({"knowledge": "First for Women was started in 1989.", "question": "When was First for Women started?", "answer": "1975"}),
            None,
        ),
    );
}

#[test]
fn similar_few_shot_picks_the_nearest_examples_last() {
    let reg = Registry::open(&[], None).unwrap();
    let r = reg.resolve("classify").unwrap();
    // A bag-of-words embedder: enough to make similarity well defined and checkable.
    let vocab = ["pizza", "soup", "waiter", "battery", "package", "meeting", "food", "staff"];
    let embed = |texts: &[String]| -> ragway_prompts::Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let t = t.to_lowercase();
                vocab.iter().map(|w| if t.contains(w) { 1.0 } else { 0.0 }).collect()
            })
            .collect())
    };
    let v = vars(json!({"text": "The soup and the pizza were great, the waiter less so."}));
    let ex = reg.examples(&r.version.template, &v, None, Some(2), Some(&embed)).unwrap();
    let inputs: Vec<&str> = ex.iter().map(|e| e.input.as_str()).collect();
    // The soup example shares two words (soup, waiter), the pizza one one: most similar last.
    assert_eq!(inputs, ["Best pizza I have had in years, and friendly staff too.", "The soup was cold and the waiter was rude."]);
    // Without an embedder, similar mode is a clear error.
    let err = reg.examples(&r.version.template, &v, None, None, None).unwrap_err();
    assert!(matches!(err, PromptError::Invalid { ref param, .. } if param == "fewshot.mode"), "{err:?}");
}

fn invalid(source: &str) -> (String, Option<usize>, String) {
    match Template::parse(source) {
        Err(PromptError::Invalid { param, line, message }) => (param, line, message),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn validation_errors_name_the_variable_and_line() {
    // Undeclared variable, on line 8 of the file.
    let (param, line, msg) = invalid("+++\nname = \"t\"\nkind = \"text\"\nversion = 1\n[variables.question]\ntype = \"string\"\n+++\nHello {{ questoin }}\n");
    assert_eq!((param.as_str(), line), ("variables.questoin", Some(8)), "{msg}");
    // Syntax error: an unclosed block, reported on its line.
    let (param, line, msg) = invalid("+++\nname = \"t\"\nkind = \"text\"\n+++\nline one\n{% for x in [1] %}\n{{ x }\n");
    assert_eq!(param, "template");
    assert!(line.is_some_and(|l| l >= 5), "{line:?} {msg}");
    // Header TOML error, with its line.
    let (param, line, _) = invalid("+++\nname = \"t\"\nkind = \"text\"\nversion = \"one\"\n+++\nx\n");
    assert_eq!((param.as_str(), line), ("source", Some(4)));
    // A default of the wrong type.
    let (param, _, _) = invalid("+++\nname = \"t\"\nkind = \"text\"\n[variables.n]\ntype = \"integer\"\ndefault = \"ten\"\n+++\n{{ n }}\n");
    assert_eq!(param, "variables.n.default");
    // Unknown header keys are refused (a typo must not pass silently).
    let (param, _, msg) = invalid("+++\nname = \"t\"\nkind = \"text\"\ntemprature = 0.1\n+++\nx\n");
    assert_eq!(param, "source");
    assert!(msg.contains("temprature"), "{msg}");
    // Similar few-shot needs an input variable that exists.
    let (param, _, _) = invalid("+++\nname = \"t\"\nkind = \"text\"\n[fewshot]\nmode = \"similar\"\ninput = \"text\"\nexamples = [{input = \"a\", output = \"b\"}]\n+++\nx\n");
    assert_eq!(param, "fewshot.input");
    // A reference to a few-shot set nobody defined: refused when the template is added.
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(&[], Some(dir.path().join("store"))).unwrap();
    let t = Template::parse("+++\nname = \"t\"\nkind = \"text\"\n[fewshot]\nset = \"nope\"\n+++\nx\n").unwrap();
    match reg.create(t) {
        Err(PromptError::Invalid { param, message, .. }) => {
            assert_eq!(param, "fewshot.set");
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn render_checks_variables_and_is_sandboxed() {
    let reg = Registry::open(&[], None).unwrap();
    let r = reg.resolve("summarize").unwrap();
    let err = |v: Value| match reg.render(&r, &vars(v), None, None, None) {
        Err(PromptError::Invalid { param, message, .. }) => (param, message),
        other => panic!("{other:?}"),
    };
    assert_eq!(err(json!({})).0, "variables.text");
    assert_eq!(err(json!({"text": "x", "max_words": "ten"})).0, "variables.max_words");
    assert_eq!(err(json!({"text": "x", "colour": "red"})).0, "variables.colour");
    // Sandbox: no file access (include has no loader), bounded loops and output.
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(&[], Some(dir.path().to_path_buf())).unwrap();
    for (name, body) in [
        ("inc", "{% include '/etc/passwd' %}"),
        ("loop", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
        ("big", "{% for i in range(50000) %}{{ text }}{% endfor %}"),
    ] {
        let src = format!("+++\nname = \"{name}\"\nkind = \"text\"\n[variables.text]\ntype = \"string\"\n+++\n{{{{ text }}}}{body}\n");
        let (v, _) = reg.create(Template::parse(&src).unwrap()).unwrap();
        let r = reg.resolve(v.template.name()).unwrap();
        let res = reg.render(&r, &vars(json!({"text": "x".repeat(100)})), None, None, None);
        assert!(matches!(res, Err(PromptError::Invalid { .. })), "{name}: {res:?}");
    }
}

const V1: &str = "+++\nname = \"greet\"\nkind = \"text\"\nlabels = [\"production\"]\n[variables.who]\ntype = \"string\"\n+++\nHello {{ who }}!";
const V2: &str = "+++\nname = \"greet\"\nkind = \"text\"\nlabels = [\"staging\"]\n[variables.who]\ntype = \"string\"\n+++\nGood day, {{ who }}.";

fn text_of(reg: &Registry, reference: &str) -> String {
    let r = reg.resolve(reference).unwrap();
    match reg.render(&r, &vars(json!({"who": "Ada"})), None, None, None).unwrap() {
        ragway_prompts::Rendered::Text { text } => text,
        other => panic!("{other:?}"),
    }
}

#[test]
fn versions_are_immutable_and_labels_move_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("prompts");
    {
        let reg = Registry::open(&[], Some(store.clone())).unwrap();
        let (v1, new) = reg.create(Template::parse(V1).unwrap()).unwrap();
        assert!(new);
        assert_eq!(v1.template.version(), 1);
        // The same content again is idempotent; other content under the same number conflicts.
        let (_, new) = reg.create(Template::parse(&V1.replace("name = \"greet\"", "name = \"greet\"\nversion = 1")).unwrap()).unwrap();
        assert!(!new);
        let err = reg.create(Template::parse(&V2.replace("name = \"greet\"", "name = \"greet\"\nversion = 1")).unwrap());
        assert!(matches!(err, Err(PromptError::Conflict(_))), "{err:?}");
        let (v2, _) = reg.create(Template::parse(V2).unwrap()).unwrap();
        assert_eq!(v2.template.version(), 2);
        assert_eq!(text_of(&reg, "greet"), "Hello Ada!");
        assert_eq!(text_of(&reg, "greet:staging"), "Good day, Ada.");
        assert_eq!(text_of(&reg, "greet@1"), "Hello Ada!");
        assert_eq!(text_of(&reg, "greet:latest"), "Good day, Ada.");
        // Promote v2, then roll back by moving the label again.
        reg.set_label("greet", "production", 2).unwrap();
        assert_eq!(text_of(&reg, "greet"), "Good day, Ada.");
        reg.set_label("greet", "production", 1).unwrap();
        reg.set_label("greet", "canary", 2).unwrap();
        reg.delete_label("greet", "staging").unwrap();
        assert!(matches!(reg.resolve("greet:staging"), Err(PromptError::NotFound(_))));
        assert!(matches!(reg.set_label("greet", "production", 9), Err(PromptError::NotFound(_))));
        assert!(matches!(reg.set_label("greet", "latest", 1), Err(PromptError::Invalid { .. })));
        // Built-in templates cannot be deleted, but their labels can move to API versions.
        assert!(matches!(reg.delete("rag-answer"), Err(PromptError::Conflict(_))));
    }
    // Everything above survives a reopen (the store is the source of truth).
    let reg = Registry::open(&[], Some(store.clone())).unwrap();
    let d = reg.get("greet").unwrap();
    assert_eq!(d.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(d.labels.get("production"), Some(&1));
    assert_eq!(d.labels.get("canary"), Some(&2));
    assert_eq!(d.labels.get("staging"), None, "a deleted label stays deleted though v2's header sets it");
    assert_eq!(text_of(&reg, "greet"), "Hello Ada!");
    reg.delete("greet").unwrap();
    assert!(matches!(reg.resolve("greet"), Err(PromptError::NotFound(_))));
    drop(reg);
    let reg = Registry::open(&[], Some(store)).unwrap();
    assert!(reg.get("greet").is_err());
}

#[test]
fn prompt_directories_load_templates_and_few_shot_sets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("fewshot")).unwrap();
    std::fs::write(
        dir.path().join("fewshot/sentiment.jsonl"),
        "{\"input\": \"great\", \"output\": \"positive\"}\n{\"input\": \"awful\", \"output\": \"negative\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tone.prompt"),
        "+++\nname = \"tone\"\nversion = 3\nkind = \"chat\"\nlabels = [\"production\"]\n[variables.text]\ntype = \"string\"\n[fewshot]\nset = \"sentiment\"\nk = 2\n+++\n::system::\nLabel the tone.\n::examples::\n::user::\n{{ text }}\n",
    )
    .unwrap();
    let reg = Registry::open(&[dir.path().to_path_buf()], None).unwrap();
    let out = render_text(&reg, "tone", json!({"text": "meh"}), None);
    assert_eq!(out, "<<system>>\nLabel the tone.\n<<user>>\ngreat\n<<assistant>>\npositive\n<<user>>\nawful\n<<assistant>>\nnegative\n<<user>>\nmeh\n");
    // Read-only registry: writes are refused, not lost.
    assert!(matches!(reg.create(Template::parse(V1).unwrap()), Err(PromptError::Conflict(_))));
    // A bad file fails the load with its path and line.
    std::fs::write(dir.path().join("bad.prompt"), "+++\nname = \"bad\"\nversion = 1\nkind = \"text\"\n+++\n{{ nope }}\n").unwrap();
    let err = Registry::open(&[dir.path().to_path_buf()], None).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bad.prompt:6") && err.contains("nope"), "{err}");
}

#[test]
fn seeded_split_matches_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(&[], Some(dir.path().to_path_buf())).unwrap();
    reg.create(Template::parse(V1).unwrap()).unwrap();
    reg.create(Template::parse(V2).unwrap()).unwrap();
    let arms = [Arm { target: "production".into(), weight: 90.0 }, Arm { target: "staging".into(), weight: 10.0 }];
    let n = 20_000;
    let mut staging = 0;
    for i in 0..n {
        let r = reg.choose("greet", &arms, uniform_from_key(key_of(&format!("user-{i}")))).unwrap();
        if r.number() == 2 {
            assert_eq!(r.label.as_deref(), Some("staging"));
            staging += 1;
        }
    }
    // Binomial(20000, 0.1): sd ≈ 42; 5 sd either side.
    let share = staging as f64 / n as f64;
    assert!((share - 0.1).abs() < 0.0106, "staging share {share}");
    // The same key always lands on the same arm.
    let u = uniform_from_key(key_of("user-7"));
    let first = reg.choose("greet", &arms, u).unwrap().number();
    assert!((0..10).all(|_| reg.choose("greet", &arms, u).unwrap().number() == first));
    // Version arms and bad weights.
    let r = reg.choose("greet", &[Arm { target: "@2".into(), weight: 1.0 }], 0.5).unwrap();
    assert_eq!(r.number(), 2);
    assert!(reg.choose("greet", &[Arm { target: "production".into(), weight: -1.0 }], 0.5).is_err());
}

/// Audit finding 4: a version whose header held a `+++` line (or whose whole file exceeded
/// the size checked at creation) was accepted, then stopped the server from ever starting.
#[test]
fn stored_versions_round_trip_and_a_bad_stored_file_never_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("prompts");
    let reg = Registry::open(&[], Some(store.clone())).unwrap();
    // A description whose TOML form puts a `+++` line inside the header.
    let mut t = Template::parse(V1).unwrap();
    let mut header = t.header.clone();
    header.description = "first line\n+++\nthird line".into();
    t = Template::from_parts(header, "Hello {{ who }}!".into()).unwrap();
    let err = reg.create(t).unwrap_err();
    assert!(matches!(&err, PromptError::Invalid { param, .. } if param == "template"), "{err:?}");
    // A body under the limit whose header pushes the whole file over it.
    let mut header = Template::parse(V1).unwrap().header;
    header.description = "d".repeat(100 * 1024);
    let body = format!("Hello {{{{ who }}}}!{}", " ".repeat(60 * 1024));
    let err = reg.create(Template::from_parts(header, body).unwrap()).unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");
    // Nothing of either reached the store, and a good version still does.
    reg.create(Template::parse(V1).unwrap()).unwrap();
    drop(reg);
    // A stored file damaged on disk (or written by anything else) is reported and skipped.
    std::fs::write(store.join("greet").join("7.prompt"), "+++\nname = \"greet\"\n+++\n+++\nbroken").unwrap();
    std::fs::create_dir_all(store.join("other")).unwrap();
    std::fs::write(store.join("other").join("1.prompt"), [0xff, 0xfe, 0x00]).unwrap();
    std::fs::write(store.join("other").join("labels.json"), "{not json").unwrap();
    let reg = Registry::open(&[], Some(store)).expect("start-up survives bad stored files");
    assert_eq!(text_of(&reg, "greet@1"), "Hello Ada!");
    let skipped = reg.skipped();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("7.prompt")), "{skipped:?}");
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Audit finding 12: the output cap was checked after rendering, so a loop over a large
/// variable built hundreds of megabytes before being refused. It is now a capped writer.
#[test]
fn a_render_stops_at_the_output_cap_instead_of_building_the_whole_output() {
    let source = "+++\nname = \"loop\"\nkind = \"text\"\n[variables.chunk]\ntype = \"string\"\n+++\n\
                  {% for i in range(4000) %}{{ chunk }}{% endfor %}";
    let t = Template::parse(source).unwrap();
    // 4,000 x 100 KB = 400 MB if built whole.
    let chunk = "x".repeat(100 * 1024);
    let before = peak_rss();
    let err = t.render(&vars(json!({ "chunk": chunk })), &[]).unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(err.to_string().contains("larger than"), "{err}");
    assert!(grown < 64 << 20, "rendering grew the peak memory by {} MB", grown >> 20);
}
