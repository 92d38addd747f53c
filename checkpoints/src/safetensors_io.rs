//! Reading and writing safetensors files, single or sharded, as f32 host tensors.

use crate::atomic;
use anyhow::{bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tensor on the host: row-major f32 values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not match {} values",
            data.len()
        );
        Self { shape, data }
    }
}

/// The element type a tensor is stored with on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    Bf16,
    F16,
}

impl StoreDtype {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
        }
    }

    /// The name `transformers` uses in config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// Model weights spread over one or more safetensors files, read on demand.
///
/// Files are read whole into memory once; each tensor is converted to f32 only when asked for.
pub struct WeightSource {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl WeightSource {
    /// Opens the given safetensors files; every tensor name must be unique across them.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let parsed = SafeTensors::deserialize(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
            })?;
            for name in parsed.names() {
                if index.insert(name.to_string(), files.len()).is_some() {
                    bail!(
                        "tensor `{name}` appears twice (again in {})",
                        path.display()
                    );
                }
            }
            files.push((path.clone(), bytes));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name`, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// A description of where weights come from, for error messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }

    /// Reads tensor `name` as f32, whatever its stored float type.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let Some(&file_index) = self.index.get(name) else {
            bail!("tensor `{name}` is missing from {}", self.describe());
        };
        let (path, bytes) = &self.files[file_index];
        let parsed = SafeTensors::deserialize(bytes).expect("validated when opened");
        let view = parsed.tensor(name).expect("indexed when opened");
        let data =
            to_f32(&view).with_context(|| format!("tensor `{name}` in {}", path.display()))?;
        Ok(HostTensor::new(view.shape().to_vec(), data))
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    let values = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("unsupported dtype {other:?} (expected F32, BF16 or F16)"),
    };
    Ok(values)
}

fn from_f32(values: &[f32], dtype: StoreDtype) -> Vec<u8> {
    match dtype {
        StoreDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StoreDtype::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        StoreDtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Writes tensors to one safetensors file atomically, converting to `dtype`.
/// `metadata` goes into the header (`transformers` expects `{"format": "pt"}`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: StoreDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let st_dtype = match dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::Bf16 => Dtype::BF16,
        StoreDtype::F16 => Dtype::F16,
    };
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.shape.clone(), from_f32(&t.data, dtype)))
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| anyhow::anyhow!("cannot encode {}: {e}", path.display()))?;
    atomic::write_file(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_store_dtype() {
        let dir = std::env::temp_dir().join(format!("st-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tensor = HostTensor::new(vec![2, 3], vec![0.5, -1.25, 3.0, 0.0, 1e-3, 7.5]);
        for dtype in [StoreDtype::F32, StoreDtype::Bf16, StoreDtype::F16] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            write_safetensors(&path, &[("w".into(), tensor.clone())], dtype, None).unwrap();
            let back = WeightSource::open(&[path]).unwrap().get("w").unwrap();
            assert_eq!(back.shape, tensor.shape);
            let tolerance = if dtype == StoreDtype::F32 { 0.0 } else { 1e-2 };
            for (a, b) in back.data.iter().zip(&tensor.data) {
                assert!(
                    (a - b).abs() <= tolerance * b.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn missing_tensor_and_garbage_file_are_named() {
        let dir = std::env::temp_dir().join(format!("st-errors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.safetensors");
        let tensor = HostTensor::new(vec![1], vec![1.0]);
        write_safetensors(&good, &[("a".into(), tensor)], StoreDtype::F32, None).unwrap();
        let err = WeightSource::open(std::slice::from_ref(&good))
            .unwrap()
            .get("b")
            .unwrap_err();
        assert!(err.to_string().contains("`b`") && err.to_string().contains("good.safetensors"));

        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{not json at all").unwrap();
        let err = WeightSource::open(&[bad]).err().unwrap().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }
}
