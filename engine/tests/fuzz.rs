//! Property tests over chat-template rendering: a model's template (from a GGUF or
//! `--chat-template`, i.e. a file) and the messages of a request (untrusted) never panic the
//! renderer; and over the SentencePiece tokenizer: any vocabulary a GGUF file can hold and
//! any request text encode without panicking, and decode back to the text. CI runs proptest's default number of cases; `scripts/fuzz.sh` runs long
//! campaigns (`PROPTEST_CASES`).

use proptest::prelude::*;
use ragway_engine::generate::chat::{ChatMessage, ChatTemplate};
use ragway_engine::generate::spm::SentencePiece;

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

/// Pieces over a small alphabet (so that many pairs merge) with any scores and token types,
/// every `<0xXX>` byte piece, `▁` (as every SentencePiece vocabulary has: without it a space
/// falls back to the bytes of `▁` and reads back as `▁`, in llama.cpp too), and a few
/// control and user-defined pieces.
fn sentencepiece_vocab() -> impl Strategy<Value = (Vec<String>, Vec<f32>, Vec<i32>)> {
    let piece = "[ab▁é\\n]{1,4}";
    let score = prop_oneof![any::<f32>(), -10.0f32..0.0];
    prop::collection::vec((piece, score, 1i32..=5), 0..64).prop_map(|entries| {
        let mut pieces: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        let mut scores = vec![0.0; 256];
        let mut types = vec![6; 256];
        for (p, t) in [("▁", 1), ("<s>", 3), ("</s>", 3), ("<unk>", 2), ("<tool>", 4)] {
            pieces.push(p.into());
            scores.push(0.0);
            types.push(t);
        }
        for (p, s, t) in entries {
            pieces.push(p);
            scores.push(s);
            types.push(t);
        }
        (pieces, scores, types)
    })
}

proptest! {
    #[test]
    fn sentencepiece_encodes_any_text_and_decodes_it_back(
        (pieces, scores, types) in sentencepiece_vocab(),
        text in prop_oneof!["[ab é\\n<s>/tool]{0,40}", ".{0,40}"],
        space_prefix in any::<bool>(),
    ) {
        let n = pieces.len();
        let unk = pieces.iter().position(|p| p == "<unk>").map(|i| i as u32);
        let spm = SentencePiece::new(&pieces, scores, &types, unk, space_prefix).unwrap();
        let ids = spm.encode(&text).unwrap();
        prop_assert!(ids.iter().all(|&i| (i as usize) < n));
        let back = spm.decode(&ids, false);
        // `▁` in the text itself reads back as a space; a space prefix is added to every
        // stretch between special tokens and dropped only at the start.
        if !space_prefix && !text.contains('▁') {
            prop_assert_eq!(back, text);
        }
    }
}
