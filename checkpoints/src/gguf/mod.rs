//! GGUF files (llama.cpp's format): the header, metadata and tensor infos, and tensors read
//! back as f32 in Hugging Face layout.
//!
//! The parser is ours rather than a crate's: `gguf-rs`, the maintained candidate, turns on
//! serde_json's `arbitrary_precision` for the whole workspace (which changes how every JSON
//! number in the toolkit, the tokenizer's included, is parsed) and pulls a CLI's dependencies;
//! the format itself is a short, fixed header. Spec:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

pub mod dequant;
pub mod import;
pub mod tokenizer;

use crate::safetensors_io::HostTensor;
use anyhow::{bail, Context, Result};
use dequant::GgmlType;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Guards against a corrupt length field asking for gigabytes of memory.
const MAX_STRING_BYTES: u64 = 1 << 24;
const MAX_ARRAY_ITEMS: u64 = 1 << 26;

/// A metadata value. Integers of every width are widened; the file's type is not needed after
/// parsing.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::UInt(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the fastest-moving (a row's length). Reverse for row-major.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Row-major shape, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    file_len: u64,
}

impl GgufFile {
    /// Reads the header, metadata and tensor infos; tensor data is read on demand.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut reader = Reader {
            inner: BufReader::new(file),
            path,
        };
        let header = || format!("{}: GGUF header", path.display());
        let mut magic = [0u8; 4];
        reader.inner.read_exact(&mut magic).with_context(header)?;
        if &magic != MAGIC {
            bail!(
                "{} is not a GGUF file (it starts with {:?}, not \"GGUF\")",
                path.display(),
                String::from_utf8_lossy(&magic)
            );
        }
        let version = reader.u32()?;
        match version {
            2 | 3 => {}
            1 => bail!("{}: GGUF version 1 is not supported (only 2 and 3); re-convert the model with a current llama.cpp", path.display()),
            v if v.swap_bytes() <= 3 => bail!("{}: big-endian GGUF files are not supported", path.display()),
            v => bail!("{}: unknown GGUF version {v}", path.display()),
        }
        let tensor_count = reader.u64()?;
        let metadata_count = reader.u64()?;
        if tensor_count > 1 << 20 || metadata_count > 1 << 20 {
            bail!("{}: implausible counts ({tensor_count} tensors, {metadata_count} metadata keys): the file is corrupt", path.display());
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = reader.string()?;
            let value_type = reader.u32()?;
            let value = reader
                .value(value_type)
                .with_context(|| format!("{}: metadata `{key}`", path.display()))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = reader.string()?;
            let n_dims = reader.u32()?;
            if n_dims == 0 || n_dims > 4 {
                bail!(
                    "{}: tensor `{name}` has {n_dims} dimensions",
                    path.display()
                );
            }
            let dims = (0..n_dims)
                .map(|_| reader.u64())
                .collect::<Result<Vec<_>>>()?;
            let type_id = reader.u32()?;
            let ggml_type = GgmlType::from_id(type_id)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
            let offset = reader.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0)
                .with_context(|| format!("{}: bad `general.alignment`", path.display()))?,
            None => DEFAULT_ALIGNMENT,
        };
        let header_end = reader.inner.stream_position()?;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let gguf = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            file_len,
        };
        for tensor in &gguf.tensors {
            let end = gguf.data_start + tensor.offset + gguf.byte_size(tensor)?;
            if end > file_len {
                bail!(
                    "{}: tensor `{}` ({}) ends at byte {end}, past the end of the file ({file_len} bytes): the file is truncated",
                    path.display(),
                    tensor.name,
                    tensor.ggml_type.name()
                );
            }
        }
        Ok(gguf)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A metadata value that must be present, with an error naming the key and file.
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .with_context(|| format!("{}: metadata `{key}` is missing", self.path.display()))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?.as_u64().with_context(|| {
            format!(
                "{}: metadata `{key}` is not a non-negative integer",
                self.path.display()
            )
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn byte_size(&self, tensor: &TensorInfo) -> Result<u64> {
        let row = tensor.dims[0];
        let (block, bytes) = tensor.ggml_type.block();
        if !row.is_multiple_of(block) {
            bail!(
                "{}: tensor `{}` has rows of {row} values, not a multiple of {} blocks of {block}",
                self.path.display(),
                tensor.name,
                tensor.ggml_type.name()
            );
        }
        Ok(tensor.element_count() / block * bytes)
    }

    /// The raw bytes of a tensor as stored (quantized blocks).
    pub fn raw_bytes(&self, tensor: &TensorInfo) -> Result<Vec<u8>> {
        let size = self.byte_size(tensor)?;
        let start = self.data_start + tensor.offset;
        debug_assert!(start + size <= self.file_len);
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = vec![0u8; size as usize];
        file.read_exact(&mut bytes).with_context(|| {
            format!(
                "{}: cannot read tensor `{}`",
                self.path.display(),
                tensor.name
            )
        })?;
        Ok(bytes)
    }

    /// A tensor dequantized to f32, in row-major (Hugging Face) shape.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let tensor = self
            .tensor(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.path.display()))?;
        self.dequantized(tensor)
    }

    /// As [`read_f32`](Self::read_f32), for a tensor info of this file.
    pub fn dequantized(&self, tensor: &TensorInfo) -> Result<HostTensor> {
        let bytes = self.raw_bytes(tensor)?;
        let values = dequant::dequantize(tensor.ggml_type, &bytes).with_context(|| {
            format!(
                "{}: tensor `{}` ({})",
                self.path.display(),
                tensor.name,
                tensor.ggml_type.name()
            )
        })?;
        Ok(HostTensor::new(tensor.shape(), values))
    }

    /// `{architecture}.context_length`, when the file says.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.get("general.architecture")?.as_str()?;
        self.get(&format!("{arch}.context_length"))?.as_u64()
    }
}

struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).with_context(|| {
            format!(
                "{}: the file ends inside its header (truncated?)",
                self.path.display()
            )
        })?;
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES {
            bail!(
                "{}: a string of {len} bytes in the header: the file is corrupt",
                self.path.display()
            );
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).with_context(|| {
            format!(
                "{}: the file ends inside its header (truncated?)",
                self.path.display()
            )
        })?;
        // Some vocabularies hold invalid UTF-8 pieces; keep them readable rather than fail.
        Ok(String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
    }
    fn value(&mut self, value_type: u32) -> Result<MetaValue> {
        Ok(match value_type {
            0 => MetaValue::UInt(u8::from_le_bytes(self.bytes()?) as u64),
            1 => MetaValue::Int(i8::from_le_bytes(self.bytes()?) as i64),
            2 => MetaValue::UInt(u16::from_le_bytes(self.bytes()?) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => MetaValue::UInt(self.u32()? as u64),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => MetaValue::Bool(u8::from_le_bytes(self.bytes()?) != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ARRAY_ITEMS {
                    bail!("an array of {len} items: the file is corrupt");
                }
                let items = (0..len)
                    .map(|_| self.value(item_type))
                    .collect::<Result<Vec<_>>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}
