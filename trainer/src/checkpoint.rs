//! Between a tch `VarStore` and a checkpoint directory (`kosmos_models::checkpoint`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kosmos_models::checkpoint::ExtraFiles;
use kosmos_models::{Checkpoint, KosmosConfig, KosmosTokenizer, TensorBytes, write_checkpoint};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::model::Kosmos;

/// Write the model's variables as a checkpoint at `dir` (atomically; see
/// [`kosmos_models::write_checkpoint`]). Tensors already on the CPU in f32 are written in place,
/// without a copy, so a 1.6 B model needs no second 6.6 GB buffer.
pub fn save(
    vs: &VarStore,
    dir: &Path,
    config: &KosmosConfig,
    tokenizer: &KosmosTokenizer,
    overwrite: bool,
    extra: Option<ExtraFiles<'_>>,
) -> Result<PathBuf> {
    let host: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            (name, t)
        })
        .collect();
    let views: BTreeMap<String, TensorBytes<'_>> = host
        .iter()
        .map(|(name, t)| {
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let len = t.numel() * 4;
            // SAFETY: `t` is a contiguous CPU f32 tensor that outlives `views` (both live in this
            // function); its storage holds exactly numel·4 bytes from data_ptr.
            let data = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
            (name.clone(), TensorBytes { shape, data })
        })
        .collect();
    Ok(write_checkpoint(
        dir, config, tokenizer, &views, overwrite, extra,
    )?)
}

/// Copy a checkpoint's weights into the matching variables of `vs`.
pub fn load_into(vs: &mut VarStore, ckpt: &Checkpoint) -> Result<()> {
    let device = vs.device();
    let vars = vs.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            let view = ckpt.tensor(&name)?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(TrainError::Input(format!(
                    "{}: {name} has shape {shape:?}, the model expects {:?}",
                    ckpt.weights_path().display(),
                    var.size()
                )));
            }
            let src = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
            var.shallow_clone().f_copy_(&src.to_device(device))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Open a checkpoint and build the model from it on `device`.
pub fn load(dir: &Path, device: Device) -> Result<(VarStore, Kosmos, Checkpoint)> {
    let ckpt = Checkpoint::open(dir)?;
    let (mut vs, model) = Kosmos::build(&ckpt.config, device, None);
    load_into(&mut vs, &ckpt)?;
    Ok((vs, model, ckpt))
}

/// Copy a Hugging Face CLIP checkpoint's vision tower (`model.safetensors` of `CLIPModel` or
/// `CLIPVisionModel`: keys with or without `vision_model.`) into the `vision.*` variables.
/// Text-tower and projection tensors are ignored; every vision variable must be present.
pub fn load_hf_clip_vision(vs: &VarStore, path: &Path) -> Result<()> {
    let bad = |m: String| TrainError::Input(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut found = std::collections::HashMap::new();
    // Text-tower and projection tensors never match a vision variable name, so they are ignored.
    for (name, view) in st.iter() {
        found.insert(
            name.strip_prefix("vision_model.").unwrap_or(name).to_string(),
            view,
        );
    }
    let device = vs.device();
    tch::no_grad(|| -> Result<()> {
        // In name order, so the first mismatch reported is the same every run.
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let Some(key) = name.strip_prefix("vision.") else {
                continue;
            };
            let view = found
                .get(key)
                .ok_or_else(|| bad(format!("no tensor for vision_model.{key}")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(bad(format!(
                    "{key} has shape {shape:?}, the config needs {:?}",
                    var.size()
                )));
            }
            let kind = match view.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::F16 => Kind::Half,
                safetensors::Dtype::BF16 => Kind::BFloat16,
                other => return Err(bad(format!("{key}: unsupported dtype {other:?}"))),
            };
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            var.shallow_clone()
                .f_copy_(&src.to_kind(Kind::Float).to_device(device))?;
        }
        Ok(())
    })?;
    tracing::info!(path = %path.display(), "loaded the CLIP vision tower");
    Ok(())
}
