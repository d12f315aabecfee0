//! The header of a GGUF file (llama.cpp's model format): metadata and tensor directory, read
//! without touching the tensor data, so the coordinator can learn the model's config from a .gguf
//! without the math crates and a worker can find its slices before mapping them.
//!
//! Layout (version 2 and 3): magic `GGUF`, version u32, tensor count u64, metadata count u64,
//! metadata (key string, type u32, value), tensor infos (name, n_dims u32, dims u64 x n_dims with
//! the fastest-varying first, ggml type u32, offset u64 from the data section), then padding to
//! `general.alignment` (32 by default) and the data section.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The quantization formats the workers can hold or dequantize, with their block geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    /// Bytes of one row of `cols` elements (cols a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.type_size()
    }

    pub fn is_float(self) -> bool {
        self.block_size() == 1
    }
}

/// A metadata value; arrays keep only their length and, for numbers, their values.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    /// Element count and the numeric elements (strings are skipped: the vocabulary is 262k).
    Array {
        len: usize,
        numbers: Vec<f64>,
    },
}

/// One tensor's directory entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major shape, slowest-varying first (the file stores it the other way round): a
    /// weight `[out, in]` as in HF files.
    pub shape: Vec<usize>,
    pub ggml_type: Option<GgmlType>,
    /// The raw type id, for messages about types we cannot read.
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor's data, if its type is known and its rows whole blocks.
    pub fn byte_len(&self) -> Option<usize> {
        let t = self.ggml_type?;
        let cols = *self.shape.last()?;
        if !cols.is_multiple_of(t.block_size()) {
            return None;
        }
        Some(self.elements() / cols * t.row_bytes(cols))
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    /// Absolute file offset of the data section.
    pub data_start: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file: {reason}")]
    Format { path: String, reason: String },
}

/// Upper bounds that keep a corrupt header from asking for absurd allocations.
const MAX_STRING: u64 = 64 << 20;
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

impl GgufHeader {
    /// Reads the header of the GGUF file at `path`.
    pub fn read_file(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        let mut reader = Reader {
            inner: std::io::BufReader::with_capacity(1 << 20, file),
            pos: 0,
        };
        let header = Self::parse(&mut reader).map_err(|reason| GgufError::Format {
            path: path.display().to_string(),
            reason,
        })?;
        header
            .check_bounds(size)
            .map_err(|reason| GgufError::Format {
                path: path.display().to_string(),
                reason,
            })?;
        Ok(header)
    }

    fn parse<R: Read>(r: &mut Reader<R>) -> Result<Self, String> {
        let magic = r.bytes::<4>()?;
        if &magic != b"GGUF" {
            return Err(format!("it starts with {magic:?}, not the magic \"GGUF\""));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version}; versions 2 and 3 are supported"));
        }
        let tensor_count = r.count("tensor count")?;
        let kv_count = r.count("metadata count")?;
        let mut metadata = HashMap::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty).map_err(|e| format!("metadata {key}: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor {name} has {n_dims} dimensions (1 to 4 allowed)"
                ));
            }
            let mut shape = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let type_id = r.u32()?;
            let offset = r.u64()?;
            tensors.push(GgufTensor {
                name,
                shape,
                ggml_type: GgmlType::from_id(type_id),
                type_id,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(MetaValue::Int(a)) if *a > 0 => *a as u64,
            _ => 32,
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        Ok(Self {
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// Every tensor of a known type must lie inside the file.
    fn check_bounds(&self, file_size: u64) -> Result<(), String> {
        for t in &self.tensors {
            let Some(len) = t.byte_len() else { continue };
            let end = self.data_start + t.offset + len as u64;
            if end > file_size {
                return Err(format!(
                    "tensor {} ends at byte {end} but the file has {file_size} bytes (truncated?)",
                    t.name
                ));
            }
        }
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get_int(&self, key: &str) -> Option<i64> {
        match self.metadata.get(key)? {
            MetaValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn get_float(&self, key: &str) -> Option<f64> {
        match self.metadata.get(key)? {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn array_len(&self, key: &str) -> Option<usize> {
        match self.metadata.get(key)? {
            MetaValue::Array { len, .. } => Some(*len),
            _ => None,
        }
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("header ends early at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(format!("{what} {n} is implausible (at most {MAX_COUNT})"));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(format!("a string of {len} bytes at byte {}", self.pos));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("header ends early at byte {}: {e}", self.pos))?;
        self.pos += len;
        String::from_utf8(buf)
            .map_err(|_| format!("a string that is not UTF-8 at byte {}", self.pos))
    }

    fn value(&mut self, ty: u32) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::Int(self.bytes::<1>()?[0] as i64),
            1 => MetaValue::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.bytes()?) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => MetaValue::Int(self.u32()? as i64),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                let len = self.count("array length")?;
                let mut numbers = Vec::new();
                for _ in 0..len {
                    match self.value(elem)? {
                        MetaValue::Int(v) => numbers.push(v as f64),
                        MetaValue::Float(v) => numbers.push(v),
                        MetaValue::Bool(b) => numbers.push(f64::from(u8::from(b))),
                        _ => {}
                    }
                }
                MetaValue::Array { len, numbers }
            }
            10 => MetaValue::Int(self.u64()? as i64),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}
