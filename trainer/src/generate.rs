//! Greedy generation with the KV cache (the trainer's reference decoding: the runtime must match
//! it token for token).

use kosmos_models::sequence::Assembled;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::model::Kosmos;

/// Greedy continuation of each prompt (left-padded into one batch), up to `max_new` tokens or
/// `</s>`. `pixel_values` holds every prompt's images, in prompt order. Returns the new tokens
/// of each prompt, without `</s>`.
pub fn greedy(
    model: &Kosmos,
    prompts: &[Assembled],
    pixel_values: Option<&Tensor>,
    max_new: usize,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let device = model.decoder.embed_tokens.device();
    let sp = &model.config.tokenizer;
    let b = prompts.len();
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if width + max_new > model.config.decoder.max_target_positions {
        return Err(TrainError::Input(format!(
            "prompt of {width} tokens + {max_new} new exceeds the context of {}",
            model.config.decoder.max_target_positions
        )));
    }
    let (ids, img, mask) = kosmos_models::sequence::left_padded(prompts, width, sp.pad_token_id);
    let shape = [b as i64, width as i64];
    let input_ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let image_mask = Tensor::from_slice(&img).view(shape).to_device(device);
    let mut attention_mask = Tensor::from_slice(&mask).view(shape).to_device(device);

    tch::no_grad(|| {
        let image_embeds = pixel_values
            .map(|p| model.encode_images(&p.to_device(device), false))
            .transpose()?;
        let mut out = model.step(
            &input_ids,
            image_embeds.as_ref(),
            &image_mask,
            &attention_mask,
            None,
            false,
        )?;
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..max_new {
            let next = out.logits.select(1, -1).argmax(-1, false).to_device(Device::Cpu);
            let next: Vec<i64> = Vec::try_from(&next).map_err(TrainError::from)?;
            for (row, &t) in next.iter().enumerate() {
                if done[row] {
                    continue;
                }
                if t as u32 == sp.eos_token_id {
                    done[row] = true;
                } else {
                    generated[row].push(t as u32);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let step_ids = Tensor::from_slice(&next).view([b as i64, 1]).to_device(device);
            let no_image = Tensor::zeros([b as i64, 1], (Kind::Bool, device));
            attention_mask = Tensor::cat(
                &[
                    &attention_mask,
                    &Tensor::ones([b as i64, 1], (Kind::Int64, device)),
                ],
                1,
            );
            out = model.step(
                &step_ids,
                None,
                &no_image,
                &attention_mask,
                Some(&out.present),
                false,
            )?;
        }
        Ok(generated)
    })
}
