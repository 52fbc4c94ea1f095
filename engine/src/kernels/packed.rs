//! Dense weight matrices packed once, at load, in the layout the CPU's products read, and
//! those products (`x @ W^T`) for any number of rows: one for a single stream's decode
//! step, a few for a batch of streams, hundreds for a prefill.
//!
//! The layout: `W^T` (`[in, out]`) cut into panels of [`PANEL`] columns, each panel stored
//! row after row (`[in][PANEL]`), the panels one after another, the last padded with
//! zero columns; 64-byte aligned. A product's inner loop then reads one panel row as four
//! aligned 16-lane vectors and multiplies them by [`TILE_ROWS`] activations broadcast one
//! by one, keeping the `TILE_ROWS x PANEL` output tile in registers (24 of AVX-512's 32).
//! (Measured on a Zen 5 VM against tiles of 12 x 32 and 8 x 48: the same or faster by up
//! to a tenth.) Nothing of the weights is packed per product (`gemm` packed its right-hand side on
//! every call), and a single row reads each thread's share of the matrix as one
//! sequential stream, which is what makes a decode step run at memory bandwidth.
//!
//! Loops, outermost first, each thread owning a contiguous range of panels: blocks of up
//! to [`DEPTH`] inner positions (for a prefill; a decode step's few rows take the whole
//! depth at once); blocks of panels that fit [`BLOCK_BYTES`] (they stay in the core's L2
//! cache while every tile of rows passes over them); tiles of [`TILE_ROWS`] rows (the
//! activations' tile, packed `[depth][rows]`, stays in L1); the block's panels. The
//! first depth block writes the output, later ones add to it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Output;
use crate::error::{EngineError, Result};

/// Columns per panel: four AVX-512 vectors of f32.
pub(crate) const PANEL: usize = 64;
/// Rows of the output tile a kernel call keeps in registers.
const TILE_ROWS: usize = 6;
const _: () = assert!(TILE_ROWS == 6, "`Tile::run` dispatches on 1 to 6 rows");
/// Most inner positions per block when more than [`WHOLE_DEPTH_MAX_ROWS`] rows are
/// multiplied (the depth is cut into equal blocks of at most this). Long blocks visit the
/// output fewer times (a prefill's gate/up output is 10 MB per thread, past L2): a 896-deep
/// product takes one block, a 4864-deep one four; an activation tile of 1280 stays in a
/// 48 KiB L1. On a Zen 5 VM, against 256: gate/up 0.93 → 1.05-1.14 of `gemm`'s rate,
/// down 0.90 → 0.92-0.96 (`packed_product_rates`).
const DEPTH: usize = 1280;
/// Up to this many rows (a decode step's batch), each panel is multiplied over its whole
/// depth, so that a thread reads its panels as one sequential stream from memory (the
/// further tiles of rows find the panel in L2).
const WHOLE_DEPTH_MAX_ROWS: usize = 64;
/// Bytes of weights per block of panels (half of a 1 MiB L2 cache).
const BLOCK_BYTES: usize = 512 * 1024;
/// Rows at a time of the portable tile: 128 accumulators, sixteen 8-lane registers.
const PORTABLE_ROWS: usize = 128 / PANEL;
/// Below this many activation elements, packing them is not worth sending to the pool.
const PARALLEL_PACK_MIN: usize = 1 << 16;

/// Sixteen f32, aligned to a cache line: the unit the packed data is allocated in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A dense `[out, in]` matrix `W` packed for `x @ W^T` (see the module's documentation).
pub(crate) struct PackedMatrix {
    inner: usize,
    columns: usize,
    lines: Vec<Line>,
}

impl PackedMatrix {
    /// Packs the row-major `[out, inner]` matrix `weight`.
    pub(crate) fn new(weight: &[f32], out: usize, inner: usize) -> Result<Self> {
        Self::filled(weight.len(), out, inner, true, |panel, values| {
            for lane in 0..PANEL.min(out - panel * PANEL) {
                let row = &weight[(panel * PANEL + lane) * inner..][..inner];
                for (position, &value) in row.iter().enumerate() {
                    values[position * PANEL + lane] = value;
                }
            }
        })
    }

    /// Packs `W` given as its transpose, the row-major `[inner, out]` `transposed` (a
    /// layer's cached values, for attention's weighted sums).
    pub(crate) fn from_transposed(transposed: &[f32], inner: usize, out: usize) -> Result<Self> {
        Self::filled(transposed.len(), out, inner, false, |panel, values| {
            let width = PANEL.min(out - panel * PANEL);
            for (position, values) in values.chunks_exact_mut(PANEL).enumerate() {
                values[..width].copy_from_slice(&transposed[position * out + panel * PANEL..][..width]);
            }
        })
    }

    /// A zeroed `[out, inner]` packing whose panels `fill` writes (panel index, its
    /// `[inner][PANEL]` values), in parallel or not; `given` values were handed in.
    fn filled(
        given: usize,
        out: usize,
        inner: usize,
        parallel: bool,
        fill: impl Fn(usize, &mut [f32]) + Send + Sync,
    ) -> Result<Self> {
        if out == 0 || inner == 0 || given != out * inner {
            return Err(EngineError::BadRequest(format!("{given} values cannot be packed as [{out}, {inner}]")));
        }
        let panel_len = inner * PANEL;
        let mut packed =
            Self { inner, columns: out, lines: vec![Line([0.0; 16]); out.div_ceil(PANEL) * panel_len / 16] };
        if parallel {
            packed.values_mut().par_chunks_mut(panel_len).enumerate().for_each(|(panel, values)| fill(panel, values));
        } else {
            packed.values_mut().chunks_mut(panel_len).enumerate().for_each(|(panel, values)| fill(panel, values));
        }
        Ok(packed)
    }

    /// `in`, the length of a row of `W`.
    pub(crate) fn inner(&self) -> usize {
        self.inner
    }

    /// `out`, the number of rows of `W` (columns of a product).
    pub(crate) fn columns(&self) -> usize {
        self.columns
    }

    /// Bytes the packed matrix holds (and a one-row product reads).
    pub(crate) fn bytes(&self) -> usize {
        self.lines.len() * size_of::<Line>()
    }

    fn values(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]`, 64 bytes with no padding, so the
        // lines are `16 * len` contiguous, initialised f32.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.lines.len() * 16) }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `values`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.lines.len() * 16) }
    }

    /// Row `index` of `W` (`inner` values) appended to `into`.
    pub(crate) fn row_into(&self, index: usize, into: &mut Vec<f32>) -> Result<()> {
        if index >= self.columns {
            return Err(EngineError::BadRequest(format!("row {index} of a matrix of {} rows", self.columns)));
        }
        let panel = &self.values()[(index / PANEL) * self.inner * PANEL..][..self.inner * PANEL];
        into.extend(panel.iter().skip(index % PANEL).step_by(PANEL));
        Ok(())
    }

    /// `x @ W^T` for the row-major `[rows, inner]` `x`: a row-major `[rows, columns]`.
    pub(crate) fn product(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (inner, columns) = (self.inner, self.columns);
        if rows == 0 || x.len() != rows * inner {
            return Err(EngineError::BadRequest(format!(
                "a product of {} values as {rows} rows with a matrix of [{columns}, {inner}]",
                x.len()
            )));
        }
        let depth = if rows <= WHOLE_DEPTH_MAX_ROWS { inner } else { inner.div_ceil(inner.div_ceil(DEPTH)) };
        let packed_rows;
        let activations = if rows == 1 {
            x
        } else {
            packed_rows = pack_rows(x, rows, inner, depth, true);
            &packed_rows[..]
        };
        let panels = columns.div_ceil(PANEL);
        let tasks = rayon::current_num_threads().min(panels).max(1);
        let block_panels = (BLOCK_BYTES / (depth * PANEL * size_of::<f32>())).max(1);
        // Not zeroed: the first depth block writes every element of every tile.
        let mut out = Vec::<f32>::with_capacity(rows * columns);
        let target = Output(out.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|task| {
            // The whole `Output` (a closure would capture only its pointer, not `Sync`).
            let dst = target;
            let owned = panels * task / tasks..panels * (task + 1) / tasks;
            for start in (0..inner).step_by(depth) {
                let depth = depth.min(inner - start);
                let block = &activations[start * rows..][..depth * rows];
                for first in owned.clone().step_by(block_panels) {
                    // SAFETY: rows `0..rows` and the columns of panels `first..` (within
                    // `columns`) of the `rows x columns` row-major `out`, which lives until
                    // `into_par_iter` has joined; the tasks own disjoint panels, so no two
                    // write the same element. Depth blocks after the first read what the
                    // first wrote.
                    unsafe {
                        self.run_tiles(
                            block,
                            (start, depth),
                            first..(first + block_panels).min(owned.end),
                            columns,
                            (dst.0, columns),
                        );
                    }
                }
            }
        });
        // SAFETY: the panels of the tasks tile `0..columns` and each task's first depth
        // block wrote every row of its panels' columns: all `rows * columns` are set.
        unsafe { out.set_len(rows * columns) };
        Ok(out)
    }
}

impl PackedMatrix {
    /// `x @ W[..columns, ..depth]^T` on the calling thread, for `x` `[rows, depth]`
    /// row-major (`depth <= inner`, `columns <= self.columns()`): written at `out`, rows
    /// `stride` apart. Attention's products: scores against the first keys, weighted
    /// sums of the first values.
    ///
    /// # Safety
    /// `out` must be valid for writes of `rows` rows of `columns` values, `stride` apart,
    /// that no other thread touches meanwhile.
    pub(crate) unsafe fn product_here(
        &self,
        x: &[f32],
        rows: usize,
        depth: usize,
        columns: usize,
        (out, stride): (*mut f32, usize),
    ) -> Result<()> {
        if rows == 0 || depth == 0 || depth > self.inner || columns > self.columns || x.len() != rows * depth {
            return Err(EngineError::BadRequest(format!(
                "a product of {} values as [{rows}, {depth}] with the first {columns} rows of a matrix of [{}, {}]",
                x.len(),
                self.columns,
                self.inner
            )));
        }
        let activations = pack_rows(x, rows, depth, depth, false);
        // SAFETY: the caller's region, `rows` rows of `columns` values.
        unsafe { self.run_tiles(&activations, (0, depth), 0..columns.div_ceil(PANEL), columns, (out, stride)) };
        Ok(())
    }
}

impl PackedMatrix {
    /// One depth block of activations (`block`, packed by [`pack_rows`]: its rows over
    /// inner positions `start..start + depth`) times `panels`, tile of rows by tile, each
    /// over the panels in turn: written at `out`, rows `stride` apart, the output's first
    /// `columns` columns only; added to what is there when `start > 0`.
    ///
    /// # Safety
    /// `out` must be valid for reads and writes of the block's rows of the panels' columns
    /// (within `columns`), `stride` apart, that no other thread touches meanwhile.
    unsafe fn run_tiles(
        &self,
        block: &[f32],
        (start, depth): (usize, usize),
        panels: std::ops::Range<usize>,
        columns: usize,
        (out, stride): (*mut f32, usize),
    ) {
        let weights = self.values();
        for (tile_index, tile) in block.chunks(TILE_ROWS * depth).enumerate() {
            for panel in panels.clone() {
                let tile = Tile {
                    rows: tile.len() / depth,
                    depth,
                    activations: tile,
                    weights: &weights[(panel * self.inner + start) * PANEL..][..depth * PANEL],
                    columns: PANEL.min(columns - panel * PANEL),
                    accumulate: start > 0,
                };
                // SAFETY: rows `tile_index * TILE_ROWS..` (`tile.rows` of the block's) and
                // columns `panel * PANEL..` (`tile.columns`, within `columns`): the
                // caller's region.
                unsafe { tile.run(out.add(tile_index * TILE_ROWS * stride + panel * PANEL), stride) };
            }
        }
    }
}

/// The activations `x` (`[rows, inner]`) laid out for [`Tile`]s: per block of `depth`
/// inner positions (at offset `start * rows`), per tile of up to [`TILE_ROWS`] rows (at
/// `tile * TILE_ROWS * depth` within the block), `[depth][tile rows]`.
fn pack_rows(x: &[f32], rows: usize, inner: usize, depth: usize, parallel: bool) -> Vec<f32> {
    let mut packed = Vec::with_capacity(rows * inner);
    let mut pieces = Vec::new();
    let mut rest = &mut packed.spare_capacity_mut()[..rows * inner];
    for start in (0..inner).step_by(depth) {
        let depth = depth.min(inner - start);
        let (block, tail) = rest.split_at_mut(rows * depth);
        pieces
            .extend(block.chunks_mut(TILE_ROWS * depth).enumerate().map(|(tile, values)| (start, depth, tile, values)));
        rest = tail;
    }
    let pack = |(start, depth, tile, values): (usize, usize, usize, &mut [MaybeUninit<f32>])| {
        let tile_rows = values.len() / depth;
        for row in 0..tile_rows {
            let source = &x[(tile * TILE_ROWS + row) * inner + start..][..depth];
            for (position, &value) in source.iter().enumerate() {
                values[position * tile_rows + row].write(value);
            }
        }
    };
    if parallel && rows * inner >= PARALLEL_PACK_MIN {
        pieces.into_par_iter().for_each(pack);
    } else {
        pieces.into_iter().for_each(pack);
    }
    // SAFETY: the pieces tile the first `rows * inner` elements (blocks of `rows * depth`
    // covering `inner`, each cut into tiles of `tile_rows * depth`), and each wrote all
    // of its elements.
    unsafe { packed.set_len(rows * inner) };
    packed
}

/// One kernel call: a tile of up to [`TILE_ROWS`] rows times one panel, over `depth`
/// inner positions.
struct Tile<'a> {
    rows: usize,
    depth: usize,
    /// `[depth][rows]`.
    activations: &'a [f32],
    /// `[depth][PANEL]`, 64-byte aligned.
    weights: &'a [f32],
    /// Columns of the panel that are in the output (the rest are padding).
    columns: usize,
    /// Add to the output rather than overwrite it.
    accumulate: bool,
}

impl Tile<'_> {
    /// Writes (or adds) the tile's `rows x columns` at `out`, rows `stride` apart.
    ///
    /// # Safety
    /// `out` must be valid for reads and writes of `rows` rows of `columns` values,
    /// `stride` apart, that no other thread touches meanwhile (and initialised when
    /// `accumulate`).
    unsafe fn run(&self, out: *mut f32, stride: usize) {
        // Checked in release builds too: the kernels below load without bounds checks, and
        // one comparison per tile (thousands of FMAs) costs nothing measurable.
        assert!((1..=TILE_ROWS).contains(&self.rows) && self.columns <= PANEL, "a tile of {} rows", self.rows);
        assert!(self.activations.len() == self.rows * self.depth && self.weights.len() == self.depth * PANEL);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the caller's promise on `out` is passed on.
            unsafe {
                match self.rows {
                    1 => avx512::tile::<1>(self, out, stride),
                    2 => avx512::tile::<2>(self, out, stride),
                    3 => avx512::tile::<3>(self, out, stride),
                    4 => avx512::tile::<4>(self, out, stride),
                    5 => avx512::tile::<5>(self, out, stride),
                    _ => avx512::tile::<TILE_ROWS>(self, out, stride),
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::avx2() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fused(tile: &Tile<'_>, out: *mut f32, stride: usize) {
                // SAFETY: passed on from `run`.
                unsafe { tile.portable::<true>(out, stride) }
            }
            // SAFETY: AVX2 and FMA are present; the caller's promise is passed on.
            unsafe { fused(self, out, stride) };
            return;
        }
        // FMA is part of every aarch64 CPU; elsewhere without it, `mul_add` would be a call.
        // SAFETY: passed on from the caller.
        unsafe { self.portable::<{ cfg!(target_arch = "aarch64") }>(out, stride) }
    }

    /// The tile without intrinsics, [`PORTABLE_ROWS`] rows at a time, for CPUs without
    /// AVX-512; `FUSED` multiplies and adds in one rounding.
    ///
    /// # Safety
    /// As [`Tile::run`].
    #[inline(always)]
    unsafe fn portable<const FUSED: bool>(&self, out: *mut f32, stride: usize) {
        for first in (0..self.rows).step_by(PORTABLE_ROWS) {
            let count = (self.rows - first).min(PORTABLE_ROWS);
            let mut sums = [[0.0f32; PANEL]; PORTABLE_ROWS];
            for (position, weights) in self.weights.chunks_exact(PANEL).enumerate() {
                let activations = &self.activations[position * self.rows + first..][..count];
                for (sums, &activation) in sums.iter_mut().zip(activations) {
                    for (sum, &weight) in sums.iter_mut().zip(weights) {
                        *sum = if FUSED { activation.mul_add(weight, *sum) } else { *sum + activation * weight };
                    }
                }
            }
            for (row, sums) in sums.iter().take(count).enumerate() {
                // SAFETY: row `first + row` < `rows`, `columns` values: the caller's promise.
                let out = unsafe { std::slice::from_raw_parts_mut(out.add((first + row) * stride), self.columns) };
                for (out, &sum) in out.iter_mut().zip(sums) {
                    *out = if self.accumulate { *out + sum } else { sum };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
        _mm512_set1_ps, _mm512_setzero_ps,
    };

    use super::{PANEL, Tile};

    /// Vectors of 16 lanes per panel row.
    const VECTORS: usize = PANEL / 16;

    /// [`Tile::run`] for `R` rows: `R * VECTORS` accumulators in registers, per inner
    /// position `VECTORS` aligned loads of the panel's row and `R` broadcasts of the
    /// activations.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `tile.rows == R`; `out` as in [`Tile::run`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(tile: &Tile<'_>, out: *mut f32, stride: usize) {
        let mut sums = [[_mm512_setzero_ps(); VECTORS]; R];
        let (mut activations, mut weights) = (tile.activations.as_ptr(), tile.weights.as_ptr());
        // SAFETY: `weights` walks `depth` rows of `PANEL` (64-byte aligned, as the panel
        // starts on a multiple of `PANEL` values from an aligned base) and `activations`
        // `depth` rows of `R`, the lengths `Tile::run` checked.
        unsafe {
            // Two positions per iteration: on an Intel Xeon VM, 163-172 GFLOP/s a thread
            // in L1/L2 against 152-158 one at a time.
            for _ in 0..tile.depth / 2 {
                step::<R>(&mut sums, activations, weights);
                step::<R>(&mut sums, activations.add(R), weights.add(PANEL));
                activations = activations.add(2 * R);
                weights = weights.add(2 * PANEL);
            }
            if tile.depth % 2 == 1 {
                step::<R>(&mut sums, activations, weights);
            }
        }
        let columns = u32::try_from(tile.columns).unwrap_or(u32::MAX);
        let mut masks = [0u16; VECTORS];
        for (vector, mask_of) in masks.iter_mut().enumerate() {
            #[allow(clippy::cast_possible_truncation)]
            let skipped = (16 * vector) as u32;
            *mask_of = mask(columns.saturating_sub(skipped).min(16));
        }
        for (row, sums) in sums.iter().enumerate() {
            for (vector, (&sum, &lanes)) in sums.iter().zip(&masks).enumerate() {
                // Masked-off lanes are neither read nor written; the pointer is formed
                // with `wrapping_add`, as a fully masked vector's may lie past the buffer.
                let at = out.wrapping_add(row * stride + 16 * vector);
                // SAFETY: the unmasked lanes are in the tile's row `row`, `columns`
                // values: the caller's promise.
                unsafe {
                    let sum = if tile.accumulate { _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes, at)) } else { sum };
                    _mm512_mask_storeu_ps(at, lanes, sum);
                }
            }
        }
    }

    /// One inner position of [`tile`]: the panel's row at `weights` times the `R`
    /// activations at `activations`, added to `sums`. Inlined into `tile`, whose
    /// AVX-512 it then has.
    ///
    /// # Safety
    /// `weights` is valid for `PANEL` values, 64-byte aligned; `activations` for `R`.
    #[inline(always)]
    unsafe fn step<const R: usize>(sums: &mut [[__m512; VECTORS]; R], activations: *const f32, weights: *const f32) {
        // SAFETY: the caller's pointers are in bounds and `weights` 64-byte aligned.
        unsafe {
            let mut row_of_panel = [_mm512_setzero_ps(); VECTORS];
            for (vector, loaded) in row_of_panel.iter_mut().enumerate() {
                *loaded = _mm512_load_ps(weights.add(16 * vector));
            }
            for (row, sums) in sums.iter_mut().enumerate() {
                let activation = _mm512_set1_ps(*activations.add(row));
                for (sum, &loaded) in sums.iter_mut().zip(&row_of_panel) {
                    *sum = _mm512_fmadd_ps(activation, loaded, *sum);
                }
            }
        }
    }

    /// The lowest `lanes` (at most 16) bits set.
    #[allow(clippy::cast_possible_truncation)]
    fn mask(lanes: u32) -> u16 {
        ((1u32 << lanes) - 1) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x @ W^T` the plain way, in f64.
    pub(super) fn reference(x: &[f32], weight: &[f32], rows: usize, out: usize, inner: usize) -> Vec<f32> {
        let mut result = vec![0.0; rows * out];
        for row in 0..rows {
            for column in 0..out {
                let sum: f64 =
                    (0..inner).map(|p| f64::from(x[row * inner + p]) * f64::from(weight[column * inner + p])).sum();
                #[allow(clippy::cast_possible_truncation)]
                {
                    result[row * out + column] = sum as f32;
                }
            }
        }
        result
    }

    pub(super) fn values(count: usize, seed: u32) -> Vec<f32> {
        // A small linear congruential sequence in [-1, 1).
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                #[allow(clippy::cast_precision_loss)]
                let unit = (state >> 8) as f32 / (1u32 << 24) as f32;
                unit * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn packed_products_match_a_plain_product() -> anyhow::Result<()> {
        // Columns that leave a partial panel; rows of one tile, a partial tile, many tiles.
        // More than `WHOLE_DEPTH_MAX_ROWS` rows with a depth past `DEPTH` take the blocked
        // path: three depth blocks, the later ones adding to the output.
        for &(out, inner, rows) in &[
            (70, 50, &[1, 2, 5, 12, 13, 40, 70][..]),
            (64, 600, &[1, 6, 7, 65]),
            (33, 257, &[3, 66]),
            (1, 3, &[1, 2]),
            (70, 2600, &[1, 70]),
        ] {
            let weight = values(out * inner, 7);
            let matrix = PackedMatrix::new(&weight, out, inner)?;
            assert_eq!((matrix.columns(), matrix.inner()), (out, inner));
            for &rows in rows {
                let x = values(rows * inner, 11 + u32::try_from(rows)?);
                let ours = matrix.product(&x, rows)?;
                let expected = reference(&x, &weight, rows, out, inner);
                let worst = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "[{rows}, {inner}] x [{inner}, {out}] differs by {worst}");
            }
            let mut row = Vec::new();
            matrix.row_into(out - 1, &mut row)?;
            assert_eq!(row, weight[(out - 1) * inner..]);
            assert!(matrix.row_into(out, &mut row).is_err());
        }
        assert!(PackedMatrix::new(&[1.0; 5], 2, 3).is_err());
        let matrix = PackedMatrix::new(&[1.0; 6], 2, 3)?;
        assert!(matrix.product(&[1.0; 4], 2).is_err());
        Ok(())
    }

    #[test]
    fn the_portable_tile_matches_the_dispatched_one() {
        let (rows, depth, columns, stride) = (TILE_ROWS - 1, 19, PANEL - 3, PANEL + 8);
        let activations = values(rows * depth, 3);
        let mut weights = vec![Line([0.0; 16]); depth * PANEL / 16];
        let flat: Vec<f32> = values(depth * PANEL, 5);
        for (line, chunk) in weights.iter_mut().zip(flat.chunks_exact(16)) {
            line.0.copy_from_slice(chunk);
        }
        // SAFETY: as in `PackedMatrix::values`.
        let weights = unsafe { std::slice::from_raw_parts(weights.as_ptr().cast::<f32>(), depth * PANEL) };
        for accumulate in [false, true] {
            let tile = Tile { rows, depth, activations: &activations, weights, columns, accumulate };
            let (mut dispatched, mut fused, mut plain) =
                (vec![1.0f32; rows * stride], vec![1.0f32; rows * stride], vec![1.0f32; rows * stride]);
            // SAFETY: each buffer holds `rows` rows of `stride` >= `columns` values.
            unsafe {
                tile.run(dispatched.as_mut_ptr(), stride);
                tile.portable::<true>(fused.as_mut_ptr(), stride);
                tile.portable::<false>(plain.as_mut_ptr(), stride);
            }
            for other in [&fused, &plain] {
                let worst = dispatched.iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "the tiles differ by {worst}");
            }
            // Columns past the tile's are untouched.
            assert!(
                dispatched.chunks(stride).all(|row| row[columns..].iter().all(|&v| (v - 1.0).abs() < f32::EPSILON))
            );
        }
    }
}

#[cfg(test)]
mod rates {
    use super::*;

    /// The products of a Qwen2.5-0.5B-shaped layer (a prefill's, a batch of 16, one row),
    /// timed (best of 7) and printed, for BENCHMARKS.md; each result's first and last rows
    /// are checked against the plain product. Run it in release:
    /// `RAYON_NUM_THREADS=2 cargo test --release -p maas-engine --lib -- --ignored --nocapture packed_product_rates`
    #[test]
    #[ignore = "a measurement: minutes in a debug build"]
    #[allow(clippy::cast_precision_loss)]
    fn packed_product_rates() -> anyhow::Result<()> {
        for &(rows, out, inner) in
            &[(512, 9728, 896), (512, 896, 4864), (512, 1152, 896), (16, 9728, 896), (1, 9728, 896)]
        {
            let weight = tests::values(out * inner, 3);
            let x = tests::values(rows * inner, 5);
            let matrix = PackedMatrix::new(&weight, out, inner)?;
            let mut best = f64::MAX;
            let mut result = Vec::new();
            for _ in 0..7 {
                let start = std::time::Instant::now();
                result = std::hint::black_box(matrix.product(&x, rows)?);
                best = best.min(start.elapsed().as_secs_f64());
            }
            for row in [0, rows - 1] {
                let expected = tests::reference(&x[row * inner..][..inner], &weight, 1, out, inner);
                let worst =
                    result[row * out..][..out].iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-3, "row {row} of [{rows}, {inner}] x [{inner}, {out}] differs by {worst}");
            }
            // The same product through `gemm` (single-threaded halves side by side, as
            // the engine ran it before), from `W^T` row-major.
            let transposed: Vec<f32> = (0..inner * out).map(|i| weight[(i % out) * inner + i / out]).collect();
            let half = out / 2;
            let mut theirs = vec![0.0f32; rows * out];
            let mut gemm_best = f64::MAX;
            for _ in 0..7 {
                let start = std::time::Instant::now();
                let target = super::super::Output(theirs.as_mut_ptr());
                [(0, half), (half, out - half)].into_par_iter().for_each(|(first, width)| {
                    let dst = target;
                    // SAFETY: columns `first..first + width` of the `rows x out` output, disjoint
                    // between the two tasks; `x` is `rows x inner`, `transposed` `inner x out`.
                    unsafe {
                        gemm::gemm(
                            rows,
                            width,
                            inner,
                            dst.0.add(first),
                            1,
                            out.cast_signed(),
                            false,
                            x.as_ptr(),
                            1,
                            inner.cast_signed(),
                            transposed.as_ptr().add(first),
                            1,
                            out.cast_signed(),
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
                gemm_best = gemm_best.min(start.elapsed().as_secs_f64());
            }
            let flop = 2.0 * (rows * out * inner) as f64;
            println!(
                "[{rows}, {inner}] x [{inner}, {out}]: {:.2} ms, {:.0} GFLOP/s (gemm: {:.2} ms, {:.0} GFLOP/s)",
                best * 1e3,
                flop / best / 1e9,
                gemm_best * 1e3,
                flop / gemm_best / 1e9
            );
        }
        Ok(())
    }
}
