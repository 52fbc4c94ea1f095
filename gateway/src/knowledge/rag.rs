//! Retrieval-augmented chat: a chat request that names knowledge bases
//! (`knowledge_base_ids`, or `POST /v1/knowledge_bases/{id}/chat`) has its question
//! condensed with the conversation (by the same chat model) into a standalone query,
//! retrieves from each knowledge base the caller may read, and answers from a prompt that
//! numbers the sources; the answer carries the **citations** (document, version, pages,
//! chunk, score), in the JSON body and in the first event of a stream.

use std::fmt::Write as _;
use std::sync::Arc;

use maas_engine::ChatMessage;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::retrieve::{RetrievalMode, RetrieveRequest, RetrievedChunk, retrieve};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::model_text::ChatText;
use crate::routes::openai::CalledFor;
use crate::state::AppState;
use maas_engine::fit;

/// Knowledge bases one request may search at most.
pub const MAX_KNOWLEDGE_BASES: usize = 8;
/// The longest source text put in a prompt, in characters.
const MAX_SOURCE_CHARS: usize = 2_000;
/// The most tokens a condensed question may take.
const CONDENSE_MAX_TOKENS: usize = 64;
/// The shortest cut of a source worth putting in a prompt, in characters.
const MIN_SOURCE_CHARS: usize = 200;

/// How a RAG chat retrieves (the `retrieval` field of a chat request).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RagOptions {
    /// Sources in the prompt (1 to 20, default 4).
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub mode: Option<RetrievalMode>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub document_ids: Option<Vec<String>>,
    /// Whether a follow-up question is rewritten with the conversation before retrieval
    /// (default true).
    #[serde(default)]
    pub condense: Option<bool>,
    /// Whether each source brings its larger parent chunk into the prompt (default
    /// false: more context, more tokens).
    #[serde(default)]
    pub include_parent: Option<bool>,
    /// Widen retrieval to the knowledge graph's neighbours of the question's entities.
    #[serde(default)]
    pub graph: Option<bool>,
}

/// A source the answer may cite as `[index]`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Citation {
    /// The number the prompt gave the source, from 1.
    pub index: usize,
    pub knowledge_base_id: String,
    pub document_id: String,
    pub filename: String,
    pub version: i64,
    pub page_start: i64,
    pub page_end: i64,
    pub heading_path: Vec<String>,
    pub chunk_id: String,
    pub score: f32,
    /// The chunk's text.
    pub text: String,
}

/// A conversation with its sources put in, and what was retrieved.
#[derive(Debug, Clone)]
pub struct Augmented {
    pub messages: Vec<ChatMessage>,
    pub citations: Vec<Citation>,
    /// The query the knowledge bases were searched with.
    pub query: String,
    /// Sources retrieved but left out because the model's context could not hold them.
    pub omitted: usize,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message).with_param(param)
}

/// Retrieves for the conversation's last question and puts the sources in its messages:
/// as many of the best as the chat model's context holds with `max_tokens` of room for
/// the answer (see [`maas_engine::fit::prompt_budget`]), the last one cut when a part of
/// it still fits.
pub async fn augment(
    state: &Arc<AppState>,
    caller: &Caller,
    model: &str,
    knowledge_base_ids: &[String],
    options: &RagOptions,
    messages: Vec<ChatMessage>,
    max_tokens: usize,
) -> Result<Augmented, ApiError> {
    if knowledge_base_ids.is_empty() || knowledge_base_ids.len() > MAX_KNOWLEDGE_BASES {
        return Err(bad("knowledge_base_ids", format!("name 1 to {MAX_KNOWLEDGE_BASES} knowledge bases")));
    }
    let top_k = options.top_k.unwrap_or(4);
    if !(1..=20).contains(&top_k) {
        return Err(bad("retrieval.top_k", "retrieval.top_k must be 1 to 20"));
    }
    let Some(question) = messages.last().filter(|m| m.role == "user").map(|m| m.content.clone()) else {
        return Err(bad("messages", "the last message must be the user's question to answer from knowledge bases"));
    };
    let stores = crate::routes::registry::stores(state)?;
    let service = state
        .knowledge
        .get()
        .ok_or_else(|| ApiError::unavailable("knowledge bases are starting on this node; retry shortly"))?;
    // Every knowledge base must be the caller's to read, before anything runs.
    let mut bases = Vec::with_capacity(knowledge_base_ids.len());
    for id in knowledge_base_ids {
        if bases.iter().any(|kb: &maas_store::repo::knowledge::KnowledgeBase| &kb.id == id) {
            continue;
        }
        bases.push(
            stores
                .db
                .knowledge_bases()
                .get(&caller.scope, id)
                .await
                .map_err(|e| ApiError::from(e).with_param("knowledge_base_ids"))?,
        );
    }
    let history: Vec<&ChatMessage> =
        messages[..messages.len() - 1].iter().filter(|m| m.role == "user" || m.role == "assistant").collect();
    let query = if options.condense.unwrap_or(true) && !history.is_empty() {
        condense(state, caller, model, &history, &question).await?
    } else {
        question.clone()
    };
    let request = RetrieveRequest {
        query: query.clone(),
        top_k: Some(top_k),
        mode: options.mode,
        document_ids: options.document_ids.clone(),
        tags: options.tags.clone(),
        versions: None,
        include_parent: Some(options.include_parent.unwrap_or(false)),
        graph: options.graph,
    };
    let mut found: Vec<(String, RetrievedChunk)> = Vec::new();
    let work = crate::metering::Work::for_caller(caller, "knowledge.retrieve");
    for kb in &bases {
        let answer = retrieve(state, stores, service, kb, &request, &work).await?;
        found.extend(answer.data.into_iter().map(|hit| (kb.id.clone(), hit)));
    }
    // The scores of one mode are comparable across knowledge bases (same fusion, same
    // metric); the best top_k of all of them are the sources.
    found.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then_with(|| a.1.chunk_id.cmp(&b.1.chunk_id)));
    found.truncate(top_k);
    let text = state.model_texts.chat(state, CalledFor::scope(&caller.scope), model).await?;
    let budget = fit::prompt_budget(text.context_length, max_tokens);
    let (messages, found, omitted) =
        tokio::task::spawn_blocking(move || fit_sources(&text, &messages, found, budget, max_tokens))
            .await
            .map_err(|e| ApiError::internal(format!("the prompt thread failed: {e}")))??;
    let citations: Vec<Citation> = found
        .iter()
        .enumerate()
        .map(|(i, (kb_id, hit))| Citation {
            index: i + 1,
            knowledge_base_id: kb_id.clone(),
            document_id: hit.document_id.clone(),
            filename: hit.filename.clone(),
            version: hit.version,
            page_start: hit.page_start,
            page_end: hit.page_end,
            heading_path: hit.heading_path.clone(),
            chunk_id: hit.chunk_id.clone(),
            score: hit.score,
            text: hit.text.clone(),
        })
        .collect();
    Ok(Augmented { messages, citations, query, omitted })
}

/// `messages` with the context prompt of the first `count` sources (the last of them cut
/// to `cut` characters) in the system message.
fn with_sources(
    messages: &[ChatMessage],
    found: &[(String, RetrievedChunk)],
    count: usize,
    cut: Option<usize>,
) -> Vec<ChatMessage> {
    let context = context_prompt(&found[..count], cut);
    let mut messages = messages.to_vec();
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{context}", first.content);
        }
        _ => messages.insert(0, ChatMessage { role: "system".into(), content: context }),
    }
    messages
}

/// Retrieved chunks with their knowledge bases, best first.
type Sources = Vec<(String, RetrievedChunk)>;

/// The conversation with as many sources as fit in `budget` prompt tokens, those
/// sources, and how many were left out. Sources go in rank order; when the next one does
/// not fit whole, the longest cut of it that fits (at least [`MIN_SOURCE_CHARS`]) goes in.
fn fit_sources(
    text: &ChatText,
    messages: &[ChatMessage],
    mut found: Sources,
    budget: usize,
    max_tokens: usize,
) -> Result<(Vec<ChatMessage>, Sources, usize), ApiError> {
    let tokens = |count: usize, cut: Option<usize>| -> Result<usize, ApiError> {
        fit::prompt_tokens(&text.tokenizer, &with_sources(messages, &found, count, cut))
            .map_err(|e| crate::routes::openai::engine_error(&e))
    };
    let whole = fit::largest_fitting(found.len(), |count| Ok::<_, ApiError>(tokens(count, None)? <= budget))?;
    let too_long = |prompt_tokens: usize| {
        ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "the conversation takes {prompt_tokens} tokens with the knowledge-base instructions: it leaves no room for sources in the model's context of {} tokens with {} kept for the answer; shorten the conversation or lower max_tokens",
                text.context_length,
                max_tokens.min(text.context_length / 2)
            ),
        )
        .with_param("messages")
    };
    let Some(count) = whole else {
        return Err(too_long(tokens(0, None)?));
    };
    let mut cut = None;
    if count < found.len() {
        let source = &found[count].1;
        let chars = source.parent_text.as_deref().unwrap_or(&source.text).chars().count().min(MAX_SOURCE_CHARS);
        let longest = fit::largest_fitting(chars, |c| Ok::<_, ApiError>(tokens(count + 1, Some(c))? <= budget))?;
        cut = longest.filter(|&c| c >= MIN_SOURCE_CHARS);
    }
    let kept = count + usize::from(cut.is_some());
    if kept == 0 && !found.is_empty() {
        return Err(too_long(tokens(0, None)?));
    }
    let messages = with_sources(messages, &found, kept, cut);
    let omitted = found.len() - kept;
    found.truncate(kept);
    Ok((messages, found, omitted))
}

/// The system prompt that numbers the sources and asks for citations.
fn context_prompt(found: &[(String, RetrievedChunk)], cut: Option<usize>) -> String {
    if found.is_empty() {
        return "The knowledge base has nothing on this question. Say that you do not know rather than guess.".into();
    }
    let mut prompt = String::from(
        "Answer from these sources. Cite each claim with its source's number in brackets, like [1]. If the sources do not hold the answer, say that you do not know.\n",
    );
    for (i, (_, hit)) in found.iter().enumerate() {
        let mut place = format!("{}, version {}", hit.filename, hit.version);
        if hit.page_end > 1 {
            if hit.page_start == hit.page_end {
                let _ = write!(place, ", page {}", hit.page_start);
            } else {
                let _ = write!(place, ", pages {}-{}", hit.page_start, hit.page_end);
            }
        }
        if !hit.heading_path.is_empty() {
            let _ = write!(place, ", {}", hit.heading_path.join(" > "));
        }
        let source = hit.parent_text.as_deref().unwrap_or(&hit.text).trim();
        let limit = if i + 1 == found.len() { cut.unwrap_or(MAX_SOURCE_CHARS) } else { MAX_SOURCE_CHARS };
        let mut text: String = source.chars().take(limit).collect();
        if source.chars().count() > limit {
            text.push('…');
        }
        let _ = write!(prompt, "\n[{}] ({place})\n{text}\n", i + 1);
    }
    prompt
}

/// Rewrites the last question as a standalone one with the chat model (greedy); the
/// question itself when the model answers nothing usable.
async fn condense(
    state: &Arc<AppState>,
    caller: &Caller,
    model: &str,
    history: &[&ChatMessage],
    question: &str,
) -> Result<String, ApiError> {
    let mut conversation = String::new();
    for message in history.iter().rev().take(6).rev() {
        let text: String = message.content.chars().take(500).collect();
        let _ = writeln!(conversation, "{}: {text}", message.role);
    }
    let render = vec![
        ChatMessage {
            role: "system".into(),
            content: "Rewrite the user's last question as one standalone question that can be understood without the conversation. Reply with the question only.".into(),
        },
        ChatMessage { role: "user".into(), content: format!("Conversation:\n{conversation}\nLast question: {question}") },
    ];
    let work = crate::metering::Work::for_caller(caller, "knowledge.condense");
    let text = crate::routes::openai::complete_chat(
        state,
        (CalledFor::scope(&caller.scope), Some(&caller.scope)),
        &work,
        model,
        render,
        CONDENSE_MAX_TOKENS,
    )
    .await?;
    let condensed = text.lines().map(str::trim).find(|line| !line.is_empty()).unwrap_or_default();
    Ok(if condensed.is_empty() { question.to_owned() } else { condensed.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(filename: &str, pages: (i64, i64), headings: &[&str], text: &str) -> (String, RetrievedChunk) {
        (
            "kb-1".into(),
            RetrievedChunk {
                rank: 1,
                chunk_id: "7".into(),
                score: 0.5,
                vector_score: None,
                fulltext_score: None,
                document_id: "doc-1".into(),
                filename: filename.into(),
                version: 2,
                page_start: pages.0,
                page_end: pages.1,
                heading_path: headings.iter().map(|h| (*h).to_owned()).collect(),
                ordinal: 0,
                text: text.into(),
                parent_text: None,
                tags: Vec::new(),
            },
        )
    }

    #[test]
    fn the_prompt_numbers_sources_with_their_places() {
        let prompt = context_prompt(
            &[hit("a.pdf", (3, 4), &["Intro", "Scope"], "alpha text"), hit("b.md", (1, 1), &[], "beta text")],
            None,
        );
        assert!(prompt.contains("[1] (a.pdf, version 2, pages 3-4, Intro > Scope)\nalpha text"), "{prompt}");
        assert!(prompt.contains("[2] (b.md, version 2)\nbeta text"), "{prompt}");
        assert!(prompt.contains("like [1]"));
        assert!(context_prompt(&[], None).contains("do not know"));
    }
}
