//! Property tests of the text path with the real Gemma tokenizer and chat template
//! (scripts/fetch-tokenizer.sh; `GEMMA_TOKENIZER_DIR` overrides where it is):
//! - the chat template renders any well-formed conversation exactly as Gemma's format says,
//!   whatever the messages hold (Unicode, template syntax such as `{{ 7 * 7 }}` or `{% for %}`:
//!   content is data, never evaluated), and any other conversation (roles, orders) is rendered
//!   or refused with a message, never a panic;
//! - incremental detokenization of any ids, out-of-vocabulary ones included, never panics and
//!   emits, pushed one by one and flushed, exactly the one-shot decode.
//!
//! Deterministic: a fixed seed and no persistence files.

mod common;

use common::tokenizer_dir;
use std::sync::OnceLock;

use gemma_coordinator::chat::{ChatError, ChatMessage, ChatTemplate};
use gemma_coordinator::tokenizer::{IncrementalDecoder, TextTokenizer};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x7E47_0001),
        ..Config::default()
    }
}

fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        TextTokenizer::from_dir(&tokenizer_dir(), 2, 1).expect("run scripts/fetch-tokenizer.sh")
    })
}

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        ChatTemplate::from_dir(&tokenizer_dir())
            .expect("tokenizer_config.json")
            .expect("Gemma's chat template")
    })
}

/// Message text: any Unicode, and pieces of template syntax and Gemma's turn markers.
fn content() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        ".{0,6}",
        prop::sample::select(vec![
            "{{",
            "}}",
            "{%",
            "%}",
            "{#",
            "#}",
            "{{ 7 * 7 }}",
            "{{ bos_token }}",
            "{% for m in messages %}x{% endfor %}",
            "{{ raise_exception('boom') }}",
            "{% set role = 'model' %}",
            "messages[0]['content']",
            "<start_of_turn>",
            "<end_of_turn>",
            "<bos>",
            "\n",
            " ",
            "\t",
            "\u{0}",
            "é",
            "🦀",
            "\u{202e}",
            "\\",
            "'",
            "\"",
        ])
        .prop_map(str::to_string),
    ];
    vec(piece, 0..8).prop_map(|p| p.concat())
}

/// A conversation the template accepts: maybe a system message, then user and assistant
/// turns alternating from user.
fn well_formed() -> impl Strategy<Value = Vec<ChatMessage>> {
    (proptest::option::of(content()), vec(content(), 1..6)).prop_map(|(system, turns)| {
        let mut messages: Vec<ChatMessage> = system
            .map(|content| ChatMessage {
                role: "system".to_string(),
                content,
            })
            .into_iter()
            .collect();
        for (i, content) in turns.into_iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(ChatMessage {
                role: role.to_string(),
                content,
            });
        }
        messages
    })
}

/// Gemma's format, written out by hand: the system text leads the first user turn; each turn's
/// text is trimmed; the model's turn is opened at the end.
fn expected(messages: &[ChatMessage]) -> String {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == "system" => (Some(&m.content), &messages[1..]),
        _ => (None, messages),
    };
    let mut out = String::from("<bos>");
    for (i, m) in turns.iter().enumerate() {
        let text = match (i, system) {
            (0, Some(system)) => format!("{system}\n\n{}", m.content),
            _ => m.content.clone(),
        };
        let role = if m.role == "assistant" {
            "model"
        } else {
            "user"
        };
        out.push_str(&format!(
            "<start_of_turn>{role}\n{}<end_of_turn>\n",
            text.trim()
        ));
    }
    out.push_str("<start_of_turn>model\n");
    out
}

fn any_conversation() -> impl Strategy<Value = Vec<ChatMessage>> {
    let role = prop_oneof![
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "developer",
            "tool",
            "",
            "model"
        ])
        .prop_map(str::to_string),
        ".{0,5}",
    ];
    vec(
        (role, content()).prop_map(|(role, content)| ChatMessage { role, content }),
        0..7,
    )
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn well_formed_conversations_render_exactly_and_never_evaluate_content(
        messages in well_formed()
    ) {
        let rendered = template().render(&messages);
        prop_assert_eq!(rendered.ok(), Some(expected(&messages)));
    }

    #[test]
    fn any_conversation_renders_or_is_refused_with_a_reason(messages in any_conversation()) {
        match template().render(&messages) {
            Ok(text) => {
                prop_assert!(text.starts_with("<bos><start_of_turn>user\n"));
                prop_assert!(text.ends_with("<start_of_turn>model\n"));
            }
            Err(e @ (ChatError::Messages(_) | ChatError::Render(_))) => {
                prop_assert!(e.to_string().len() > "messages: ".len(), "{}", e);
            }
            Err(e) => prop_assert!(false, "not a refusal of the messages: {}", e),
        }
    }

    #[test]
    fn incremental_decoding_of_any_ids_equals_the_one_shot_decode(ids in vec(
        prop_oneof![
            // Byte-fallback pieces (<0x00>..<0xFF>) and the special tokens around them.
            4 => 0u32..520,
            4 => 0u32..262_144,
            1 => 262_144u32..300_000,
            1 => any::<u32>(),
        ],
        0..24,
    )) {
        let tok = tokenizer();
        let mut decoder = IncrementalDecoder::default();
        let mut text = String::new();
        for &id in &ids {
            text.push_str(&decoder.push(tok, id).expect("decodes"));
        }
        text.push_str(&decoder.flush(tok).expect("flushes"));
        prop_assert_eq!(text, tok.decode(&ids).expect("decodes"));
    }
}
