//! A plain, unsharded Gemma 1/2/3 written straight from HF transformers' modeling code, in f32
//! loops over `Vec<f32>`: no candle, no paged cache, no batching, no tensor parallelism. It
//! shares no code with the worker, which makes it a reference the worker's sharded, batched,
//! paged model can be held to (and it is itself held to candle-transformers' Gemma 1).

use std::collections::HashMap;

use gemma_proto::{LayerKind, ModelConfig};

/// The model: its config and every tensor by HF name, row-major f32.
pub struct NaiveGemma {
    cfg: ModelConfig,
    w: HashMap<String, Vec<f32>>,
}

/// One sequence being run: its K/V per layer and position.
pub struct Session<'a> {
    model: &'a NaiveGemma,
    /// [layer][position] -> kv_heads * head_dim.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    /// The last token's final hidden state.
    last: Vec<f32>,
}

/// What the worker's parity tests compare against.
pub struct Greedy {
    pub prefill_logits: Vec<f32>,
    pub tokens: Vec<u32>,
    /// The smallest gap between the two best logits along the way.
    pub min_margin: f32,
}

impl NaiveGemma {
    /// `tensors`: (HF name, shape, values) with HF semantics (norm weights are w, not 1 + w).
    pub fn new(cfg: ModelConfig, tensors: crate::NamedTensors) -> Self {
        let w = tensors.into_iter().map(|(n, _, v)| (n, v)).collect();
        Self { cfg, w }
    }

    pub fn session(&self) -> Session<'_> {
        let layers = self.cfg.num_hidden_layers;
        Session {
            model: self,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            last: Vec::new(),
        }
    }

    /// Prefill `prompt`, then `new_tokens` greedy steps.
    pub fn greedy(&self, prompt: &[u32], new_tokens: usize) -> Greedy {
        let mut s = self.session();
        for &t in prompt {
            s.feed(t);
        }
        let mut logits = s.logits();
        let prefill_logits = logits.clone();
        let mut tokens = Vec::with_capacity(new_tokens);
        let mut min_margin = f32::INFINITY;
        for _ in 0..new_tokens {
            let (best, margin) = top1(&logits);
            min_margin = min_margin.min(margin);
            tokens.push(best);
            s.feed(best);
            logits = s.logits();
        }
        Greedy {
            prefill_logits,
            tokens,
            min_margin,
        }
    }

    fn get(&self, name: &str) -> &[f32] {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("reference model has no tensor {name}"))
    }
}

impl Session<'_> {
    /// Runs one token through every layer at the next position.
    pub fn feed(&mut self, token: u32) {
        let m = self.model;
        let cfg = &m.cfg;
        let h = cfg.hidden_size;
        let pos = self.keys[0].len();
        let emb = m.get("model.embed_tokens.weight");
        let t = token as usize;
        // HF: the normalizer sqrt(hidden) is rounded to the compute dtype (f32) first.
        let normalizer = (h as f32).sqrt();
        let mut x: Vec<f32> = emb[t * h..(t + 1) * h]
            .iter()
            .map(|v| v * normalizer)
            .collect();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let n = rms_norm(&x, m.get(&format!("{p}.input_layernorm.weight")), cfg);
            let mut a = self.attention(l, pos, &n);
            let sandwich = cfg.architecture.has_sandwich_norms();
            if sandwich {
                a = rms_norm(
                    &a,
                    m.get(&format!("{p}.post_attention_layernorm.weight")),
                    cfg,
                );
            }
            add(&mut x, &a);
            let pre = if sandwich {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            let n = rms_norm(&x, m.get(&format!("{p}.{pre}.weight")), cfg);
            let mut f = self.mlp(l, &n);
            if sandwich {
                f = rms_norm(
                    &f,
                    m.get(&format!("{p}.post_feedforward_layernorm.weight")),
                    cfg,
                );
            }
            add(&mut x, &f);
        }
        self.last = x;
    }

    /// Logits after the last token fed.
    pub fn logits(&self) -> Vec<f32> {
        let m = self.model;
        let cfg = &m.cfg;
        let x = rms_norm(&self.last, m.get("model.norm.weight"), cfg);
        let mut logits = matvec(m.get("model.embed_tokens.weight"), &x, cfg.vocab_size);
        if let Some(cap) = cfg.final_logit_softcapping {
            let cap = cap as f32;
            logits.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        logits
    }

    fn attention(&mut self, l: usize, pos: usize, x: &[f32]) -> Vec<f32> {
        let m = self.model;
        let cfg = &m.cfg;
        let (hq, hkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let p = format!("model.layers.{l}.self_attn");
        let mut q = matvec(m.get(&format!("{p}.q_proj.weight")), x, hq * hd);
        let mut k = matvec(m.get(&format!("{p}.k_proj.weight")), x, hkv * hd);
        let v = matvec(m.get(&format!("{p}.v_proj.weight")), x, hkv * hd);
        if cfg.architecture.has_qk_norm() {
            let (qn, kn) = (
                m.get(&format!("{p}.q_norm.weight")),
                m.get(&format!("{p}.k_norm.weight")),
            );
            q.chunks_mut(hd)
                .for_each(|h| h.copy_from_slice(&rms_norm(h, qn, cfg)));
            k.chunks_mut(hd)
                .for_each(|h| h.copy_from_slice(&rms_norm(h, kn, cfg)));
        }
        let kind = cfg.layer_kinds[l];
        let (theta, scaling) = match kind {
            LayerKind::Sliding => (cfg.rope_local_theta, 1.0),
            LayerKind::Full => (cfg.rope_theta, cfg.rope_scaling_factor),
        };
        q.chunks_mut(hd)
            .for_each(|h| rotate(h, pos, theta, scaling));
        k.chunks_mut(hd)
            .for_each(|h| rotate(h, pos, theta, scaling));
        self.keys[l].push(k);
        self.values[l].push(v);
        let first = match (kind, cfg.sliding_window) {
            // HF: a sliding layer's query sees keys fewer than `window` positions behind it.
            (LayerKind::Sliding, Some(w)) => (pos + 1).saturating_sub(w),
            _ => 0,
        };
        let scale = (1.0 / cfg.query_pre_attn_scalar.sqrt()) as f32;
        let group = hq / hkv;
        let mut out = vec![0f32; hq * hd];
        for head in 0..hq {
            let kvh = head / group;
            let qh = &q[head * hd..(head + 1) * hd];
            let scores: Vec<f32> = (first..=pos)
                .map(|j| {
                    let kj = &self.keys[l][j][kvh * hd..(kvh + 1) * hd];
                    let s = dot(qh, kj) * scale;
                    match cfg.attn_logit_softcapping {
                        Some(cap) => (s / cap as f32).tanh() * cap as f32,
                        None => s,
                    }
                })
                .collect();
            let probs = softmax(&scores);
            let o = &mut out[head * hd..(head + 1) * hd];
            for (j, pr) in (first..=pos).zip(&probs) {
                let vj = &self.values[l][j][kvh * hd..(kvh + 1) * hd];
                o.iter_mut().zip(vj).for_each(|(o, v)| *o += pr * v);
            }
        }
        matvec(m.get(&format!("{p}.o_proj.weight")), &out, cfg.hidden_size)
    }

    fn mlp(&self, l: usize, x: &[f32]) -> Vec<f32> {
        let m = self.model;
        let cfg = &m.cfg;
        let p = format!("model.layers.{l}.mlp");
        let i = cfg.intermediate_size;
        let gate = matvec(m.get(&format!("{p}.gate_proj.weight")), x, i);
        let up = matvec(m.get(&format!("{p}.up_proj.weight")), x, i);
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| gelu_tanh(*g) * u)
            .collect();
        matvec(
            m.get(&format!("{p}.down_proj.weight")),
            &act,
            cfg.hidden_size,
        )
    }
}

/// HF's Gemma RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), in f32.
fn rms_norm(x: &[f32], w: &[f32], cfg: &ModelConfig) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (mean + cfg.rms_norm_eps as f32).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * (1.0 + w)).collect()
}

/// Rotate-half RoPE at `pos`: pairs (i, i + d/2) turn by pos * inv_freq[i].
fn rotate(x: &mut [f32], pos: usize, theta: f64, scaling: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let inv = (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32 / scaling as f32;
        let angle = pos as f32 * inv;
        let (sin, cos) = angle.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// w [rows, x.len()] @ x.
fn matvec(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let cols = x.len();
    assert_eq!(
        w.len(),
        rows * cols,
        "weight of {} values is not {rows}x{cols}",
        w.len()
    );
    w.chunks_exact(cols).map(|row| dot(row, x)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// The best token and its lead over the second best.
fn top1(logits: &[f32]) -> (u32, f32) {
    let (mut best, mut a, mut b) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > a {
            b = a;
            a = v;
            best = i;
        } else if v > b {
            b = v;
        }
    }
    (best as u32, a - b)
}
