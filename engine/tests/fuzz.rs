//! Property tests over chat-template rendering: a model's template (from a GGUF or
//! `--chat-template`, i.e. a file) and the messages of a request (untrusted) never panic the
//! renderer. CI runs proptest's default number of cases; `scripts/fuzz.sh` runs long
//! campaigns (`PROPTEST_CASES`).

use proptest::prelude::*;
use ragway_engine::generate::chat::{ChatMessage, ChatTemplate};

/// ChatML, as SmolLM2's and Qwen's templates write it.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn template_source() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{% for message in messages %}".to_string()),
        Just("{% endfor %}".to_string()),
        Just("{{ message['content'] }}".to_string()),
        Just("{{ message.role | upper }}".to_string()),
        Just("{% if add_generation_prompt %}".to_string()),
        Just("{% endif %}".to_string()),
        Just("{{ raise_exception('no') }}".to_string()),
        Just("{{ bos_token }}".to_string()),
        Just("{% set x = messages[0]['content'] %}".to_string()),
        Just("{{ messages | length }}".to_string()),
        Just("{{ (messages | last).content.split(' ') | join('-') }}".to_string()),
        Just("{%".to_string()),
        ".{0,6}",
    ];
    prop::collection::vec(piece, 0..16).prop_map(|p| p.concat())
}

fn messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    let role = prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool"), "[a-z]{0,6}".prop_map(|s| Box::leak(s.into_boxed_str()) as &str)];
    prop::collection::vec((role, ".{0,64}").prop_map(|(r, c)| ChatMessage::new(r, c)), 0..8)
}

proptest! {
    #[test]
    fn chat_templates_render_any_messages_without_panicking(source in template_source(), msgs in messages(), gen in any::<bool>()) {
        if let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>") {
            let _ = t.render(&msgs, gen);
        }
        let chatml = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        match chatml.render(&msgs, gen) {
            Ok(out) => {
                for m in &msgs {
                    prop_assert!(out.contains(&m.content));
                }
            }
            // The one refusal a well-formed template leaves: no messages at all.
            Err(e) => prop_assert!(msgs.is_empty(), "{e}"),
        }
    }
}
