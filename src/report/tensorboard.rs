//! TensorBoard event files (`output.tensorboard = true`): the metrics of every log and evaluation
//! line as scalars, named as transformers' TensorBoardCallback names them (`train/loss`,
//! `eval/loss`, `train/learning_rate`). The file format is small and stable, so it is written
//! here: TFRecord framing (length, masked CRC-32C of the length, the record, masked CRC-32C of the
//! record) around `Event` protocol buffers (wall_time = 1, step = 2, file_version = 3,
//! summary = 5; Summary.value = 1; Value.tag = 1, Value.simple_value = 2).
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Folder of the event files inside a run folder.
pub const TENSORBOARD_DIR: &str = "tensorboard";

pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (one per process, as TensorBoard expects: a resumed run adds
    /// a file), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = wall_time();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self { file, path };
        let mut event = Vec::new();
        put_f64(&mut event, 1, now);
        put_varint_field(&mut event, 2, 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding `scalars` at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            value.push(2 << 3 | 5); // field 2, 32-bit
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// A metrics.jsonl line as scalars: `eval_x` -> `eval/x`, everything else -> `train/x`.
    pub fn metrics_line(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = line["step"].as_u64() else {
            return Ok(());
        };
        let mut scalars = Vec::new();
        if let Some(m) = line["metrics"].as_object() {
            for (k, v) in m {
                if let Some(x) = v.as_f64() {
                    let tag = match k.strip_prefix("eval_") {
                        Some(rest) => format!("eval/{rest}"),
                        None => format!("train/{k}"),
                    };
                    scalars.push((tag, x));
                }
            }
        }
        // The line's own fields (learning_rate is already one of a training line's metrics).
        let (prefix, fields): (&str, &[&str]) = match line.get("eval") {
            Some(_) => ("eval", &["epoch"]),
            None => ("train", &["epoch", "tokens_per_second"]),
        };
        for key in fields {
            if let Some(x) = line[*key].as_f64() {
                scalars.push((format!("{prefix}/{key}"), x));
            }
        }
        self.scalars(step, &scalars)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        // One write per record and a flush: a reader (TensorBoard polls) never sees half of one
        // unless the process dies inside the write, which TFRecord readers skip.
        self.file.write_all(&rec)?;
        self.file.flush()?;
        Ok(())
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// TFRecord's masked CRC-32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

fn put_f64(out: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(out, u64::from(field) << 3 | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_varint(out, u64::from(field) << 3 | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_of_a_known_record() {
        // CRC-32C("123456789") = 0xE3069283 (the standard check value); masked as TFRecord does.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32, worked out by hand.
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varints_as_protobuf_writes_them() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
