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
    /// `tokenizer_config.json`, parsed (`Null` without one).
    settings: serde_json::Value,
    /// The files as read (an artifact stores them).
    json: String,
    config: Option<String>,
    /// `chat_template.jinja` (where transformers 5 saves the template), or
    /// the `chat_template` of `tokenizer_config.json`.
    chat_template: Option<String>,
    /// Where the template came from, for messages.
    template_origin: String,
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
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(read(
                &jinja,
                kiln_ir::files::CONFIG_LIMIT,
                "chat_template.jinja",
            )?)
        } else {
            None
        };
        let mut tok =
            TextTokenizer::from_json(json, config, chat_template, &path.display().to_string())?;
        tok.template_origin = if jinja.exists() {
            jinja.display().to_string()
        } else {
            config_path.display().to_string()
        };
        Ok(Some(tok))
    }

    /// A tokenizer from the text of `tokenizer.json` and, optionally,
    /// `tokenizer_config.json`; `origin` names them in messages.
    pub fn from_json(
        json: String,
        config: Option<String>,
        chat_template: Option<String>,
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
        let settings: serde_json::Value = match &config {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                Error::Input(format!(
                    "{origin}: tokenizer_config.json is not valid JSON: {e}"
                ))
            })?,
            None => serde_json::Value::Null,
        };
        let cleanup = settings
            .get("clean_up_tokenization_spaces")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        // The config's template: a string, or named templates (the default).
        let chat_template = chat_template.or_else(|| {
            let t = settings.get("chat_template")?;
            t.as_str().map(str::to_string).or_else(|| {
                t.as_array()?
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))?
                    .get("template")?
                    .as_str()
                    .map(str::to_string)
            })
        });
        Ok(TextTokenizer {
            inner,
            cleanup,
            settings,
            json,
            config,
            chat_template,
            template_origin: format!("{origin} (its chat template)"),
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
        self.decode_with(ids, false)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=skip)`.
    pub fn decode_with(&self, ids: &[i64], skip: bool) -> Result<String, Error> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i)
                    .map_err(|_| Error::Input(format!("token id {i} cannot be decoded")))
            })
            .collect::<Result<_, _>>()?;
        let text = self
            .inner
            .decode(&ids, skip)
            .map_err(|e| Error::Input(format!("{}: cannot decode: {e}", self.origin)))?;
        Ok(if self.cleanup {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
    /// with the `chat_template` of `tokenizer_config.json`, rendered by
    /// minijinja (Python string methods such as `.strip()` through its
    /// pycompat layer), then encoded without added special tokens, as
    /// transformers does with `tokenize=True`. `messages` are (role,
    /// content) pairs.
    pub fn chat(&self, messages: &[(&str, &str)]) -> Result<(String, Vec<i64>), Error> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Input(format!(
                "--chat: {} has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)",
                self.origin
            ))
        })?;
        let special = |k: &str| self.special_token(k).unwrap_or("").to_string();
        self.check_template_tokens(template)?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|(role, content)| minijinja::context! { role => *role, content => *content })
            .collect();
        let text = env
            .render_str(
                template,
                minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => special("bos_token"),
                    eos_token => special("eos_token"),
                },
            )
            .map_err(|e| {
                Error::Input(format!(
                    "--chat: the chat template {} fails to render: {e}",
                    self.template_origin
                ))
            })?;
        let enc = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| Error::Input(format!("--chat: {}: cannot encode: {e}", self.origin)))?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((text, ids))
    }

    /// Refuses a template whose special tokens the vocabulary lacks: the
    /// `bos_token`/`eos_token` it uses, named by `tokenizer_config.json`, and
    /// every `<|name|>` literal in it (ChatML, Llama 3, Phi). Such a token
    /// would be encoded as plain text pieces — a prompt the model was never
    /// trained on — and a chat could never stop at its end of turn.
    fn check_template_tokens(&self, template: &str) -> Result<(), Error> {
        for key in ["bos_token", "eos_token"] {
            let Some(token) = self.special_token(key) else {
                continue;
            };
            if (template.contains(key) || key == "eos_token")
                && self.inner.token_to_id(token).is_none()
            {
                return Err(Error::Input(format!(
                    "--chat: tokenizer_config.json names {key} {token:?}, which {} does not have as a token",
                    self.origin
                )));
            }
        }
        let mut rest = template;
        while let Some(start) = rest.find("<|") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("|>") else { break };
            let name = &after[..end];
            let literal = name.len() <= 64
                && !name.is_empty()
                && !name
                    .chars()
                    .any(|c| c.is_whitespace() || "<>|{}'\"".contains(c));
            if literal {
                let token = &rest[start..start + 2 + end + 2];
                if self.inner.token_to_id(token).is_none() {
                    return Err(Error::Input(format!(
                        "--chat: the chat template {} uses the special token {token:?}, which {} does not have (it would be encoded as plain text)",
                        self.template_origin, self.origin
                    )));
                }
                rest = &after[end + 2..];
            } else {
                rest = after;
            }
        }
        Ok(())
    }

    /// The id of `tokenizer_config.json`'s `eos_token` (a chat's end of
    /// turn), when it names one the vocabulary has.
    pub fn eos_id(&self) -> Option<i64> {
        self.special_id("eos_token")
    }

    /// The id of `tokenizer_config.json`'s `mask_token`, when it names one
    /// the vocabulary has.
    pub fn mask_id(&self) -> Option<i64> {
        self.special_id("mask_token")
    }

    /// The padding token's id, when the tokenizer names one.
    pub fn pad_id(&self) -> Option<i64> {
        self.special_id("pad_token")
    }

    /// A special token `tokenizer_config.json` names under `key` (a string,
    /// or an added-token object with its `content`).
    fn special_token(&self, key: &str) -> Option<&str> {
        let v = self.settings.get(key)?;
        v.as_str().or_else(|| v.get("content")?.as_str())
    }

    /// The id of [`TextTokenizer::special_token`], when the vocabulary has it.
    fn special_id(&self, key: &str) -> Option<i64> {
        self.inner
            .token_to_id(self.special_token(key)?)
            .map(i64::from)
    }

    /// The files as read: `tokenizer.json` and `tokenizer_config.json`.
    pub fn files(&self) -> (&str, Option<&str>, Option<&str>) {
        (
            &self.json,
            self.config.as_deref(),
            self.chat_template.as_deref(),
        )
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
