use std::time::Instant;
use candle_core::{quantized::{QMatMul, ggml_file::qtensor_from_ggml, GgmlDType}, Device, Module, Tensor, D};
use gemma_proto::Architecture;
use gemma_worker::weights::{GgufFile, Slice};

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let f = GgufFile::open(path.as_ref(), Architecture::Gemma3)?;
    let dev = Device::Cpu;
    for (name, shape) in [("model.embed_tokens.weight", [262144usize, 640usize]), ("model.layers.0.mlp.gate_proj.weight", [2048, 640])] {
        let q = f.load_quantized(name, &shape, &Slice::Whole, &dev)?.unwrap();
        let data = q.data()?.to_vec();
        let (n, k) = (shape[0], shape[1]);
        let kp = k.div_ceil(256) * 256;
        let rb = k / 32 * 34; let rbp = kp / 32 * 34;
        let mut buf = vec![0u8; n * rbp];
        for r in 0..n { buf[r*rbp..r*rbp+rb].copy_from_slice(&data[r*rb..(r+1)*rb]); }
        let qp = qtensor_from_ggml(GgmlDType::Q8_0, &buf, vec![n, kp], &dev)?;
        let mm = QMatMul::from_qtensor(q)?;
        let mmp = QMatMul::from_qtensor(qp)?;
        for m in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xp = x.pad_with_zeros(D::Minus1, 0, kp - k)?;
            let a = mm.forward(&x)?; let b = mmp.forward(&xp)?;
            let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let n_it = if m == 1 { 50 } else { 3 };
            let t = Instant::now();
            for _ in 0..n_it { let xp = x.pad_with_zeros(D::Minus1, 0, kp - k)?; mmp.forward(&xp)?; }
            let el = t.elapsed().as_secs_f64() / n_it as f64;
            println!("{name} padded m={m}: {:.3} ms  {:.1} GFLOP/s  maxdiff vs unpadded {diff}", el * 1e3, 2.0 * (m * n * k) as f64 / el / 1e9);
        }
    }
    Ok(())
}
