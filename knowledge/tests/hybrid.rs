//! Fusion of ranked lists: worked examples, the language policy, and the properties every
//! fusion keeps (deterministic, ties by chunk id, zero weight is neutral, top_k respected).

use maas_knowledge::hybrid::{
    DEFAULT_RRF_K, HybridWeights, cjk_share, fuse, max_fusion, rrf, score_fusion, weights_for,
};
use maas_knowledge::vector::SearchHit;
use proptest::prelude::*;

fn hits(pairs: &[(u64, f32)]) -> Vec<SearchHit> {
    pairs.iter().map(|&(chunk_id, score)| SearchHit { chunk_id, score }).collect()
}

fn ids(hits: &[SearchHit]) -> Vec<u64> {
    hits.iter().map(|hit| hit.chunk_id).collect()
}

/// ((vector weight, full-text weight), k, top_k, the expected order of chunk ids).
type RrfCase = ((f32, f32), u32, usize, &'static [u64]);

#[test]
fn rrf_worked_examples() {
    let vector = hits(&[(1, 0.9), (2, 0.8), (3, 0.7)]);
    let fulltext = hits(&[(3, 12.0), (4, 9.0), (1, 1.0)]);
    let cases: &[RrfCase] = &[
        // 1: 1/61 + 1/63, 3: 1/63 + 1/61: a tie, broken by chunk id; then 2 (1/62) before 4 (1/62) by id.
        ((1.0, 1.0), 60, 10, &[1, 3, 2, 4]),
        ((1.0, 1.0), 60, 2, &[1, 3]),
        ((1.0, 0.0), 60, 10, &[1, 2, 3]),
        ((0.0, 1.0), 60, 10, &[3, 4, 1]),
        // A heavy full-text weight puts its own second hit above the vector-only one.
        ((0.2, 1.0), 60, 10, &[3, 1, 4, 2]),
        // With k = 0, the first ranks dominate: 1 is 1/1 + 1/3, 3 is 1/3 + 1/1.
        ((1.0, 1.0), 0, 10, &[1, 3, 2, 4]),
        ((0.0, 0.0), 60, 10, &[]),
        ((f32::NAN, -1.0), 60, 10, &[]),
    ];
    for &((vector_weight, fulltext_weight), k, top_k, expected) in cases {
        let fused = rrf(&[(vector_weight, &vector), (fulltext_weight, &fulltext)], k, top_k);
        assert_eq!(ids(&fused), expected, "weights ({vector_weight}, {fulltext_weight}), k {k}, top_k {top_k}");
    }
}

#[test]
fn rrf_scores_are_the_weighted_reciprocal_ranks() {
    let vector = hits(&[(1, 0.9), (2, 0.8)]);
    let fulltext = hits(&[(2, 5.0)]);
    let fused = rrf(&[(0.5, &vector), (2.0, &fulltext)], 60, 10);
    let expected = [(2, 0.5 / 62.0 + 2.0 / 61.0), (1, 0.5 / 61.0)];
    for (hit, (chunk_id, score)) in fused.iter().zip(expected) {
        assert_eq!(hit.chunk_id, chunk_id);
        assert!((hit.score - score).abs() < 1e-7, "{fused:?}");
    }
}

#[test]
fn a_chunk_repeated_in_one_list_counts_once_at_its_best_rank() {
    let list = hits(&[(1, 0.9), (2, 0.8), (1, 0.1)]);
    let fused = rrf(&[(1.0, &list)], 60, 10);
    assert_eq!(ids(&fused), [1, 2]);
    assert!((fused[0].score - 1.0 / 61.0).abs() < 1e-7);
}

#[test]
fn score_fusion_normalises_each_list() {
    // Cosine similarities and BM25 scores on their own scales.
    let vector = hits(&[(1, 0.90), (2, 0.85), (3, 0.10)]);
    let fulltext = hits(&[(3, 30.0), (2, 20.0), (4, 10.0)]);
    let fused = score_fusion(&[(1.0, &vector), (1.0, &fulltext)], 10);
    // 1: 1.0 + 0; 2: 0.9375 + 0.5; 3: 0 + 1.0; 4: 0 + 0.
    assert_eq!(ids(&fused), [2, 1, 3, 4]);
    let expected = [1.4375, 1.0, 1.0, 0.0];
    for (hit, score) in fused.iter().zip(expected) {
        assert!((hit.score - score).abs() < 1e-6, "{fused:?}");
    }
}

#[test]
fn score_fusion_of_equal_or_single_scores_counts_each_as_one() {
    let flat = hits(&[(5, 0.3), (4, 0.3)]);
    let single = hits(&[(9, 7.0)]);
    let with_nan = hits(&[(7, f32::NAN), (8, 1.0)]);
    let fused = score_fusion(&[(1.0, &flat), (1.0, &single), (1.0, &with_nan)], 10);
    assert_eq!(ids(&fused), [4, 5, 8, 9, 7]);
    assert_eq!(fused.iter().map(|hit| hit.score).collect::<Vec<_>>(), [1.0, 1.0, 1.0, 1.0, 0.0]);
}

#[test]
fn max_fusion_divides_each_list_by_its_best() {
    let vector = hits(&[(1, 0.80), (2, 0.76), (3, 0.40)]);
    let fulltext = hits(&[(3, 30.0), (2, 20.0), (4, 10.0)]);
    let fused = max_fusion(&[(1.0, &vector), (0.5, &fulltext)], 10);
    // 1: 1.0; 2: 0.95 + 0.5 * 2/3; 3: 0.5 + 0.5; 4: 0.5 * 1/3.
    assert_eq!(ids(&fused), [2, 1, 3, 4]);
    let expected = [0.95 + 1.0 / 3.0, 1.0, 1.0, 1.0 / 6.0];
    for (hit, score) in fused.iter().zip(expected) {
        assert!((hit.score - score).abs() < 1e-6, "{fused:?}");
    }
    // A list with no positive best, and non-finite scores, add nothing.
    let negative = hits(&[(5, -0.1), (6, -0.2)]);
    let with_nan = hits(&[(7, f32::NAN), (8, 2.0)]);
    let fused = max_fusion(&[(1.0, &negative), (1.0, &with_nan)], 10);
    assert_eq!(ids(&fused), [8, 5, 6, 7]);
    assert_eq!(fused.iter().map(|hit| hit.score).collect::<Vec<_>>(), [1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn cjk_share_counts_letters_and_digits_only() {
    let cases: &[(&str, f32)] = &[
        ("", 0.0),
        ("?!, ...", 0.0),
        ("how do vector indexes work", 0.0),
        ("向量检索", 1.0),
        ("向量检索，怎么用？", 1.0),
        ("GPU集群", 0.4),
        ("ab知识", 0.5),
        ("ベクトル検索", 1.0),
        ("벡터 검색", 1.0),
    ];
    for &(text, expected) in cases {
        assert!((cjk_share(text) - expected).abs() < 1e-6, "{text:?}: {} != {expected}", cjk_share(text));
    }
}

#[test]
fn weights_follow_the_query_language_when_the_embedding_model_is_english_only() {
    let cases: &[(&str, bool, HybridWeights)] = &[
        ("what is retrieval augmented generation", false, HybridWeights::CALIBRATED),
        ("什么是检索增强生成", false, HybridWeights { vector: 0.0, fulltext: 1.0 }),
        ("ab知识", false, HybridWeights { vector: 0.5, fulltext: 0.6 }),
        ("什么是检索增强生成", true, HybridWeights::CALIBRATED),
        ("", false, HybridWeights::CALIBRATED),
    ];
    for &(query, multilingual, expected) in cases {
        assert_eq!(weights_for(query, multilingual), expected, "{query:?}, multilingual {multilingual}");
    }
}

#[test]
fn a_chinese_query_with_an_english_only_model_keeps_the_full_text_ranking() {
    // An English-only model embeds Chinese to near noise: its ranking is unrelated to the
    // question, while BM25 found the right chunk (12) first.
    let vector = hits(&[(40, 0.31), (41, 0.30), (12, 0.05)]);
    let fulltext = hits(&[(12, 8.1), (13, 2.2)]);
    let query = "向量检索是怎么工作的";
    let fused = fuse(&vector, &fulltext, weights_for(query, false), 10);
    assert_eq!(ids(&fused), [12, 13]);
    // With equal weights the noise would outrank the second full-text hit.
    let naive = fuse(&vector, &fulltext, HybridWeights::EQUAL, 10);
    assert_eq!(ids(&naive), [12, 40, 41, 13]);
}

/// A ranked list: distinct chunk ids with integer-valued scores, best first, ties by id
/// (as both stores return them).
fn ranked_list(max_len: usize) -> impl Strategy<Value = Vec<SearchHit>> {
    prop::collection::btree_map(0_u64..120, 0_u16..50, 0..=max_len).prop_map(|scores| {
        let mut list: Vec<SearchHit> =
            scores.into_iter().map(|(chunk_id, score)| SearchHit { chunk_id, score: f32::from(score) }).collect();
        list.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.chunk_id.cmp(&b.chunk_id)));
        list
    })
}

fn weight() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0_f32), Just(1.0_f32), 0.01_f32..10.0]
}

type Fusion = fn(&[(f32, &[SearchHit])], usize) -> Vec<SearchHit>;

fn rrf_default(lists: &[(f32, &[SearchHit])], top_k: usize) -> Vec<SearchHit> {
    rrf(lists, DEFAULT_RRF_K, top_k)
}

const FUSIONS: [(&str, Fusion); 2] = [("rrf", rrf_default), ("score_fusion", score_fusion)];

proptest! {
    #[test]
    fn fusion_is_deterministic_sorted_and_bounded(
        a in ranked_list(40),
        b in ranked_list(40),
        weight_a in weight(),
        weight_b in weight(),
        top_k in 0_usize..50,
    ) {
        for (name, fusion) in FUSIONS {
            let fused = fusion(&[(weight_a, &a), (weight_b, &b)], top_k);
            let swapped = fusion(&[(weight_b, &b), (weight_a, &a)], top_k);
            prop_assert_eq!(ids(&fused), ids(&swapped), "{} depends on list order", name);
            prop_assert_eq!(ids(&fused), ids(&fusion(&[(weight_a, &a), (weight_b, &b)], top_k)), "{}", name);
            prop_assert!(
                fused.windows(2).all(|p| p[0].score.total_cmp(&p[1].score).then(p[1].chunk_id.cmp(&p[0].chunk_id)).is_gt()),
                "{} not sorted by score then chunk id: {:?}", name, fused
            );
            let mut candidates: Vec<u64> = Vec::new();
            for (w, list) in [(weight_a, &a), (weight_b, &b)] {
                if w > 0.0 {
                    candidates.extend(ids(list));
                }
            }
            candidates.sort_unstable();
            candidates.dedup();
            prop_assert_eq!(fused.len(), candidates.len().min(top_k), "{}", name);
        }
    }

    #[test]
    fn a_zero_weight_reduces_to_the_other_list(a in ranked_list(40), b in ranked_list(40), w in 0.01_f32..10.0, top_k in 0_usize..50) {
        for (name, fusion) in FUSIONS {
            let fused = fusion(&[(w, &a), (0.0, &b)], top_k);
            let expected: Vec<u64> = ids(&a).into_iter().take(top_k).collect();
            prop_assert_eq!(ids(&fused), expected, "{}", name);
        }
    }

    #[test]
    fn with_equal_weights_two_votes_beat_one(a in ranked_list(61), b in ranked_list(61), w in 0.01_f32..10.0) {
        let fused = rrf(&[(w, &a), (w, &b)], DEFAULT_RRF_K, usize::MAX);
        let in_a = ids(&a);
        let in_b = ids(&b);
        let both = |id: &u64| in_a.contains(id) && in_b.contains(id);
        let first_single = fused.iter().position(|hit| !both(&hit.chunk_id)).unwrap_or(fused.len());
        prop_assert!(fused[first_single..].iter().all(|hit| !both(&hit.chunk_id)), "{:?}", fused);
    }
}
