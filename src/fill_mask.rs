//! `kiln fill-mask`: the best fill-ins for each mask token of a prompt, as
//! transformers' fill-mask pipeline gives them (softmax probability, token
//! id, the token decoded alone, and the prompt with it filled in, decoded
//! without special tokens when there is one mask).

use serde::Serialize;

use crate::{Error, Model, RunInputs, Target};

/// One candidate for one mask.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fill {
    /// Its probability at the mask position.
    pub score: f64,
    /// Its id.
    pub token: i64,
    /// `tokenizer.decode([token])`.
    pub token_str: String,
    /// The prompt with the mask replaced by it.
    pub sequence: String,
}

/// The `top_k` fill-ins of every mask token of `prompt`, mask by mask.
pub fn fill_mask(
    model: &Model,
    prompt: &str,
    top_k: usize,
    target: Target,
) -> Result<Vec<Vec<Fill>>, Error> {
    let tok = model.tokenizer().ok_or_else(|| {
        Error::Input(format!(
            "{} has no tokenizer.json: fill-mask needs one",
            model.origin()
        ))
    })?;
    let mask = tok.mask_id().ok_or_else(|| {
        Error::Input(format!(
            "{}: the tokenizer names no mask_token (tokenizer_config.json)",
            model.origin()
        ))
    })?;
    let ids = tok.encode(prompt)?;
    let masks: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask).collect();
    if masks.is_empty() {
        return Err(Error::Input(format!(
            "--prompt has no mask token `{}` to fill",
            tok.decode(&[mask])?
        )));
    }
    let outs = model.run_on(target, &RunInputs::tokens(vec![ids.clone()]))?;
    let logits = outs
        .iter()
        .find(|(n, t)| n == "logits" && t.rank() == 3)
        .map(|(_, t)| t)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: fill-mask needs a masked-LM (`logits: f32[B, T, V]`; BertForMaskedLM)",
                model.origin()
            ))
        })?;
    let v = logits.shape()[2];
    let data = logits
        .to_f32()
        .ok_or_else(|| Error::Unsupported("logits are not a float".into()))?;
    let mut out = Vec::new();
    for &at in &masks {
        let row = &data[at * v..(at + 1) * v];
        if row.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("the logits at mask position {at}"),
                cause: crate::non_finite_weights(model.weights()),
            });
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let mut order: Vec<usize> = (0..v).collect();
        // Most likely first; equal scores by id, as a stable sort keeps them.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let mut fills = Vec::new();
        for &id in order.iter().take(top_k.min(v)) {
            let mut filled = ids.clone();
            filled[at] = id as i64;
            fills.push(Fill {
                score: (row[id] as f64 - max).exp() / sum,
                token: id as i64,
                token_str: tok.decode(&[id as i64])?,
                sequence: tok.decode_with(&filled, masks.len() == 1)?,
            });
        }
        out.push(fills);
    }
    Ok(out)
}
