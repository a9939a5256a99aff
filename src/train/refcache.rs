//! Reference log-probs (LoRA off, no gradient) cached on disk. The reference network never
//! changes during a run, so each sequence's value is computed once and reused across epochs and
//! across runs (a sweep of loss settings pays for the reference once).
//!
//! One cache file per reference network: its name is a hash of everything the values depend on
//! besides the tokens (weight file bytes, config.json, compute dtype, kernels); entries are keyed
//! by a 128-bit hash of the token sequence and prompt length (which carry the tokenizer, the
//! prepared data and the length settings). A changed input gives another key, so a stale value
//! can never be read; a damaged file is ignored with a warning.
use crate::config::ReferenceCache;
use crate::hub::ModelFiles;
use crate::model::Llama;
use crate::util::atomic::write_atomic;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// Format 02: keys and checksum are XXH3-128 (format 01 used std's DefaultHasher, which is not
/// stable across Rust releases).
const MAGIC: &[u8; 8] = b"KTOREF02";

pub struct RefCache {
    path: PathBuf,
    map: HashMap<u128, f64>,
    dirty: bool,
    pub hits: usize,
    pub misses: usize,
}

/// A 128-bit hash that is the same on every platform, Rust release and run (XXH3-128 of the
/// length-prefixed parts), so that a cache written by one build is found by the next.
fn hash128(parts: &[&[u8]]) -> u128 {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest128()
}

/// The key of a reference network: bytes of its files plus a description of how it computes.
pub fn network_key(files: &[&Path], compute: &str) -> Result<u128> {
    let mut h = Xxh3::new();
    h.update(&(compute.len() as u64).to_le_bytes());
    h.update(compute.as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", f.display()))?
            .len();
        h.update(&len.to_le_bytes());
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.digest128())
}

/// The cache of a run's reference network (None with `reference_cache = "off"`): in
/// `$KTO_TRAIN_CACHE_DIR` or a `.kto-train-cache` folder beside the output folder with `auto`, so
/// that sibling runs share it.
pub(crate) fn open_for_run(
    setting: &ReferenceCache,
    output_dir: &Path,
    files: &ModelFiles,
    model: &Llama,
) -> Result<Option<RefCache>> {
    let dir = match setting {
        ReferenceCache::Off => return Ok(None),
        ReferenceCache::Auto => {
            match std::env::var_os("KTO_TRAIN_CACHE_DIR").filter(|v| !v.is_empty()) {
                Some(d) => PathBuf::from(d),
                None => {
                    let out = crate::config::normalize_path(output_dir);
                    let parent = out.parent().map(Path::to_path_buf).unwrap_or_default();
                    parent.join(".kto-train-cache")
                }
            }
        }
        ReferenceCache::Dir(path) => path.clone(),
    };
    let mut inputs: Vec<&Path> = files.weights.iter().map(PathBuf::as_path).collect();
    inputs.push(&files.config);
    let k = model.kernels();
    let compute = format!(
        "kto-train {} dtype={:?} fused={} device={:?} gemm={}",
        env!("CARGO_PKG_VERSION"),
        model.dtype(),
        k.fused_ops,
        model.device().location(),
        k.gemm.as_str()
    );
    let key = network_key(&inputs, &compute)?;
    Ok(Some(RefCache::open(&dir, key)?))
}

pub fn sequence_key(tokens: &[u32], prompt_len: usize) -> u128 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    hash128(&[&(prompt_len as u64).to_le_bytes(), &bytes])
}

impl RefCache {
    /// Opens (or starts) the cache of network `key` in folder `dir`.
    pub fn open(dir: &Path, key: u128) -> Result<Self> {
        let path = dir.join(format!("reference-{key:032x}.bin"));
        let mut map = HashMap::new();
        if let Ok(bytes) = std::fs::read(&path) {
            match parse(&bytes, key) {
                Some(m) => map = m,
                None => eprintln!(
                    "warning: reference cache {} is damaged; recomputing",
                    path.display()
                ),
            }
        }
        Ok(Self {
            path,
            map,
            dirty: false,
            hits: 0,
            misses: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&mut self, key: u128) -> Option<f64> {
        let v = self.map.get(&key).copied();
        if v.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        v
    }

    pub fn insert(&mut self, key: u128, value: f64) {
        self.map.insert(key, value);
        self.dirty = true;
    }

    /// Writes the cache atomically when it gained entries.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let key = self
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("reference-"))
            .and_then(|s| u128::from_str_radix(s, 16).ok())
            .expect("cache file name holds its key");
        let mut entries: Vec<(&u128, &f64)> = self.map.iter().collect();
        entries.sort_by_key(|(k, _)| **k);
        let mut out = Vec::with_capacity(32 + entries.len() * 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (k, v) in entries {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = hash128(&[&out]);
        out.extend_from_slice(&sum.to_le_bytes());
        write_atomic(&self.path, &out)?;
        self.dirty = false;
        Ok(())
    }
}

fn parse(bytes: &[u8], key: u128) -> Option<HashMap<u128, f64>> {
    if bytes.len() < 48 || &bytes[..8] != MAGIC {
        return None;
    }
    let (body, sum) = bytes.split_at(bytes.len() - 16);
    if hash128(&[body]) != u128::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    if u128::from_le_bytes(body[8..24].try_into().ok()?) != key {
        return None;
    }
    let n = u64::from_le_bytes(body[24..32].try_into().ok()?) as usize;
    let rest = &body[32..];
    if rest.len() != n * 24 {
        return None;
    }
    Some(
        rest.chunks_exact(24)
            .map(|c| {
                (
                    u128::from_le_bytes(c[..16].try_into().unwrap()),
                    f64::from_le_bytes(c[16..].try_into().unwrap()),
                )
            })
            .collect(),
    )
}
