//! Text handling with the real Gemma tokenizer: <bos> exactly once, incremental detokenization
//! that never splits a character, the chat template with a folded system message.

use gemma_coordinator::chat::{ChatMessage, ChatTemplate};
use gemma_coordinator::tokenizer::{IncrementalDecoder, TextTokenizer};
use gemma_testkit::{add_tokenizer, tokenizer_dir};

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&tokenizer_dir(), 2, 1).expect("run scripts/fetch-tokenizer.sh")
}

#[test]
fn bos_exactly_once() {
    let tok = tokenizer();
    let plain = tok.encode_prompt("Hello world").expect("encode");
    let with_bos = tok.encode_prompt("<bos>Hello world").expect("encode");
    assert_eq!(plain[0], 2);
    assert_eq!(
        plain, with_bos,
        "a prompt that starts with <bos> gets no second one"
    );
    assert_eq!(plain.iter().filter(|&&t| t == 2).count(), 1);
    assert_eq!(
        tok.stop_ids(),
        &[1, 107],
        "<eos> and <end_of_turn> stop generation"
    );
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let tok = tokenizer();
    let text = "Grüße 🎉🚀 naïve café — 世界 ∑ 🫨 𓀀 𐍈 done";
    let ids = tok.encode_prompt(text).expect("encode");
    // 🫨, 𓀀 and 𐍈 are not in the vocabulary: they fall back to one token per UTF-8 byte.
    let mut dec = IncrementalDecoder::default();
    let mut out = String::new();
    let mut pieces = Vec::new();
    for &id in &ids[1..] {
        let piece = dec.push(&tok, id).expect("push");
        assert!(
            !piece.contains('\u{FFFD}'),
            "piece {piece:?} split a character"
        );
        out.push_str(&piece);
        pieces.push(piece);
    }
    out.push_str(&dec.flush(&tok).expect("flush"));
    assert_eq!(out, tok.decode(&ids[1..]).expect("decode"));
    assert_eq!(out, text);
    assert!(
        pieces.iter().any(String::is_empty),
        "some ids completed no character yet"
    );
}

#[test]
fn chat_template_folds_the_system_message() {
    let dir = tempfile::tempdir().expect("tmp");
    add_tokenizer(dir.path()).expect("tokenizer");
    let chat = ChatTemplate::from_dir(dir.path())
        .expect("load")
        .expect("template");
    let msg = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let text = chat
        .render(&[
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("user", "Bye"),
        ])
        .expect("render");
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    let e = chat
        .render(&[msg("user", "a"), msg("user", "b")])
        .expect_err("roles must alternate");
    assert!(e.to_string().contains("alternate"), "{e}");
    let e = chat.render(&[msg("tool", "x")]).expect_err("unknown role");
    assert!(
        e.to_string().contains("role \"tool\" is not supported"),
        "{e}"
    );
}
