//! Reading input files with a size limit fitting their kind: a config that
//! is a link to `/dev/zero`, or a text file of gigabytes, is refused with
//! its size instead of being read until memory runs out.

use std::io::Read;
use std::path::Path;

/// Most bytes of a JSON configuration (`config.json`,
/// `adapter_config.json`, `tokenizer_config.json`).
pub const CONFIG_LIMIT: u64 = 16 << 20;
/// Most bytes of a text-IR file (weights live in safetensors files, which
/// are mapped, not read).
pub const TEXT_IR_LIMIT: u64 = 256 << 20;

/// The bytes of `path`, or an error (`InvalidData`) when it holds more than
/// `limit` bytes: checked on the file's metadata first, then while reading
/// (a device or a pipe has no size), never reading more than `limit + 1`.
pub fn read_limited(path: &Path, limit: u64, kind: &str) -> std::io::Result<Vec<u8>> {
    let too_big = |size: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{size} is more than a {kind} may be ({} MiB at most)",
                limit >> 20
            ),
        )
    };
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > limit {
        return Err(too_big(format!("{} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(format!("more than {limit} bytes")));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text (`InvalidData` naming the first bad
/// byte's offset otherwise).
pub fn read_text_limited(path: &Path, limit: u64, kind: &str) -> std::io::Result<String> {
    let bytes = read_limited(path, limit, kind)?;
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_past_the_limit_are_refused_without_reading_them_whole() {
        let dir = std::env::temp_dir().join(format!("kiln-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("small.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_text_limited(&f, 2, "config").unwrap(), "{}");
        let e = read_limited(&f, 1, "config").unwrap_err();
        assert!(
            e.to_string()
                .contains("2 bytes is more than a config may be"),
            "{e}"
        );
        // A device without a size: read up to the limit, then refused.
        #[cfg(unix)]
        {
            let e = read_limited(Path::new("/dev/zero"), 1 << 20, "config").unwrap_err();
            assert!(e.to_string().contains("more than 1048576 bytes"), "{e}");
        }
        std::fs::write(&f, [0x7b, 0xff]).unwrap();
        let e = read_text_limited(&f, 10, "config").unwrap_err();
        assert!(e.to_string().contains("offset 1"), "{e}");
    }
}
