//! A hierarchical navigable small world graph (Malkov and Yashunin, "Efficient and robust
//! approximate nearest neighbor search using Hierarchical Navigable Small World graphs",
//! 2016/2018): the approximate nearest-neighbour index of the embedded store.
//!
//! Nodes are numbered in insertion order and never removed: the shard marks deleted chunks
//! and passes an `accept` predicate, so deleted and filtered-out nodes still carry searches
//! across the graph but never appear in results; a snapshot rebuilds the graph when too many
//! are deleted. Distances are negated dot products (lower is closer), which is cosine
//! distance for unit vectors. A node's level is a pure function of the seed and the node's
//! number, so the same inserts build the same graph.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::codec;
use super::distance::dot;

/// The graph's shape and effort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HnswParams {
    /// Links per node on the upper layers; layer 0 keeps twice as many.
    pub m: usize,
    /// Candidates kept while linking a new node (more: a better graph, slower inserts).
    pub ef_construction: usize,
    /// Candidates kept while searching (more: better recall, slower queries); a search
    /// for k results keeps at least k.
    pub ef_search: usize,
    /// Seeds the level of each node.
    pub seed: u64,
}

impl Default for HnswParams {
    /// Recall@10 above 0.95 at 100,000 clustered 384-dimensional vectors with queries
    /// under 3 ms (BENCHMARKS.md, `maas bench ann`).
    fn default() -> Self {
        HnswParams { m: 16, ef_construction: 128, ef_search: 192, seed: 0x6d61_6173_686e_7377 }
    }
}

/// The highest level a node may get (the expected top level of a million nodes at m = 16 is
/// about 5).
const MAX_LEVEL: usize = 16;

/// A node and its distance to the point being searched for (the negated dot product).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub dist: f32,
    pub node: u32,
}

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist.total_cmp(&other.dist).then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Nodes already reached in one search.
struct Visited(Vec<u64>);

impl Visited {
    fn new(nodes: usize) -> Self {
        Visited(vec![0; nodes.div_ceil(64)])
    }

    /// Marks the node; true when it was not marked before.
    fn insert(&mut self, node: u32) -> bool {
        let (word, bit) = (node as usize / 64, node % 64);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// The graph and its vectors.
#[derive(Debug, Clone)]
pub struct Hnsw {
    params: HnswParams,
    dimension: usize,
    /// Node `i`'s vector is `vectors[i * dimension..(i + 1) * dimension]`.
    vectors: Vec<f32>,
    /// `links[node][layer]`: the node's neighbours on each layer it is on.
    links: Vec<Vec<Vec<u32>>>,
    entry: Option<u32>,
}

impl Hnsw {
    pub fn new(dimension: usize, params: HnswParams) -> Self {
        assert!(params.m >= 2, "hnsw needs m >= 2");
        Hnsw { params, dimension, vectors: Vec::new(), links: Vec::new(), entry: None }
    }

    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Nodes in the graph, deleted ones included.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn vector(&self, node: u32) -> &[f32] {
        let start = node as usize * self.dimension;
        &self.vectors[start..start + self.dimension]
    }

    fn dist(&self, query: &[f32], node: u32) -> f32 {
        -dot(query, self.vector(node))
    }

    fn max_links(&self, layer: usize) -> usize {
        if layer == 0 { self.params.m * 2 } else { self.params.m }
    }

    /// The node's level: `floor(-ln(u) / ln(m))` for `u` uniform in (0, 1], drawn from a
    /// SplitMix64 of the seed and the node's number.
    fn level_for(&self, node: u32) -> usize {
        let bits = splitmix64(self.params.seed ^ u64::from(node).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // 53 random bits as an f64 in (0, 1].
        #[allow(clippy::cast_precision_loss, reason = "53 bits fit an f64 mantissa exactly")]
        let uniform = ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64;
        #[allow(clippy::cast_precision_loss, reason = "m is small")]
        let level = -uniform.ln() / (self.params.m as f64).ln();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "non-negative, capped below")]
        let level = level.floor() as usize;
        level.min(MAX_LEVEL)
    }

    /// Adds a vector (already prepared for the metric) and links it; returns its node.
    pub fn insert(&mut self, vector: &[f32]) -> u32 {
        assert_eq!(vector.len(), self.dimension, "the shard checks dimensions first");
        let node = u32::try_from(self.links.len()).expect("a shard holds fewer than 2^32 nodes");
        let level = self.level_for(node);
        self.vectors.extend_from_slice(vector);
        self.links.push(vec![Vec::new(); level + 1]);
        let Some(entry) = self.entry else {
            self.entry = Some(node);
            return node;
        };
        let top = self.links[entry as usize].len() - 1;
        let mut nearest = Scored { dist: self.dist(vector, entry), node: entry };
        for layer in (level + 1..=top).rev() {
            nearest = self.greedy(vector, nearest, layer);
        }
        let mut entry_points = vec![nearest];
        let mut visited = Visited::new(self.len());
        for layer in (0..=level.min(top)).rev() {
            let found =
                self.search_layer(vector, &entry_points, self.params.ef_construction, layer, &|_| true, &mut visited);
            let neighbours = self.select_neighbours(&found, self.params.m);
            for &neighbour in &neighbours {
                self.link(neighbour, node, layer);
            }
            self.links[node as usize][layer] = neighbours;
            entry_points = found;
            visited = Visited::new(self.len());
        }
        if level > top {
            self.entry = Some(node);
        }
        node
    }

    /// Adds `node` to `from`'s links on `layer`, pruning them back to the layer's limit with
    /// the same heuristic that chose them.
    fn link(&mut self, from: u32, node: u32, layer: usize) {
        let limit = self.max_links(layer);
        let mut links = std::mem::take(&mut self.links[from as usize][layer]);
        links.push(node);
        if links.len() > limit {
            let base = self.vector(from);
            let mut scored: Vec<Scored> =
                links.iter().map(|&n| Scored { dist: -dot(base, self.vector(n)), node: n }).collect();
            scored.sort_unstable();
            links = self.select_neighbours(&scored, limit);
        }
        self.links[from as usize][layer] = links;
    }

    /// The neighbour-selection heuristic (the paper's algorithm 4, without extending the
    /// candidates): walking candidates from the closest, keep one only if it is closer to
    /// the base than to every one kept so far, so links spread in different directions
    /// and clusters stay connected. `candidates` is sorted closest first.
    fn select_neighbours(&self, candidates: &[Scored], m: usize) -> Vec<u32> {
        if candidates.len() <= m {
            return candidates.iter().map(|c| c.node).collect();
        }
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for candidate in candidates {
            if kept.len() == m {
                break;
            }
            let vector = self.vector(candidate.node);
            if kept.iter().all(|&k| -dot(vector, self.vector(k)) >= candidate.dist) {
                kept.push(candidate.node);
            }
        }
        kept
    }

    /// Walks to the closest neighbour on `layer` until none is closer.
    fn greedy(&self, query: &[f32], mut nearest: Scored, layer: usize) -> Scored {
        loop {
            let mut moved = false;
            for &neighbour in &self.links[nearest.node as usize][layer] {
                let dist = self.dist(query, neighbour);
                if dist < nearest.dist {
                    nearest = Scored { dist, node: neighbour };
                    moved = true;
                }
            }
            if !moved {
                return nearest;
            }
        }
    }

    /// The best-first search of one layer (the paper's algorithm 2): up to `ef` accepted
    /// nodes closest to `query`, closest first. Nodes that are not accepted are still
    /// walked through; the search ends when the closest unexpanded candidate is farther
    /// than the farthest of `ef` accepted results.
    fn search_layer(
        &self,
        query: &[f32],
        entry_points: &[Scored],
        ef: usize,
        layer: usize,
        accept: &dyn Fn(u32) -> bool,
        visited: &mut Visited,
    ) -> Vec<Scored> {
        let mut candidates: BinaryHeap<Reverse<Scored>> = BinaryHeap::new();
        let mut results: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef + 1);
        for &point in entry_points {
            if visited.insert(point.node) {
                candidates.push(Reverse(point));
                if accept(point.node) {
                    results.push(point);
                }
            }
        }
        while results.len() > ef {
            results.pop();
        }
        while let Some(Reverse(closest)) = candidates.pop() {
            if results.len() >= ef && results.peek().is_some_and(|worst| closest.dist > worst.dist) {
                break;
            }
            for &neighbour in &self.links[closest.node as usize][layer] {
                if !visited.insert(neighbour) {
                    continue;
                }
                let dist = self.dist(query, neighbour);
                if results.len() < ef || results.peek().is_some_and(|worst| dist < worst.dist) {
                    let scored = Scored { dist, node: neighbour };
                    candidates.push(Reverse(scored));
                    if accept(neighbour) {
                        results.push(scored);
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
        }
        results.into_sorted_vec()
    }

    /// Up to `k` accepted nodes closest to `query` (prepared for the metric), closest
    /// first, keeping `ef` candidates (at least `k`).
    pub fn search(&self, query: &[f32], k: usize, ef: usize, accept: &dyn Fn(u32) -> bool) -> Vec<Scored> {
        let Some(entry) = self.entry else { return Vec::new() };
        if k == 0 {
            return Vec::new();
        }
        let top = self.links[entry as usize].len() - 1;
        let mut nearest = Scored { dist: self.dist(query, entry), node: entry };
        for layer in (1..=top).rev() {
            nearest = self.greedy(query, nearest, layer);
        }
        let mut visited = Visited::new(self.len());
        let mut found = self.search_layer(query, &[nearest], ef.max(k), 0, accept, &mut visited);
        found.truncate(k);
        found
    }

    /// Writes the graph (vectors and links) in the snapshot format.
    pub(crate) fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        codec::put_u64(out, self.links.len() as u64)?;
        codec::put_u32(out, self.entry.unwrap_or(u32::MAX))?;
        for (node, layers) in self.links.iter().enumerate() {
            let node = u32::try_from(node).expect("fewer than 2^32 nodes");
            codec::put_f32s(out, self.vector(node))?;
            codec::put_u8(out, u8::try_from(layers.len()).expect("at most MAX_LEVEL + 1 layers"))?;
            for links in layers {
                codec::put_u32(out, u32::try_from(links.len()).expect("links are bounded by 2m"))?;
                for &link in links {
                    codec::put_u32(out, link)?;
                }
            }
        }
        Ok(())
    }

    /// Reads a graph written by [`Hnsw::write_to`]; `None` names what is inconsistent.
    pub(crate) fn read_from(input: &mut impl Read, dimension: usize, params: HnswParams) -> Result<Self, String> {
        let io = |e: std::io::Error| e.to_string();
        let nodes = codec::get_u64(input).map_err(io)?;
        let nodes = u32::try_from(nodes).map_err(|_| format!("{nodes} nodes is too many"))?;
        let entry = codec::get_u32(input).map_err(io)?;
        let mut graph = Hnsw::new(dimension, params);
        graph.vectors.reserve(nodes as usize * dimension);
        graph.links.reserve(nodes as usize);
        for _ in 0..nodes {
            codec::get_f32s_into(input, dimension, &mut graph.vectors).map_err(io)?;
            let layers = usize::from(codec::get_u8(input).map_err(io)?);
            if layers == 0 || layers > MAX_LEVEL + 1 {
                return Err(format!("a node has {layers} layers"));
            }
            let mut node_links = Vec::with_capacity(layers);
            for layer in 0..layers {
                let count = codec::get_u32(input).map_err(io)? as usize;
                if count > graph.max_links(layer) {
                    return Err(format!("a node has {count} links on layer {layer}"));
                }
                let mut links = Vec::with_capacity(count);
                for _ in 0..count {
                    let link = codec::get_u32(input).map_err(io)?;
                    if link >= nodes {
                        return Err(format!("a link to node {link} of {nodes}"));
                    }
                    links.push(link);
                }
                node_links.push(links);
            }
            graph.links.push(node_links);
        }
        graph.entry = match entry {
            u32::MAX if nodes == 0 => None,
            entry if entry < nodes => Some(entry),
            entry => return Err(format!("entry point {entry} of {nodes} nodes")),
        };
        Ok(graph)
    }
}

/// SplitMix64's output function (Steele, Lea and Flood, 2014): a bijective mix of 64 bits.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::distance::{exact_top_k, normalise};

    fn random_unit_vectors(count: usize, dimension: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                let mut v: Vec<f32> = (0..dimension)
                    .map(|_| {
                        state = splitmix64(state);
                        #[allow(clippy::cast_precision_loss)]
                        let x = (state >> 40) as f32 / (1u64 << 24) as f32;
                        x - 0.5
                    })
                    .collect();
                normalise(&mut v, "test").unwrap();
                v
            })
            .collect()
    }

    #[test]
    fn finds_each_inserted_vector_first() {
        let vectors = random_unit_vectors(500, 16, 7);
        let mut graph = Hnsw::new(16, HnswParams::default());
        for v in &vectors {
            graph.insert(v);
        }
        for (i, v) in vectors.iter().enumerate() {
            let found = graph.search(v, 1, 32, &|_| true);
            assert_eq!(found[0].node as usize, i);
        }
    }

    #[test]
    fn the_same_inserts_build_the_same_graph() {
        let vectors = random_unit_vectors(300, 8, 3);
        let build = || {
            let mut graph = Hnsw::new(8, HnswParams::default());
            for v in &vectors {
                graph.insert(v);
            }
            graph
        };
        assert_eq!(build().links, build().links);
    }

    #[test]
    fn recall_at_10_against_exact_search() {
        let vectors = random_unit_vectors(2000, 24, 11);
        let mut graph = Hnsw::new(24, HnswParams::default());
        for v in &vectors {
            graph.insert(v);
        }
        let queries = random_unit_vectors(50, 24, 99);
        let mut found_total = 0;
        for q in &queries {
            let exact = exact_top_k(q, vectors.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 10);
            let approx: Vec<u64> = graph.search(q, 10, 96, &|_| true).iter().map(|s| u64::from(s.node)).collect();
            found_total += exact.iter().filter(|h| approx.contains(&h.chunk_id)).count();
        }
        let recall =
            f64::from(u32::try_from(found_total).unwrap()) / f64::from(u32::try_from(queries.len() * 10).unwrap());
        assert!(recall >= 0.95, "recall@10 {recall}");
    }

    #[test]
    fn rejected_nodes_never_come_back_but_still_carry_the_search() {
        let vectors = random_unit_vectors(400, 8, 5);
        let mut graph = Hnsw::new(8, HnswParams::default());
        for v in &vectors {
            graph.insert(v);
        }
        let even = |node: u32| node.is_multiple_of(2);
        let found = graph.search(&vectors[1], 10, 64, &even);
        assert_eq!(found.len(), 10);
        assert!(found.iter().all(|s| s.node.is_multiple_of(2)));
    }

    #[test]
    fn a_written_graph_reads_back_the_same() {
        let vectors = random_unit_vectors(100, 4, 1);
        let mut graph = Hnsw::new(4, HnswParams::default());
        for v in &vectors {
            graph.insert(v);
        }
        let mut bytes = Vec::new();
        graph.write_to(&mut bytes).unwrap();
        let read = Hnsw::read_from(&mut bytes.as_slice(), 4, HnswParams::default()).unwrap();
        assert_eq!(read.links, graph.links);
        assert_eq!(read.vectors, graph.vectors);
        assert_eq!(read.entry, graph.entry);
    }
}
