//! Seeded synthetic embeddings for tests and benchmarks: a mixture of Gaussians on the
//! unit sphere, which is closer to real sentence embeddings (topics) than uniform noise.

use super::distance::normalise;
use super::hnsw::splitmix64;

/// A seeded source of uniform and normal numbers (SplitMix64, Box–Muller).
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "53 bits fit an f64 mantissa exactly")]
        let unit = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        unit
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        #[allow(clippy::cast_possible_truncation, reason = "f32 precision is enough")]
        let z = ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32;
        z
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "the product is below n")]
        let index = ((u128::from(self.next_u64()) * n as u128) >> 64) as usize;
        index
    }
}

/// Unit vectors around `clusters` random centres: each is a centre plus Gaussian noise of
/// total length about `spread`, normalised. Queries drawn with another seed from the same
/// centres come from the same distribution.
#[derive(Debug, Clone)]
pub struct ClusteredVectors {
    dimension: usize,
    spread: f32,
    centres: Vec<Vec<f32>>,
}

impl ClusteredVectors {
    pub fn new(dimension: usize, clusters: usize, spread: f32, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed);
        let centres = (0..clusters.max(1))
            .map(|_| {
                let mut centre: Vec<f32> = (0..dimension).map(|_| rng.normal()).collect();
                normalise(&mut centre, "a centre").expect("a Gaussian vector is not zero");
                centre
            })
            .collect();
        ClusteredVectors { dimension, spread, centres }
    }

    /// `count` vectors drawn with `seed`.
    pub fn sample(&self, count: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = SeededRng::new(seed);
        #[allow(clippy::cast_precision_loss, reason = "dimensions are small")]
        let scale = self.spread / (self.dimension as f32).sqrt();
        (0..count)
            .map(|_| {
                let centre = &self.centres[rng.below(self.centres.len())];
                let mut v: Vec<f32> = centre.iter().map(|c| c + scale * rng.normal()).collect();
                normalise(&mut v, "a sample").expect("a perturbed unit vector is not zero");
                v
            })
            .collect()
    }
}
