use std::time::Instant;
use candle_core::{quantized::QMatMul, Device, Module, Tensor, DType};
use gemma_proto::Architecture;
use gemma_worker::weights::{GgufFile, Slice};

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let f = GgufFile::open(path.as_ref(), Architecture::Gemma3)?;
    let dev = Device::Cpu;
    for (name, shape) in [("model.embed_tokens.weight", [262144usize, 640usize]), ("model.layers.0.mlp.gate_proj.weight", [2048, 640]), ("model.layers.0.mlp.down_proj.weight", [640, 2048]), ("model.layers.1.mlp.down_proj.weight", [640, 2048]), ("model.layers.0.self_attn.o_proj.weight", [640, 1024])] {
        let q = f.load_quantized(name, &shape, &Slice::Whole, &dev)?.unwrap();
        let dt = q.dtype();
        let mm = QMatMul::from_qtensor(q)?;
        for m in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, shape[1]), &dev)?;
            mm.forward(&x)?;
            let n = if m == 1 { 50 } else { 3 };
            let t = Instant::now();
            for _ in 0..n { mm.forward(&x)?; }
            let el = t.elapsed().as_secs_f64() / n as f64;
            println!("{name} {dt:?} m={m}: {:.3} ms  {:.1} GFLOP/s", el * 1e3, 2.0 * (m * shape[0] * shape[1]) as f64 / el / 1e9);
        }
        let w = f.load(name, &shape, Slice::Whole, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (512, shape[1]), &dev)?;
        let t = Instant::now();
        let wd = f.load(name, &shape, Slice::Whole, DType::F32, &dev)?;
        let deq = t.elapsed().as_secs_f64();
        x.matmul(&w.t()?)?;
        let t = Instant::now();
        for _ in 0..3 { x.matmul(&wd.t()?)?; }
        let el = t.elapsed().as_secs_f64() / 3.0;
        println!("   f32 gemm m=512: {:.3} ms {:.1} GFLOP/s ; dequant {:.3} ms", el*1e3, 2.0 * (512 * shape[0] * shape[1]) as f64 / el / 1e9, deq*1e3);
    }
    Ok(())
}
