//! Fitting a conversation into a model's context: the prompt's tokens counted exactly as
//! the engine will count them (the chat template rendered, then tokenized), a budget that
//! keeps room for the answer, and the two ways a server shortens what it put in itself:
//! the oldest turns of a history it keeps ([`trim_history`]), and the largest prefix of a
//! ranked list that fits ([`largest_fitting`], which RAG uses for its sources).
//!
//! A conversation the client sent as it is (`/v1/chat/completions`) is never shortened:
//! it gets the engine's `context_length_exceeded` as OpenAI's API does.

use crate::chat::ChatMessage;
use crate::error::{EngineError, Result};
use crate::tokenizer::ModelTokenizer;

/// The tokens of `messages` as a prompt that asks for the assistant's answer.
pub fn prompt_tokens(tokenizer: &ModelTokenizer, messages: &[ChatMessage]) -> Result<usize> {
    let prompt = tokenizer.render_chat(messages, true)?;
    Ok(tokenizer.encode(&prompt, false)?.len())
}

/// The most prompt tokens a request may spend: the context less the room kept for the
/// answer, which is `max_tokens` but at most half the context (a prompt is not starved for
/// a generous `max_tokens`: the answer then ends at the context's end, `finish_reason:
/// length`), less one (the engine needs a prompt shorter than the context).
pub fn prompt_budget(context_length: usize, max_tokens: usize) -> usize {
    context_length.saturating_sub(max_tokens.min(context_length / 2)).saturating_sub(1)
}

/// The largest `n` in `0..=max` for which `fits(n)` holds, for a `fits` that holds below
/// any `n` where it holds (more sources or more turns never take fewer tokens); `None`
/// when not even `0` fits. `fits` runs about log₂(max) + 1 times.
pub fn largest_fitting<E>(
    max: usize,
    mut fits: impl FnMut(usize) -> std::result::Result<bool, E>,
) -> std::result::Result<Option<usize>, E> {
    if !fits(0)? {
        return Ok(None);
    }
    // fits(low) holds; fits(high + 1) does not (or high is max).
    let (mut low, mut high) = (0, max);
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if fits(middle)? {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    Ok(Some(low))
}

/// A history shortened to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    pub messages: Vec<ChatMessage>,
    /// Messages left out, the oldest first.
    pub dropped: usize,
    pub prompt_tokens: usize,
}

/// Leaves out the oldest turns of `messages` until its prompt takes at most `budget`
/// tokens. The leading system messages and the last message (the question) always stay;
/// what stays of the history starts at a user message, so that templates that insist on
/// alternating roles still accept it. Fails with [`EngineError::PromptTooLong`] when even
/// the system prompt and the question alone do not fit.
pub fn trim_history(
    tokenizer: &ModelTokenizer,
    messages: &[ChatMessage],
    budget: usize,
    context_length: usize,
) -> Result<Trimmed> {
    let whole = prompt_tokens(tokenizer, messages)?;
    if whole <= budget {
        return Ok(Trimmed { messages: messages.to_vec(), dropped: 0, prompt_tokens: whole });
    }
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let last = messages.len().saturating_sub(1).max(system);
    let history = &messages[system..last];
    // Where the kept history may start, from keeping nothing (after the whole history)
    // back through each user message: later choices keep more, so take more tokens.
    let mut starts = vec![history.len()];
    starts.extend((0..history.len()).rev().filter(|&i| history[i].role == "user"));
    let build = |start: usize| -> Vec<ChatMessage> {
        messages[..system].iter().chain(&history[start..]).chain(&messages[last..]).cloned().collect()
    };
    let mut counted: Vec<(usize, usize)> = Vec::new();
    let mut tokens_at = |choice: usize| -> Result<usize> {
        if let Some(&(_, tokens)) = counted.iter().find(|(c, _)| *c == choice) {
            return Ok(tokens);
        }
        let tokens = prompt_tokens(tokenizer, &build(starts[choice]))?;
        counted.push((choice, tokens));
        Ok(tokens)
    };
    let Some(choice) = largest_fitting(starts.len() - 1, |choice| Ok::<_, EngineError>(tokens_at(choice)? <= budget))?
    else {
        return Err(EngineError::PromptTooLong { prompt_tokens: tokens_at(0)?, context_length });
    };
    let start = starts[choice];
    Ok(Trimmed { messages: build(start), dropped: start, prompt_tokens: tokens_at(choice)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ModelTokenizer {
        let dir = tempfile::tempdir().expect("temp dir");
        crate::tiny::write_qwen2(dir.path(), crate::tiny::TinyShape::default(), 7).expect("tiny model");
        ModelTokenizer::load(dir.path()).expect("tokenizer")
    }

    fn conversation(turns: usize) -> Vec<ChatMessage> {
        let mut messages = vec![ChatMessage::new("system", "Be brief.")];
        for turn in 0..turns {
            messages.push(ChatMessage::new("user", format!("question number {turn} about the weather in the hills")));
            messages.push(ChatMessage::new("assistant", format!("answer number {turn}: it rains in the hills")));
        }
        messages.push(ChatMessage::new("user", "and tomorrow?"));
        messages
    }

    #[test]
    fn the_largest_fitting_value_is_found_for_every_threshold() {
        for max in 0..40 {
            for threshold in 0..=max + 1 {
                let mut calls = 0;
                let found = largest_fitting(max, |n| {
                    calls += 1;
                    Ok::<_, ()>(n < threshold)
                })
                .expect("no error");
                let expected = if threshold == 0 { None } else { Some((threshold - 1).min(max)) };
                assert_eq!(found, expected, "max {max}, threshold {threshold}");
                assert!(calls <= 8, "{calls} calls for max {max}");
            }
        }
    }

    #[test]
    fn the_budget_keeps_room_for_the_answer_but_never_more_than_half() {
        assert_eq!(prompt_budget(512, 64), 447);
        assert_eq!(prompt_budget(512, 4096), 255);
        assert_eq!(prompt_budget(0, 10), 0);
    }

    #[test]
    fn a_history_that_fits_is_kept_whole() {
        let tokenizer = tokenizer();
        let messages = conversation(3);
        let trimmed = trim_history(&tokenizer, &messages, 10_000, 10_001).expect("fits");
        assert_eq!(trimmed.dropped, 0);
        assert_eq!(trimmed.messages, messages);
        assert_eq!(trimmed.prompt_tokens, prompt_tokens(&tokenizer, &messages).expect("count"));
    }

    #[test]
    fn the_oldest_turns_go_first_and_what_stays_fits_and_starts_with_a_user() {
        let tokenizer = tokenizer();
        let messages = conversation(20);
        let whole = prompt_tokens(&tokenizer, &messages).expect("count");
        for budget in [whole - 1, whole / 2, whole / 5] {
            let trimmed = trim_history(&tokenizer, &messages, budget, whole).expect("fits");
            assert!(trimmed.prompt_tokens <= budget, "{} > {budget}", trimmed.prompt_tokens);
            assert!(trimmed.dropped > 0 && trimmed.dropped.is_multiple_of(2), "dropped {}", trimmed.dropped);
            assert_eq!(trimmed.messages[0], messages[0], "the system prompt stays");
            assert_eq!(trimmed.messages[1].role, "user");
            assert_eq!(trimmed.messages.last(), messages.last(), "the question stays");
            // The newest turns stay, in order: what is kept is the end of the history.
            assert_eq!(trimmed.messages[1..], messages[1 + trimmed.dropped..]);
            // One more turn would not have fitted.
            let one_more = [&messages[..1], &messages[trimmed.dropped - 1..]].concat();
            assert!(prompt_tokens(&tokenizer, &one_more).expect("count") > budget);
        }
    }

    #[test]
    fn a_question_too_long_for_the_context_is_refused() {
        let tokenizer = tokenizer();
        let messages = conversation(2);
        let alone = prompt_tokens(&tokenizer, &[messages[0].clone(), messages[5].clone()]).expect("count");
        match trim_history(&tokenizer, &messages, alone - 1, 64) {
            Err(EngineError::PromptTooLong { prompt_tokens, context_length: 64 }) => assert_eq!(prompt_tokens, alone),
            other => panic!("expected PromptTooLong, got {other:?}"),
        }
        // Exactly the question and the system prompt: every turn goes.
        let trimmed = trim_history(&tokenizer, &messages, alone, 64).expect("fits");
        assert_eq!(trimmed.dropped, 4);
    }
}
