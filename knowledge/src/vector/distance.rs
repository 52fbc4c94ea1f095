//! Similarity kernels and exact search, the oracle the approximate index is measured
//! against.

use crate::error::{KnowledgeError, Result};
use crate::vector::{Metric, SearchHit};

/// The largest vector dimension either backend accepts (Milvus's limit).
pub const MAX_DIMENSION: usize = 32_768;

/// The dot product. Sixteen independent accumulators let the compiler keep the loop in
/// SIMD registers without `unsafe` intrinsics.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; LANES];
    let chunks_a = a.chunks_exact(LANES);
    let chunks_b = b.chunks_exact(LANES);
    let tail: f32 = chunks_a.remainder().iter().zip(chunks_b.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for ((lane, x), y) in lanes.iter_mut().zip(ca).zip(cb) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Scales the vector to unit length. Fails for a zero vector, which has no direction.
pub fn normalise(vector: &mut [f32], what: &str) -> Result<()> {
    let norm = dot(vector, vector).sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(KnowledgeError::InvalidVector {
            what: what.to_owned(),
            reason: "it has zero length (or overflows), so it has no direction to compare by cosine",
        });
    }
    for x in vector.iter_mut() {
        *x /= norm;
    }
    Ok(())
}

/// Fails for NaN or infinite components.
pub fn check_finite(vector: &[f32], what: &str) -> Result<()> {
    if vector.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(KnowledgeError::InvalidVector { what: what.to_owned(), reason: "it has a NaN or infinite component" })
    }
}

/// Prepares a vector for storage or search under the metric: finite, and unit length for
/// cosine.
pub fn prepare(metric: Metric, vector: &mut [f32], what: &str) -> Result<()> {
    check_finite(vector, what)?;
    match metric {
        Metric::Cosine => normalise(vector, what),
        Metric::InnerProduct => Ok(()),
    }
}

/// The exact top `k` of `candidates` by dot product with `query`, best first, ties by
/// chunk id.
pub fn exact_top_k<'a>(
    query: &[f32],
    candidates: impl IntoIterator<Item = (u64, &'a [f32])>,
    k: usize,
) -> Vec<SearchHit> {
    let mut top = TopK::new(k);
    for (chunk_id, vector) in candidates {
        top.push(SearchHit { chunk_id, score: dot(query, vector) });
    }
    top.into_sorted()
}

/// The best `k` hits seen so far (a bounded min-heap on score).
#[derive(Debug)]
pub struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Ranked>>,
}

/// A hit ordered best first: higher score, then lower chunk id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked(SearchHit);

impl Eq for Ranked {}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.score.total_cmp(&other.0.score).then(other.0.chunk_id.cmp(&self.0.chunk_id))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK { k, heap: std::collections::BinaryHeap::with_capacity(k + 1) }
    }

    pub fn push(&mut self, hit: SearchHit) {
        if self.k == 0 {
            return;
        }
        let ranked = Ranked(hit);
        if self.heap.len() < self.k {
            self.heap.push(std::cmp::Reverse(ranked));
        } else if self.heap.peek().is_some_and(|worst| ranked > worst.0) {
            self.heap.pop();
            self.heap.push(std::cmp::Reverse(ranked));
        }
    }

    /// The hits, best first.
    pub fn into_sorted(self) -> Vec<SearchHit> {
        let mut hits: Vec<SearchHit> = self.heap.into_iter().map(|r| r.0.0).collect();
        super::sort_and_truncate(&mut hits, self.k);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_plain_sum_for_every_length() {
        for len in 0..40u8 {
            let a: Vec<f32> = (0..len).map(|i| f32::from(i) * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..len).map(|i| 1.0 - f32::from(i) * 0.25).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-3, "length {len}");
        }
    }

    #[test]
    fn normalise_refuses_the_zero_vector() {
        let mut v = vec![0.0; 4];
        assert!(normalise(&mut v, "chunk 1").is_err());
        let mut v = vec![3.0, 4.0];
        normalise(&mut v, "chunk 1").unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn top_k_keeps_the_best_and_breaks_ties_by_chunk_id() {
        let mut top = TopK::new(3);
        for (chunk_id, score) in [(5, 0.5), (1, 0.9), (2, 0.5), (3, 0.1), (4, 0.9)] {
            top.push(SearchHit { chunk_id, score });
        }
        let ids: Vec<u64> = top.into_sorted().iter().map(|h| h.chunk_id).collect();
        assert_eq!(ids, vec![1, 4, 2]);
    }
}
