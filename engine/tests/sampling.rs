//! Sampling as a pure function: greedy, seeds, penalties, top-k / top-p, logprobs; and
//! streamed text: multi-byte characters, stop sequences, held-back text.

// The reference and the fixtures convert small counts and ids; exact float results are intended.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::float_cmp,
    clippy::unnecessary_wraps
)]

use rand::SeedableRng;
use rand::rngs::StdRng;

use maas_engine::OutputFilter;
use maas_engine::sampling::{SamplingParams, TokenHistory, apply_penalties, argmax, candidates, logprobs, sample};
use maas_engine::stream::{CompiledFilter, Detokenizer, TextStream};

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

const LOGITS: [f32; 8] = [1.0, 3.0, -2.0, 2.5, 0.0, 2.9, -1.0, 0.5];

#[test]
fn greedy_is_the_argmax_whatever_the_seed() {
    let history = TokenHistory::default();
    for seed in 0..20 {
        let chosen = sample(&LOGITS, &SamplingParams::greedy(), &history, &mut rng(seed), None);
        assert_eq!(chosen.token_id, 1);
    }
    assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1, "the lowest index wins a tie");
}

#[test]
fn the_same_seed_draws_the_same_tokens_and_different_seeds_differ() {
    let params = SamplingParams { temperature: 1.5, seed: Some(7), ..SamplingParams::default() };
    let draw = |seed: u64| -> Vec<u32> {
        let mut generator = rng(seed);
        (0..64).map(|_| sample(&LOGITS, &params, &TokenHistory::default(), &mut generator, None).token_id).collect()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    // A high temperature reaches beyond the top token.
    assert!(draw(7).iter().any(|&token| token != 1));
}

#[test]
fn draws_follow_the_tempered_distribution() {
    let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4 and 3/4 at temperature 1
    let params = SamplingParams::default();
    let mut generator = rng(1);
    let ones = (0..4000)
        .filter(|_| sample(&logits, &params, &TokenHistory::default(), &mut generator, None).token_id == 1)
        .count();
    assert!((2850..3150).contains(&ones), "{ones} of 4000 draws were token 1, expected about 3000");
}

#[test]
fn penalties_change_logits_as_specified() {
    let mut history = TokenHistory::new(&[0, 2]); // prompt tokens
    history.push_output(3);
    history.push_output(3);
    history.push_output(4);

    // Repetition (CTRL): seen tokens (prompt and output) divided if positive, multiplied if not.
    let mut logits = LOGITS;
    apply_penalties(&mut logits, &SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() }, &history);
    assert_eq!(logits, [0.5, 3.0, -4.0, 1.25, 0.0, 2.9, -1.0, 0.5]);

    // Presence and frequency (OpenAI): output tokens only, n occurrences lose p + n * f.
    let mut logits = LOGITS;
    let params = SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..SamplingParams::default() };
    apply_penalties(&mut logits, &params, &history);
    assert_eq!(logits, [1.0, 3.0, -2.0, 2.5 - 0.5 - 0.5, 0.0 - 0.5 - 0.25, 2.9, -1.0, 0.5]);

    // They steer greedy decoding: penalising the top token hands the choice to the next.
    let mut history = TokenHistory::default();
    history.push_output(1);
    let params = SamplingParams { temperature: 0.0, presence_penalty: 1.0, ..SamplingParams::default() };
    assert_eq!(sample(&LOGITS, &params, &history, &mut rng(0), None).token_id, 5);
}

#[test]
fn top_k_and_top_p_restrict_the_candidates() {
    let tokens = |params: SamplingParams| -> Vec<u32> { candidates(&LOGITS, &params).iter().map(|c| c.0).collect() };
    assert_eq!(tokens(SamplingParams { top_k: 3, ..SamplingParams::default() }), [1, 5, 3]);
    assert_eq!(tokens(SamplingParams::default()).len(), 8);
    // Probabilities at temperature 1: 1 → 0.36, 5 → 0.32, 3 → 0.22, ...: 0.5 needs two.
    assert_eq!(tokens(SamplingParams { top_p: 0.5, ..SamplingParams::default() }), [1, 5]);
    assert_eq!(tokens(SamplingParams { top_p: 0.01, ..SamplingParams::default() }), [1]);
    assert_eq!(tokens(SamplingParams { top_k: 2, top_p: 0.99, ..SamplingParams::default() }), [1, 5]);
    let kept = candidates(&LOGITS, &SamplingParams { top_k: 3, ..SamplingParams::default() });
    assert!((kept.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6, "renormalised");

    // Draws never leave the candidate set.
    let params = SamplingParams { top_k: 2, temperature: 5.0, ..SamplingParams::default() };
    let mut generator = rng(3);
    for _ in 0..500 {
        let token = sample(&LOGITS, &params, &TokenHistory::default(), &mut generator, None).token_id;
        assert!(token == 1 || token == 5, "{token}");
    }

    // A large vocabulary takes the sorted-prefix path and agrees with a full sort.
    let large: Vec<f32> = (0..50_000).map(|i| ((i * 7919) % 10_007) as f32 / 1000.0).collect();
    let params = SamplingParams { top_p: 0.3, ..SamplingParams::default() };
    let kept = candidates(&large, &params);
    let mut sorted: Vec<f32> = large.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(large[kept[0].0 as usize], sorted[0]);
    assert!(kept.windows(2).all(|w| large[w[0].0 as usize] >= large[w[1].0 as usize]));
}

#[test]
fn logprobs_are_the_log_softmax_of_the_raw_logits() {
    let (chosen, top) = logprobs(&LOGITS, 3, 3);
    let total: f32 = LOGITS.iter().map(|l| l.exp()).sum();
    assert!((chosen - (LOGITS[3].exp() / total).ln()).abs() < 1e-5);
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 5, 3]);
    assert!((top[2].1 - chosen).abs() < 1e-6);
    let params = SamplingParams { repetition_penalty: 3.0, temperature: 0.0, ..SamplingParams::default() };
    let mut history = TokenHistory::default();
    history.push_output(1);
    let sampled = sample(&LOGITS, &params, &history, &mut rng(0), Some(2));
    assert_eq!(sampled.token_id, 5, "the penalty moved the choice");
    assert_eq!(sampled.top_logprobs[0].0, 1, "but logprobs are the model's own");
    assert!((sampled.logprob.unwrap() - top[1].1).abs() < 1e-6);
}

#[test]
fn parameters_out_of_range_are_named() {
    for (params, name) in [
        (SamplingParams { temperature: -1.0, ..SamplingParams::default() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..SamplingParams::default() }, "top_p"),
        (SamplingParams { repetition_penalty: 0.0, ..SamplingParams::default() }, "repetition_penalty"),
        (SamplingParams { frequency_penalty: 3.0, ..SamplingParams::default() }, "frequency_penalty"),
    ] {
        assert!(params.validate().unwrap_err().contains(name));
    }
    assert!(SamplingParams::default().validate().is_ok());
}

/// A byte-level vocabulary: token i is byte i.
fn decode_bytes(ids: &[u32]) -> Result<String, std::convert::Infallible> {
    let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn push_all(stream: &mut TextStream, text: &str) -> (Vec<String>, bool) {
    let mut pieces = Vec::new();
    for byte in text.bytes() {
        let step = stream.push(u32::from(byte), decode_bytes).unwrap();
        pieces.push(step.text);
        if step.stopped {
            return (pieces, true);
        }
    }
    (pieces, false)
}

#[test]
fn multi_byte_characters_are_released_whole() {
    let mut stream = TextStream::new(Vec::new());
    let (pieces, stopped) = push_all(&mut stream, "aé日🙂");
    assert!(!stopped);
    // 'a' at once; é (2 bytes), 日 (3) and 🙂 (4) only with their last byte.
    assert_eq!(pieces, ["a", "", "é", "", "", "日", "", "", "", "🙂"]);
    assert!(stream.is_settled());

    // Bytes that are not UTF-8 are not held back for ever: after four tokens they go out
    // as replacement characters.
    let mut stream = TextStream::new(Vec::new());
    let pieces: Vec<String> =
        [0xF0u32, 0x9F, 0xF0, 0x9F, 0xF0, 0x9F].iter().map(|&b| stream.push(b, decode_bytes).unwrap().text).collect();
    assert_eq!(pieces[..4].concat(), "");
    assert!(pieces.concat().starts_with('\u{FFFD}'), "{pieces:?}");

    // A token without text (special, or unknown to the tokenizer) does not hold anything.
    let decode_known = |ids: &[u32]| -> Result<String, std::convert::Infallible> {
        let bytes: Vec<u8> = ids.iter().filter(|&&id| id < 256).map(|&id| id as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let mut stream = TextStream::new(Vec::new());
    assert_eq!(stream.push(u32::from(b'a'), decode_known).unwrap().text, "a");
    assert_eq!(stream.push(1000, decode_known).unwrap().text, "");
    assert!(stream.is_settled());
    assert_eq!(stream.push(u32::from(b'b'), decode_known).unwrap().text, "b");

    // A character cut off by the end comes out as a replacement character.
    let mut stream = TextStream::new(Vec::new());
    stream.push(0xE6, decode_bytes).unwrap();
    assert_eq!(stream.finish(decode_bytes).unwrap().text, "\u{FFFD}");
}

#[test]
fn stop_sequences_cut_the_text_and_hold_back_what_may_begin_one() {
    let mut stream = TextStream::new(vec!["END".into(), "\n\n".into()]);
    let (pieces, stopped) = push_all(&mut stream, "ok EN then\nx\n\nmore");
    assert!(stopped);
    // "E", "N" wait until "t" shows they were not "END"; "\n" waits for the next byte.
    assert_eq!(pieces.concat(), "ok EN then\nx");
    assert_eq!(&pieces[3..6], ["", "", "EN "]);

    // A stop sequence spanning several tokens, inside one token, or split by a character.
    let mut stream = TextStream::new(vec!["日本".into()]);
    let (pieces, stopped) = push_all(&mut stream, "a日本b");
    assert!(stopped);
    assert_eq!(pieces.concat(), "a");

    // At the end of the output, held text that did not become a stop is released.
    let mut stream = TextStream::new(vec!["END".into()]);
    let (pieces, stopped) = push_all(&mut stream, "the EN");
    assert!(!stopped);
    assert_eq!(pieces.concat(), "the ");
    assert_eq!(stream.finish(decode_bytes).unwrap().text, "EN");
}

#[test]
fn token_events_wait_for_their_text_to_settle() {
    let mut detokenizer: Detokenizer<u32> = Detokenizer::new(vec!["STOP".into()]);
    let mut events = Vec::new();
    for byte in "hé ST!".bytes() {
        let released = detokenizer.push(u32::from(byte), u32::from(byte), decode_bytes).unwrap();
        assert!(!released.stopped);
        events.extend(released.events);
    }
    let tokens: Vec<u32> = events.iter().map(|e| e.0).collect();
    assert_eq!(tokens, "hé ST!".bytes().map(u32::from).collect::<Vec<_>>(), "every token, in order");
    let texts: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(texts, ["h", "", "é", " ", "", "", "ST!"]);

    // The end of the output releases held tokens with their text.
    let mut detokenizer: Detokenizer<u32> = Detokenizer::new(vec!["STOP".into()]);
    assert!(detokenizer.push(u32::from(b'S'), 1, decode_bytes).unwrap().events.is_empty());
    let finished = detokenizer.finish(decode_bytes).unwrap();
    assert_eq!(finished.events, [(1, "S".to_owned())]);

    // A stop releases the tokens before it, with the text before it.
    let mut detokenizer: Detokenizer<u32> = Detokenizer::new(vec!["STOP".into()]);
    let mut last = None;
    for (index, byte) in "aSTOPb".bytes().enumerate() {
        last = Some(detokenizer.push(u32::from(byte), index as u32, decode_bytes).unwrap());
        if last.as_ref().unwrap().stopped {
            break;
        }
    }
    let last = last.unwrap();
    assert!(last.stopped);
    assert_eq!(last.events.iter().map(|e| e.1.as_str()).collect::<String>(), "");
}

fn filtered(keywords: &[&str], patterns: &[&str]) -> TextStream {
    let filter = OutputFilter {
        keywords: keywords.iter().map(|k| (*k).to_owned()).collect(),
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
    };
    TextStream::filtered(Vec::new(), Some(CompiledFilter::new(&filter).unwrap()))
}

/// Pushes bytes until the filter ends the stream: the released text and whether it did.
fn push_until_blocked(stream: &mut TextStream, text: &str) -> (String, bool) {
    let mut released = String::new();
    for byte in text.bytes() {
        let step = stream.push(u32::from(byte), decode_bytes).unwrap();
        released.push_str(&step.text);
        if step.blocked {
            return (released, true);
        }
    }
    released.push_str(&stream.finish(decode_bytes).unwrap().text);
    (released, false)
}

#[test]
fn the_output_filter_ends_the_text_before_a_keyword_in_any_case() {
    let mut stream = filtered(&["secret plan"], &[]);
    let (released, blocked) = push_until_blocked(&mut stream, "here is the SECRET Plan: attack");
    assert!(blocked);
    assert_eq!(released, "here is the ", "nothing of the keyword is released, whatever its case");

    // Text that only begins like a keyword is held back, then released.
    let mut stream = filtered(&["secret plan"], &[]);
    let (released, blocked) = push_until_blocked(&mut stream, "a secret place");
    assert!(!blocked);
    assert_eq!(released, "a secret place");

    // Chinese keywords match as they are.
    let mut stream = filtered(&["机密"], &[]);
    let (released, blocked) = push_until_blocked(&mut stream, "这是机密文件");
    assert!(blocked);
    assert_eq!(released, "这是");
}

#[test]
fn the_output_filter_matches_patterns_across_released_text() {
    // An identity-card-like number: 17 digits and a digit or X.
    let mut stream = filtered(&[], &[r"\d{17}[\dXx]"]);
    let (released, blocked) = push_until_blocked(&mut stream, "id 11010519491231002X end");
    assert!(blocked);
    assert_eq!(released, "id ", "no digit of the number is released before it is known to match");

    // Digits that turn out not to be a match are released once they cannot be one.
    let mut stream = filtered(&[], &[r"\d{17}[\dXx]"]);
    let (released, blocked) = push_until_blocked(&mut stream, "order 1234567890 shipped");
    assert!(!blocked);
    assert_eq!(released, "order 1234567890 shipped");

    let mut stream = filtered(&[], &[r"\d{17}[\dXx]"]);
    let (released, blocked) = push_until_blocked(&mut stream, "call 12345 now");
    assert!(!blocked);
    assert_eq!(released, "call 12345 now");

    // A pattern that does not compile is named.
    let bad = OutputFilter { keywords: Vec::new(), patterns: vec!["(".into()] };
    assert!(CompiledFilter::new(&bad).unwrap_err().contains("`(`"));
    // A pattern that matches empty text would block every answer: it is refused.
    let empty = OutputFilter { keywords: Vec::new(), patterns: vec![r"\d*".into()] };
    assert!(CompiledFilter::new(&empty).unwrap_err().contains("matches empty text"));
}

#[test]
fn patterns_the_lazy_dfa_cannot_take_hold_back_a_window_and_still_block() {
    // A Unicode word boundary is not supported by the lazy DFA: the whole window is held
    // until the end, so nothing of a later match is released early.
    let mut stream = filtered(&[], &[r"\bpassword\b"]);
    let (released, blocked) = push_until_blocked(&mut stream, "the password is");
    assert!(blocked);
    assert_eq!(released, "the ");
    let mut stream = filtered(&[], &[r"\bpassword\b"]);
    let (released, blocked) = push_until_blocked(&mut stream, "no secrets here");
    assert!(!blocked);
    assert_eq!(released, "no secrets here");
}
