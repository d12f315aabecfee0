//! Attention of single-token queries (decode) straight from the paged KV cache, f32 on the CPU.
//!
//! The general path gathers a sequence's keys and values out of the cache, transposes them and
//! hands them to gemm, which packs them again: three copies of the whole context per layer and
//! token, which made decode after an 8k-token prompt 3x slower than after a short one. Here each
//! key and value row is read once, in place: scores, then a softmax and the weighted sum of
//! values, over chunks of the context in parallel, merged with their maxima (online softmax).

use candle_core::{Result, Tensor};

use super::activation::exp_non_positive;

/// Context positions per task.
const CHUNK: usize = 256;

/// The heads of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// One query token: its query rows `q` ([q_heads * head_dim]) and the cache slots of the keys
/// it sees (its own included).
pub struct Query<'a> {
    pub q: &'a [f32],
    pub slots: &'a [u32],
}

/// What one chunk of one query's context contributes, per query head: the largest score, the
/// sum of exp(score - largest), and the values weighted by those.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// Every query's attention output, [queries, q_heads * head_dim] row-major. `k` and `v`: the
/// layer's cache, [slots, kv_heads, head_dim] row-major.
pub fn attend(heads: Heads, queries: &[Query], k: &[f32], v: &[f32]) -> Result<Tensor> {
    let width = heads.q_heads * heads.head_dim;
    // (query, first position) of every task.
    let tasks: Vec<(usize, usize)> = queries
        .iter()
        .enumerate()
        .flat_map(|(i, q)| (0..q.slots.len()).step_by(CHUNK).map(move |p| (i, p)))
        .collect();
    let mut partials: Vec<Option<Partial>> = (0..tasks.len()).map(|_| None).collect();
    let partials_addr = partials.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        for t in range {
            let (i, first) = tasks[t];
            let query = &queries[i];
            let slots = &query.slots[first..(first + CHUNK).min(query.slots.len())];
            let partial = chunk(heads, query.q, slots, k, v);
            // SAFETY: task t writes only partials[t]; `partials` outlives the pool's call.
            unsafe { *(partials_addr as *mut Option<Partial>).add(t) = Some(partial) };
        }
    });
    let partials = partials
        .into_iter()
        .collect::<Option<Vec<Partial>>>()
        .ok_or_else(|| candle_core::Error::Msg("a chunk of attention was not run".into()))?;
    let mut out = vec![0f32; queries.len() * width];
    let mut next = 0;
    for (query, out) in queries.iter().zip(out.chunks_exact_mut(width)) {
        let chunks = query.slots.len().div_ceil(CHUNK);
        if chunks == 0 {
            candle_core::bail!("a decoding query sees no key");
        }
        merge(heads, &partials[next..next + chunks], out);
        next += chunks;
    }
    Tensor::from_vec(out, (queries.len(), width), &candle_core::Device::Cpu)
}

/// One query's chunks merged: each rescaled from its own maximum to the largest, then the
/// weighted values divided by the total weight.
fn merge(heads: Heads, parts: &[Partial], out: &mut [f32]) {
    let hd = heads.head_dim;
    for (h, out) in out.chunks_exact_mut(hd).enumerate() {
        let max = parts
            .iter()
            .map(|p| p.max[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for p in parts {
            let w = exp_non_positive(p.max[h] - max);
            total += p.sum[h] * w;
            for (o, &a) in out.iter_mut().zip(&p.acc[h * hd..(h + 1) * hd]) {
                *o += a * w;
            }
        }
        for o in out.iter_mut() {
            *o /= total;
        }
    }
}

/// a . b in 16 independent lanes (a plain iterator sum keeps f32 addition's order, one lane,
/// and does not vectorize).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// One chunk of one query's context.
fn chunk(heads: Heads, q: &[f32], slots: &[u32], k: &[f32], v: &[f32]) -> Partial {
    let (hd, hkv) = (heads.head_dim, heads.kv_heads);
    let group = heads.q_heads / hkv;
    let n = slots.len();
    let mut scores = vec![0f32; heads.q_heads * n];
    for (j, &slot) in slots.iter().enumerate() {
        for kh in 0..hkv {
            let row = &k[(slot as usize * hkv + kh) * hd..][..hd];
            for g in 0..group {
                let h = kh * group + g;
                let qh = &q[h * hd..(h + 1) * hd];
                let s = dot(qh, row) * heads.scale;
                scores[h * n + j] = match heads.softcap {
                    Some(cap) => (s / cap).tanh() * cap,
                    None => s,
                };
            }
        }
    }
    let mut max = vec![f32::NEG_INFINITY; heads.q_heads];
    let mut sum = vec![0f32; heads.q_heads];
    for h in 0..heads.q_heads {
        let row = &mut scores[h * n..(h + 1) * n];
        max[h] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in row.iter_mut() {
            *s = exp_non_positive(*s - max[h]);
        }
        sum[h] = row.iter().sum();
    }
    let mut acc = vec![0f32; heads.q_heads * hd];
    for (j, &slot) in slots.iter().enumerate() {
        for kh in 0..hkv {
            let row = &v[(slot as usize * hkv + kh) * hd..][..hd];
            for g in 0..group {
                let h = kh * group + g;
                let p = scores[h * n + j];
                for (a, &x) in acc[h * hd..(h + 1) * hd].iter_mut().zip(row) {
                    *a += p * x;
                }
            }
        }
    }
    Partial { max, sum, acc }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_proto::SplitMix64;

    /// softmax(q k^T * scale) v per query head, in f64, over the given slots.
    fn naive(heads: Heads, q: &[f32], slots: &[u32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let (hd, hkv) = (heads.head_dim, heads.kv_heads);
        let group = heads.q_heads / hkv;
        let mut out = vec![0f64; heads.q_heads * hd];
        for h in 0..heads.q_heads {
            let kh = h / group;
            let scores: Vec<f64> = slots
                .iter()
                .map(|&s| {
                    let row = &k[(s as usize * hkv + kh) * hd..][..hd];
                    let dot: f64 = (0..hd).map(|d| q[h * hd + d] as f64 * row[d] as f64).sum();
                    let s = dot * heads.scale as f64;
                    heads
                        .softcap
                        .map_or(s, |c| (s / c as f64).tanh() * c as f64)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (w, &s) in weights.iter().zip(slots) {
                let row = &v[(s as usize * hkv + kh) * hd..][..hd];
                for d in 0..hd {
                    out[h * hd + d] += w / total * row[d] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn in_place_attention_equals_the_softmax_definition() -> Result<()> {
        let mut rng = SplitMix64::new(5);
        let heads = Heads {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
            softcap: Some(50.0),
        };
        let slots_total = 1200;
        let cache = |rng: &mut SplitMix64| -> Vec<f32> {
            (0..slots_total * heads.kv_heads * heads.head_dim)
                .map(|_| rng.symmetric() * 3.0)
                .collect()
        };
        let (k, v) = (cache(&mut rng), cache(&mut rng));
        // A short context, one of exactly a chunk, and one of several chunks, out of order.
        let lens = [5usize, CHUNK, 3 * CHUNK + 17];
        let slot_lists: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| (0..n).map(|j| ((j * 7 + 3) % slots_total) as u32).collect())
            .collect();
        let qs: Vec<Vec<f32>> = lens
            .iter()
            .map(|_| {
                (0..heads.q_heads * heads.head_dim)
                    .map(|_| rng.symmetric())
                    .collect()
            })
            .collect();
        let queries: Vec<Query> = qs
            .iter()
            .zip(&slot_lists)
            .map(|(q, s)| Query { q, slots: s })
            .collect();
        let got = attend(heads, &queries, &k, &v)?.to_vec2::<f32>()?;
        for ((row, q), slots) in got.iter().zip(&qs).zip(&slot_lists) {
            let want = naive(heads, q, slots, &k, &v);
            for (a, b) in row.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
