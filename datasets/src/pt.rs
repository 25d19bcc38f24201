//! Reads a tensor saved with `torch.save(tensor, path)` (a zip holding `data.pkl` and the raw
//! storage) through candle's pickle reader, which interprets the pickle opcodes itself and
//! executes no code. Only plain, contiguous tensors are accepted.

use std::io::Read;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// The tensor stored in `bytes` (the whole .pt file); `what` names it in errors.
pub fn read_tensor(bytes: &[u8], what: &str) -> Result<Tensor, String> {
    let err = |e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| err(&e))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| err(&"no data.pkl inside (not a torch.save file)"))?;
    let dir = std::path::PathBuf::from(pkl.trim_end_matches(".pkl"));
    let obj = {
        let mut reader = std::io::BufReader::new(zip.by_name(&pkl).map_err(|e| err(&e))?);
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader).map_err(|e| err(&e))?;
        stack.finalize().map_err(|e| err(&e))?
    };
    let info = obj
        .into_tensor_info(Object::Unicode("tensor".into()), &dir)
        .map_err(|e| err(&e))?
        .ok_or_else(|| err(&"does not hold a single tensor"))?;
    if !info.layout.is_contiguous() {
        return Err(err(&"holds a non-contiguous tensor"));
    }
    let mut raw = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| err(&e))?
        .read_to_end(&mut raw)
        .map_err(|e| err(&e))?;
    let shape = info.layout.shape().clone();
    let size = info.dtype.size_in_bytes();
    let start = info.layout.start_offset() * size;
    let n = shape.elem_count();
    let bytes = raw.get(start..start + n * size).ok_or_else(|| {
        err(&format!(
            "storage holds {} bytes, the tensor needs {}",
            raw.len(),
            start + n * size
        ))
    })?;
    let dev = &Device::Cpu;
    let t = match info.dtype {
        DType::I64 => Tensor::from_vec(
            bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        DType::F32 => Tensor::from_vec(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        DType::U8 => Tensor::from_vec(bytes.to_vec(), shape, dev),
        other => {
            return Err(err(&format!(
                "dtype {other:?} is not read (int64, float32, uint8 are)"
            )))
        }
    };
    t.map_err(|e| err(&e))
}
