//! CPU kernels for the engine's hot paths, where candle's general ops leave time on the
//! table (BENCHMARKS.md, "Inference engine (CPU)"):
//!
//! - [`PackedMatrix`] (in `packed`): dense weights packed at load and their products
//!   `x @ W^T` for one row or many, with an AVX-512 kernel;
//! - [`swiglu`]: `silu(gate) * up` from the side-by-side gate/up product in one pass;
//! - [`causal_attention`]: every head's attention over the keys each position may see,
//!   never computing the masked half, written straight into the output projection's input;
//! - [`decode_attention`]: a decode step's attention, one task per sequence against its
//!   own cache.
//!
//! The exponentials use a polynomial (Cephes' `expf`, within 2 ulp of the exact value)
//! written so that the compiler vectorises it; on x86-64 with AVX2 the loops are compiled
//! for AVX2 and chosen at run time.
//!
//! This module may use `unsafe` (the workspace denies it elsewhere, except [`crate::gpu`]):
//! the packed products' tiles write through raw pointers (several tasks into one
//! output), and functions compiled for AVX2 or AVX-512 may only be called once the CPU is
//! known to have it. Each block says why it holds.
#![allow(unsafe_code)]
// The loops' bodies are `#[inline(always)]` so that they are compiled inside the AVX2
// wrappers (`*_avx2`), which is what vectorises them for AVX2.
#![allow(clippy::inline_always)]

use candle_core::{Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

mod packed;
pub(crate) use packed::PackedMatrix;

/// The contiguous f32 data of a CPU tensor, handed to `with`.
fn with_f32<R>(tensor: &Tensor, with: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    with(f32_data(&storage, layout)?)
}

/// The contiguous f32 data behind a tensor's storage and layout.
fn f32_data<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(EngineError::BadRequest("a CPU kernel was given a tensor on another device".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(EngineError::BadRequest("a CPU kernel was given a non-contiguous tensor".into()));
    };
    Ok(&data[start..end])
}

/// A pointer to an output that several tasks share, each writing only its own part.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: the tasks holding it write disjoint parts of one live buffer (see
// `causal_attention` and `PackedMatrix::product`), and the buffer outlives them (rayon
// joins them before it is read).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// A dense `[out, in]` f32 CPU tensor packed for [`packed_product`].
pub(crate) fn pack(weight: &Tensor) -> Result<PackedMatrix> {
    let (out, inner) = weight.dims2()?;
    let weight = weight.contiguous()?;
    with_f32(&weight, |values| PackedMatrix::new(values, out, inner))
}

/// `x @ W^T` for `x` `[rows, in]` (f32, on the CPU): `[rows, out]`.
pub(crate) fn packed_product(x: &Tensor, matrix: &PackedMatrix) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let out = with_f32(x, |x| matrix.product(x, rows))?;
    Ok(Tensor::from_vec(out, (rows, matrix.columns()), &Device::Cpu)?)
}

/// `silu(gate) * up` for a `[rows, 2 * width]` tensor holding gate then up side by side;
/// returns `[rows, width]`.
pub(crate) fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let (rows, double) = gate_up.dims2()?;
    let width = double / 2;
    let mut out = vec![0.0f32; rows * width];
    with_f32(gate_up, |input| {
        out.par_chunks_mut(width.max(1)).zip(input.par_chunks(double.max(1))).for_each(|(out, row)| {
            let (gate, up) = row.split_at(width);
            if avx2() {
                swiglu_row_avx2(out, gate, up);
            } else {
                swiglu_row(out, gate, up);
            }
        });
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, (rows, width), &Device::Cpu)?)
}

/// Query rows per task of [`causal_attention`]: a block's keys end where its last row's
/// do, so smaller blocks skip more of the masked half, larger ones pack less often.
const ATTENTION_BLOCK: usize = 64;

/// Causal attention of `count` new positions after `start` cached ones, every head:
/// `q` is `[heads, count, head_dim]` (rotated, not scaled), `keys` and `values` are a
/// layer's caches `[kv_heads, capacity, head_dim]` with positions `0..start + count`
/// filled; heads share kv heads in groups of `heads / kv_heads`. Returns
/// `[count, heads * head_dim]`, the heads side by side, ready for the output projection.
///
/// Each kv head's keys and values are packed once (as [`PackedMatrix`]es), then each task
/// is one head and a block of query rows: its scores against the keys up to its last row
/// only (the masked half of the square is never computed), a softmax over the keys each
/// row may see, and the product with the values written straight into the head's columns
/// of the output.
pub(crate) fn causal_attention(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize, scale: f32) -> Result<Tensor> {
    let (heads, count, head_dim) = q.dims3()?;
    let (kv_heads, capacity, kv_dim) = keys.dims3()?;
    if values.dims3()? != (kv_heads, capacity, kv_dim)
        || kv_dim != head_dim
        || kv_heads == 0
        || heads % kv_heads != 0
        || start + count > capacity
    {
        return Err(EngineError::BadRequest(format!(
            "attention of {:?} queries after {start} positions against caches of {:?} and {:?}",
            q.dims(),
            keys.dims(),
            values.dims()
        )));
    }
    let group = heads / kv_heads;
    let width = heads * head_dim;
    let (blocks, total) = (count.div_ceil(ATTENTION_BLOCK), start + count);
    // Each kv head's keys and values packed once for all the blocks of its heads.
    let packed = with_f32(keys, |keys| {
        with_f32(values, |values| {
            (0..kv_heads)
                .into_par_iter()
                .map(|kv_head| {
                    let cache = kv_head * capacity * head_dim;
                    let (keys, values) = (&keys[cache..][..total * head_dim], &values[cache..][..total * head_dim]);
                    Ok((
                        PackedMatrix::new(keys, total, head_dim)?,
                        PackedMatrix::from_transposed(values, total, head_dim)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()
        })
    })?;
    // Not zeroed: every task writes its rows of its head's columns.
    let mut out = Vec::<f32>::with_capacity(count * width);
    let target = Output(out.as_mut_ptr());
    with_f32(q, |q| {
        (0..heads * blocks).into_par_iter().try_for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
            let (head, block) = (task / blocks, task % blocks);
            let first = block * ATTENTION_BLOCK;
            let rows = ATTENTION_BLOCK.min(count - first);
            // Keys seen by the block's last row, so by every row of it.
            let seen = start + first + rows;
            let (keys, values) = &packed[head / group];
            let query = &q[(head * count + first) * head_dim..][..rows * head_dim];
            scores.clear();
            scores.resize(rows * seen, 0.0);
            // SAFETY: `scores` holds `rows x seen`, this task's own.
            unsafe { keys.product_here(query, rows, head_dim, seen, (scores.as_mut_ptr(), seen))? };
            for (row, scores) in scores.chunks_exact_mut(seen).enumerate() {
                let (visible, hidden) = scores.split_at_mut(start + first + row + 1);
                for score in visible.iter_mut() {
                    *score *= scale;
                }
                softmax(visible);
                hidden.fill(0.0);
            }
            let dst = target;
            // SAFETY: the destination is rows `first..first + rows` and columns
            // `head * head_dim..(head + 1) * head_dim` of the `count x width` row-major
            // `out`, which lives until `into_par_iter` has joined its tasks; no two tasks
            // share a (head, block), so none write the same element.
            unsafe {
                values.product_here(scores, rows, seen, head_dim, (dst.0.add(first * width + head * head_dim), width))
            }
        })
    })?;
    // SAFETY: the tasks cover every (head, block of rows) pair, and each wrote its rows'
    // `head_dim` columns of its head: all `count * width` elements are initialised.
    unsafe { out.set_len(count * width) };
    Ok(Tensor::from_vec(out, (count, width), &Device::Cpu)?)
}

/// One decode step's attention for several sequences: `q` is `[batch, heads, head_dim]`
/// (rotated and scaled), `caches[i]` sequence `i`'s keys and values
/// `[kv_heads, capacity, head_dim]` with its first `lengths[i]` positions filled (the new
/// one included). Returns `[batch, heads * head_dim]`.
///
/// One task per sequence, in parallel: for each head, the scores against its keys (dot
/// products), their softmax and the weighted sum of the values, with none of the dozen
/// small tensor ops per sequence and layer that candle's ops take.
pub(crate) fn decode_attention(q: &Tensor, caches: &[(&Tensor, &Tensor)], lengths: &[usize]) -> Result<Tensor> {
    let (batch, heads, head_dim) = q.dims3()?;
    if caches.len() != batch || lengths.len() != batch {
        return Err(EngineError::BadRequest("a decode step needs one cache and length per sequence".into()));
    }
    let guards = caches
        .iter()
        .map(|(keys, values)| Ok((keys.dims3()?, keys.storage_and_layout(), values.storage_and_layout())))
        .collect::<Result<Vec<_>>>()?;
    let mut sequences = Vec::with_capacity(batch);
    for ((dims, (keys, key_layout), (values, value_layout)), &length) in guards.iter().zip(lengths) {
        let &(kv_heads, capacity, kv_dim) = dims;
        let (keys, values) = (f32_data(keys, key_layout)?, f32_data(values, value_layout)?);
        if kv_dim != head_dim
            || kv_heads == 0
            || heads % kv_heads != 0
            || length == 0
            || length > capacity
            || keys.len() != kv_heads * capacity * head_dim
            || values.len() != keys.len()
        {
            return Err(EngineError::BadRequest(format!(
                "decode attention of {heads} heads of {head_dim} against a cache of {dims:?} with {length} positions"
            )));
        }
        sequences.push((keys, values, kv_heads, capacity, length));
    }
    let width = heads * head_dim;
    let mut out = vec![0.0f32; batch * width];
    with_f32(q, |q| {
        out.par_chunks_mut(width.max(1)).zip(q.par_chunks(width.max(1))).zip(&sequences).for_each(
            |((out, q), &(keys, values, kv_heads, capacity, length))| {
                let mut scores = vec![0.0f32; length];
                for head in 0..heads {
                    let cache = (head / (heads / kv_heads)) * capacity * head_dim;
                    let head_keys = &keys[cache..][..length * head_dim];
                    let head_values = &values[cache..][..length * head_dim];
                    let query = &q[head * head_dim..][..head_dim];
                    let out = &mut out[head * head_dim..][..head_dim];
                    if avx2() {
                        attend_avx2(out, query, head_keys, head_values, &mut scores);
                    } else {
                        attend(out, query, head_keys, head_values, &mut scores);
                    }
                }
            },
        );
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, (batch, width), &Device::Cpu)?)
}

/// One query against `keys` and `values` (`scores.len()` rows of `query.len()` each):
/// `out = softmax(keys . query) . values`.
#[inline(always)]
fn attend(out: &mut [f32], query: &[f32], keys: &[f32], values: &[f32], scores: &mut [f32]) {
    let dim = query.len();
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(dim)) {
        *score = dot(key, query);
    }
    softmax_portable(scores);
    out.fill(0.0);
    for (&weight, value) in scores.iter().zip(values.chunks_exact(dim)) {
        for (out, &v) in out.iter_mut().zip(value) {
            *out += weight * v;
        }
    }
}

/// `a . b`, summed in sixteen lanes so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0.0f32; 16];
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`attend`] compiled for AVX2 (the caller has checked the CPU).
fn attend_avx2(out: &mut [f32], query: &[f32], keys: &[f32], values: &[f32], scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run(out: &mut [f32], query: &[f32], keys: &[f32], values: &[f32], scores: &mut [f32]) {
            attend(out, query, keys, values, scores);
        }
        // SAFETY: only called once `avx2()` has found AVX2 and FMA on this CPU.
        unsafe { run(out, query, keys, values, scores) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    attend(out, query, keys, values, scores);
}

/// Softmax of `values` in place.
fn softmax(values: &mut [f32]) {
    if avx2() {
        softmax_avx2(values);
    } else {
        softmax_portable(values);
    }
}

/// Whether the CPU has AVX2 and FMA (the `_avx2` functions need both).
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[inline(always)]
fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((out, &gate), &up) in out.iter_mut().zip(gate).zip(up) {
        *out = gate / (1.0 + exp(-gate)) * up;
    }
}

#[inline(always)]
fn softmax_portable(values: &mut [f32]) {
    let max = lanes(values, f32::NEG_INFINITY, f32::max);
    for value in values.iter_mut() {
        *value = exp(*value - max);
    }
    let scale = 1.0 / lanes(values, 0.0, |sum, value| sum + value);
    for value in values.iter_mut() {
        *value *= scale;
    }
}

/// Folds `values` with `fold` in sixteen independent lanes (so the loop vectorises, which
/// a single accumulator's strict order forbids), then folds the lanes.
#[inline(always)]
fn lanes(values: &[f32], initial: f32, fold: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut lanes = [initial; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = fold(*lane, value);
        }
    }
    lanes.into_iter().chain(rest.iter().copied()).fold(initial, fold)
}

/// [`swiglu_row`] compiled for AVX2 (the caller has checked the CPU).
fn swiglu_row_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn row(out: &mut [f32], gate: &[f32], up: &[f32]) {
            swiglu_row(out, gate, up);
        }
        // SAFETY: only called once `avx2()` has found AVX2 and FMA on this CPU.
        unsafe { row(out, gate, up) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    swiglu_row(out, gate, up);
}

/// [`softmax_portable`] compiled for AVX2 (the caller has checked the CPU).
fn softmax_avx2(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run(values: &mut [f32]) {
            softmax_portable(values);
        }
        // SAFETY: only called once `avx2()` has found AVX2 and FMA on this CPU.
        unsafe { run(values) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    softmax_portable(values);
}

/// `e^x` by Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial
/// for `e^r`, and `2^n` built in the exponent bits. Within 2 ulp for results in the normal
/// range; 0 below it, and `e^88.7` (about `3.3e38`) stands for anything above, so
/// `silu` of large inputs stays finite. Branch-free, so loops of it vectorise.
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::unreadable_literal
)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.336_55;
    let x = x.clamp(-87.336_55, 88.722_83);
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e_r = p.mul_add(r * r, r) + 1.0;
    // n is in [-126, 128]; 2^n through the exponent field, in two factors so that n = 128
    // (x near 88.7) does not overflow the field.
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half = exponent >> 1;
    let first = f32::from_bits(((half + 127) << 23) as u32);
    let second = f32::from_bits(((exponent - half + 127) << 23) as u32);
    if below { 0.0 } else { e_r * first * second }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (ours, exact) = (exp(x), x.exp());
            worst = worst.max(ours.to_bits().abs_diff(exact.to_bits()));
            x += 0.001_3;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert!(exp(-100.0) == 0.0 && exp(f32::NEG_INFINITY) == 0.0);
        assert!(exp(100.0).is_finite() && exp(100.0) > 3e38);
        assert!((exp(0.0) - 1.0).abs() < f32::EPSILON);
    }

    #[test]
    fn kernels_match_candle_ops() -> anyhow::Result<()> {
        let device = Device::Cpu;
        let gate_up = (Tensor::randn(0f32, 4.0, (9, 2 * 70), &device)? - 1.0)?;
        let expected = (candle_nn::ops::silu(&gate_up.narrow(1, 0, 70)?)? * gate_up.narrow(1, 70, 70)?)?;
        let difference = (swiglu(&gate_up)? - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-5, "swiglu differs by {difference}");

        // Six heads on two kv heads, 70 new positions after 9 cached ones (two blocks),
        // caches with room to spare; then a single position.
        for (start, count) in [(9, 70), (0, 70), (78, 1)] {
            let (heads, kv_heads, head_dim, capacity) = (6, 2, 8, 96);
            let q = Tensor::randn(0f32, 1.0, (heads, count, head_dim), &device)?;
            let keys = Tensor::randn(0f32, 1.0, (kv_heads, capacity, head_dim), &device)?;
            let values = Tensor::randn(0f32, 1.0, (kv_heads, capacity, head_dim), &device)?;
            let ours = causal_attention(&q, &keys, &values, start, 0.3)?;
            let total = start + count;
            let mask: Vec<f32> = (0..count)
                .flat_map(|row| {
                    (0..total).map(move |column| if column <= start + row { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (count, total), &device)?;
            let group = heads / kv_heads;
            let q = (q.reshape((kv_heads, group * count, head_dim))? * 0.3)?;
            let scores = q.matmul(&keys.narrow(1, 0, total)?.t()?)?.reshape((kv_heads, group, count, total))?;
            let probabilities = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let expected = probabilities
                .reshape((kv_heads, group * count, total))?
                .matmul(&values.narrow(1, 0, total)?.contiguous()?)?
                .reshape((heads, count, head_dim))?
                .transpose(0, 1)?
                .reshape((count, heads * head_dim))?;
            let difference = (ours - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(difference < 1e-5, "attention after {start} differs by {difference}");
        }
        let q = Tensor::zeros((2, 4, 8), candle_core::DType::F32, &device)?;
        let cache = Tensor::zeros((2, 8, 8), candle_core::DType::F32, &device)?;
        assert!(causal_attention(&q, &cache, &cache, 5, 1.0).is_err(), "past the cache's capacity");

        // A decode step of three sequences of different lengths, six heads on two kv heads.
        let (heads, kv_heads, head_dim, capacity) = (6, 2, 40, 64);
        let lengths = [1, 17, 64];
        let q = Tensor::randn(0f32, 1.0, (3, heads, head_dim), &device)?;
        let caches = lengths
            .iter()
            .map(|_| {
                Ok((
                    Tensor::randn(0f32, 1.0, (kv_heads, capacity, head_dim), &device)?,
                    Tensor::randn(0f32, 1.0, (kv_heads, capacity, head_dim), &device)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let refs: Vec<(&Tensor, &Tensor)> = caches.iter().map(|(k, v)| (k, v)).collect();
        let ours = decode_attention(&q, &refs, &lengths)?;
        for (sequence, ((keys, values), &length)) in caches.iter().zip(&lengths).enumerate() {
            let query = q.get(sequence)?.reshape((kv_heads, heads / kv_heads, head_dim))?;
            let keys = keys.narrow(1, 0, length)?;
            let probabilities = candle_nn::ops::softmax_last_dim(&query.matmul(&keys.t()?)?)?;
            let expected = probabilities.matmul(&values.narrow(1, 0, length)?.contiguous()?)?.flatten_all()?;
            let difference = (ours.get(sequence)? - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(difference < 1e-5, "sequence {sequence} of length {length} differs by {difference}");
        }
        assert!(decode_attention(&q, &refs, &[1, 17, 65]).is_err(), "past the cache's capacity");
        assert!(decode_attention(&q, &refs[..2], &lengths[..2]).is_err(), "a cache per sequence");
        Ok(())
    }
}
