//! Hybrid retrieval: fusing the vector store's ranking with the full-text index's.
//!
//! Pure functions over ranked lists of [`SearchHit`]s (best first, as both stores return
//! them):
//!
//! - [`rrf`]: weighted reciprocal-rank fusion. Each list adds `weight / (k + rank)` to the
//!   chunks it holds (rank from 1). It needs no calibration between BM25 scores and
//!   cosine similarities, which live on unrelated scales.
//! - [`score_fusion`]: each list's scores min-max normalised to `0..=1`, then a weighted
//!   sum: keeps how far apart the hits were, where rank fusion keeps only their order.
//! - [`max_fusion`]: each list's scores divided by its best, then a weighted sum: like
//!   [`score_fusion`], but a list whose scores are all close (cosine similarities of one
//!   topic) stays close instead of being stretched over `0..=1`, so it cannot overrule the
//!   other list on a near-tie; the default for [`fuse`], because it measured best (see
//!   [`fuse`]).
//!
//! Fusion must not make retrieval worse than its better component. When the embedding
//! model is weak for the query's language (all-MiniLM-L6-v2 is English-only, so a Chinese
//! query embeds to near noise) the vector ranking is not worth an equal vote:
//! [`weights_for`] lowers its weight with the query's share of CJK characters, down to
//! zero for an all-CJK query, where the fused ranking is exactly the full-text one.
//!
//! Every function is deterministic: the output is sorted by fused score, ties by chunk id,
//! whatever order the inputs were built in.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use crate::vector::SearchHit;

/// The usual constant of reciprocal-rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009):
/// large enough that the first few ranks do not drown the rest.
pub const DEFAULT_RRF_K: u32 = 60;

/// How much each ranking counts in a fusion. Weights are meant to be finite and at least
/// zero; a negative or non-finite weight counts as zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HybridWeights {
    pub vector: f32,
    pub fulltext: f32,
}

impl HybridWeights {
    /// Both rankings count the same.
    pub const EQUAL: HybridWeights = HybridWeights { vector: 1.0, fulltext: 1.0 };
    /// The weights where the embedding model covers the query's language: BM25 at a fifth
    /// of the vector ranking's weight under [`max_fusion`], the best of the weights tried
    /// on the English corpus, and the best on each half of its questions alike
    /// (BENCHMARKS.md): BM25 breaks the vector ranking's near-ties on names and numbers
    /// without overruling its paraphrase matches.
    pub const CALIBRATED: HybridWeights = HybridWeights { vector: 1.0, fulltext: 0.2 };
}

impl Default for HybridWeights {
    fn default() -> Self {
        HybridWeights::CALIBRATED
    }
}

/// The weights for a query: [`HybridWeights::CALIBRATED`] when the embedding model covers
/// the query's language (`embedding_multilingual`); otherwise, as the query's
/// [`cjk_share`] goes from 0 to 1, the vector weight falls linearly from 1 to 0 and the
/// full-text weight rises from its calibrated value to 1, so an all-CJK query gets the
/// full-text ranking.
///
/// This is the policy hook: a knowledge base whose embedding model is multilingual passes
/// `true`; a better-calibrated policy can replace this function without touching the
/// fusions.
pub fn weights_for(query: &str, embedding_multilingual: bool) -> HybridWeights {
    let base = HybridWeights::CALIBRATED;
    if embedding_multilingual {
        return base;
    }
    let share = cjk_share(query);
    HybridWeights { vector: base.vector * (1.0 - share), fulltext: base.fulltext + (1.0 - base.fulltext) * share }
}

/// The share of the query's letters and digits that are CJK (Han ideographs, kana,
/// Hangul), from 0 to 1; 0 for a text with no letters or digits.
pub fn cjk_share(text: &str) -> f32 {
    let (mut cjk, mut letters) = (0_u32, 0_u32);
    for c in text.chars().filter(|c| c.is_alphanumeric()) {
        letters += 1;
        if is_cjk(c) {
            cjk += 1;
        }
    }
    if letters == 0 {
        0.0
    } else {
        // Counts below 2^24 are exact in f32; a longer query's share is still accurate
        // to f32's precision, which is all a weight needs.
        #[allow(clippy::cast_precision_loss)]
        let share = cjk as f32 / letters as f32;
        share
    }
}

/// Han ideographs, kana (hiragana, katakana, its phonetic extensions and half-width
/// forms) and Hangul (jamo, compatibility jamo, syllables).
fn is_cjk(c: char) -> bool {
    crate::fulltext::analyzer::is_han(c)
        || matches!(
            c,
            '\u{3040}'..='\u{30FF}'
                | '\u{31F0}'..='\u{31FF}'
                | '\u{FF66}'..='\u{FF9F}'
                | '\u{1100}'..='\u{11FF}'
                | '\u{3130}'..='\u{318F}'
                | '\u{AC00}'..='\u{D7AF}'
        )
}

/// Fuses the vector and full-text rankings with [`max_fusion`].
///
/// Chosen by measurement (`maas bench retrieval`, BENCHMARKS.md): on the English corpus
/// with all-MiniLM-L6-v2, normalised-score fusion kept how far ahead a clear winner was,
/// where reciprocal-rank fusion let a mediocre chunk that both lists held at middling
/// ranks overtake it (MRR 0.85 against 0.80, recall@1 0.78 against 0.70); dividing by
/// the best score instead of stretching min..max was the only fusion tried that is at
/// least as good as the vector ranking at recall@1, @5 and @10 at once, on each half of
/// the questions.
pub fn fuse(
    vector_hits: &[SearchHit],
    fulltext_hits: &[SearchHit],
    weights: HybridWeights,
    top_k: usize,
) -> Vec<SearchHit> {
    max_fusion(&[(weights.vector, vector_hits), (weights.fulltext, fulltext_hits)], top_k)
}

/// Weighted reciprocal-rank fusion: each list (`weight`, hits best first) adds
/// `weight / (k_constant + rank)` to each chunk in it, rank counted from 1 (a chunk listed
/// twice in one list counts at its first place). Returns the `top_k` chunks by fused score,
/// ties by chunk id; the score of each hit is its fused score.
///
/// Only chunks in a list of positive weight take part, so a list of weight zero changes
/// nothing: the result is the other lists' fusion (for one list, its own order). With equal
/// weights and lists no longer than `k_constant + 1`, a chunk in two lists ranks above one
/// in only one of them.
pub fn rrf(lists: &[(f32, &[SearchHit])], k_constant: u32, top_k: usize) -> Vec<SearchHit> {
    fuse_by(lists, top_k, |_, _, rank| {
        // Ranks beyond 2^24 lose precision in f32; their contributions are ~0 anyway.
        #[allow(clippy::cast_precision_loss)]
        let denominator = k_constant as f32 + (rank + 1) as f32;
        1.0 / denominator
    })
}

/// Weighted score fusion: each list's scores are min-max normalised to `0..=1` (all equal
/// scores, or a list of one, normalise to 1; a non-finite score to 0), then each chunk's
/// fused score is the weighted sum of its normalised scores. Returns the `top_k` chunks by
/// fused score, ties by chunk id.
///
/// As in [`rrf`], only chunks in a list of positive weight take part, so a list of weight
/// zero changes nothing.
pub fn score_fusion(lists: &[(f32, &[SearchHit])], top_k: usize) -> Vec<SearchHit> {
    let ranges: Vec<Option<(f32, f32)>> = lists.iter().map(|(_, hits)| finite_range(hits)).collect();
    fuse_by(lists, top_k, |list, hit, _| match ranges[list] {
        _ if !hit.score.is_finite() => 0.0,
        Some((min, max)) if max > min => (hit.score - min) / (max - min),
        _ => 1.0,
    })
}

/// Weighted fusion of scores divided by their list's best: each list (`weight`, hits best
/// first) adds `weight * score / best` to each chunk in it (a non-finite score, or any
/// score of a list whose best is not above zero, adds nothing). Returns the `top_k` chunks
/// by fused score, ties by chunk id; the score of each hit is its fused score.
pub fn max_fusion(lists: &[(f32, &[SearchHit])], top_k: usize) -> Vec<SearchHit> {
    let best: Vec<Option<f32>> = lists.iter().map(|(_, hits)| finite_range(hits).map(|(_, max)| max)).collect();
    fuse_by(lists, top_k, |list, hit, _| match best[list] {
        Some(max) if max > 0.0 && hit.score.is_finite() => hit.score / max,
        _ => 0.0,
    })
}

/// The smallest and largest finite score of a list.
fn finite_range(hits: &[SearchHit]) -> Option<(f32, f32)> {
    hits.iter().map(|hit| hit.score).filter(|score| score.is_finite()).fold(None, |range, score| match range {
        None => Some((score, score)),
        Some((min, max)) => Some((min.min(score), max.max(score))),
    })
}

/// The fusion skeleton: for every list of positive weight and every chunk's first place
/// in it, adds `weight * contribution(list, hit, rank)` to the chunk (`list` the index of
/// the list, `rank` from 0); then sorts
/// by fused score, ties by chunk id, and keeps `top_k`.
fn fuse_by(
    lists: &[(f32, &[SearchHit])],
    top_k: usize,
    mut contribution: impl FnMut(usize, &SearchHit, usize) -> f32,
) -> Vec<SearchHit> {
    let mut fused: HashMap<u64, f32> = HashMap::new();
    for (list, &(weight, hits)) in lists.iter().enumerate() {
        if !(weight.is_finite() && weight > 0.0) {
            continue;
        }
        let mut seen_in_list = HashSet::new();
        for (rank, hit) in hits.iter().enumerate() {
            if !seen_in_list.insert(hit.chunk_id) {
                continue;
            }
            let added = weight * contribution(list, hit, rank);
            match fused.entry(hit.chunk_id) {
                Entry::Occupied(mut entry) => *entry.get_mut() += added,
                Entry::Vacant(entry) => {
                    entry.insert(added);
                }
            }
        }
    }
    let mut out: Vec<SearchHit> = fused.into_iter().map(|(chunk_id, score)| SearchHit { chunk_id, score }).collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.chunk_id.cmp(&b.chunk_id)));
    out.truncate(top_k);
    out
}
