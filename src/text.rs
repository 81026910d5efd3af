//! Text in and text out: a model folder's `tokenizer.json`, read with the
//! Hugging Face `tokenizers` crate (the implementation transformers' fast
//! tokenizers use), so that `--prompt` encodes as `tokenizer(text)` does and
//! generated ids decode as `tokenizer.decode(new_ids)` does — special tokens
//! kept, and transformers' `clean_up_tokenization` applied when
//! `tokenizer_config.json` sets `clean_up_tokenization_spaces`.

use std::path::Path;

use crate::Error;

/// `tokenizer.json` larger than this is refused before it is parsed (real
/// ones are a few MB).
const TOKENIZER_LIMIT: u64 = 64 << 20;

/// A model's tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// transformers' `clean_up_tokenization_spaces`.
    cleanup: bool,
    /// The id of the padding token, when the tokenizer names one.
    pad_id: Option<i64>,
    /// The files as read (an artifact stores them).
    json: String,
    config: Option<String>,
    origin: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({})", self.origin)
    }
}

impl TextTokenizer {
    /// The tokenizer of the model folder `dir`, when it has `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<TextTokenizer>, Error> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let read = |p: &Path, limit: u64, kind: &str| {
            kiln_ir::files::read_text_limited(p, limit, kind).map_err(|source| Error::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let json = read(&path, TOKENIZER_LIMIT, "tokenizer.json")?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read(
                &config_path,
                kiln_ir::files::CONFIG_LIMIT,
                "tokenizer_config.json",
            )?)
        } else {
            None
        };
        TextTokenizer::from_json(json, config, &path.display().to_string()).map(Some)
    }

    /// A tokenizer from the text of `tokenizer.json` and, optionally,
    /// `tokenizer_config.json`; `origin` names them in messages.
    pub fn from_json(
        json: String,
        config: Option<String>,
        origin: &str,
    ) -> Result<TextTokenizer, Error> {
        let mut inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            Error::Input(format!(
                "{origin}: not a tokenizer kiln can read: {}",
                crate::frontends::config::clip(&e.to_string(), 300)
            ))
        })?;
        // As `tokenizer(text)` in transformers: the file's padding and
        // truncation settings are off unless asked for (a sentence-transformers
        // tokenizer.json pads every text to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Input(format!("{origin}: {e}")))?;
        let cfg: Option<serde_json::Value> = match &config {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| {
                Error::Input(format!(
                    "{origin}: tokenizer_config.json is not valid JSON: {e}"
                ))
            })?),
            None => None,
        };
        let cleanup = cfg
            .as_ref()
            .and_then(|c| c.get("clean_up_tokenization_spaces"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let pad_token = cfg.as_ref().and_then(|c| c.get("pad_token")).and_then(|v| {
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
        });
        let pad_id = pad_token.and_then(|t| inner.token_to_id(t)).map(i64::from);
        Ok(TextTokenizer {
            inner,
            cleanup,
            pad_id,
            json,
            config,
            origin: origin.to_string(),
        })
    }

    /// `tokenizer(text)["input_ids"]`: the ids with the tokenizer's special
    /// tokens (its post-processor's template).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, Error> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Input(format!("--prompt: {}: cannot encode: {e}", self.origin)))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// `tokenizer.decode(ids)`: special tokens kept, spaces cleaned up as
    /// the tokenizer's config says.
    pub fn decode(&self, ids: &[i64]) -> Result<String, Error> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i)
                    .map_err(|_| Error::Input(format!("token id {i} cannot be decoded")))
            })
            .collect::<Result<_, _>>()?;
        let text = self
            .inner
            .decode(&ids, false)
            .map_err(|e| Error::Input(format!("{}: cannot decode: {e}", self.origin)))?;
        Ok(if self.cleanup {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The padding token's id, when the tokenizer names one.
    pub fn pad_id(&self) -> Option<i64> {
        self.pad_id
    }

    /// The files as read: `tokenizer.json` and `tokenizer_config.json`.
    pub fn files(&self) -> (&str, Option<&str>) {
        (&self.json, self.config.as_deref())
    }
}

/// transformers' `clean_up_tokenization`: no space before punctuation and
/// common English contractions.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a . b , c ! d ? it ' s do n't I 'm we 've they 're he 's"),
            "a. b, c! d? it's don't I'm we've they're he's"
        );
    }
}
