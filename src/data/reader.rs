//! Reading records from .jsonl, .json, .jsonl.gz and .parquet files.
//!
//! Every file is resolved and checked (exists, is the named format) by [`preflight`] before any
//! record is read, so a typo in the tenth file fails in milliseconds, not after the first nine.
use crate::config::FileFormat;
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a record came from: a file line (JSON lines) or a record number (JSON array, Parquet row),
/// both 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<PathBuf>,
    pub index: usize,
    pub is_line: bool,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_line {
            write!(f, "{}:{}", self.file.display(), self.index)
        } else {
            write!(f, "{} (record {})", self.file.display(), self.index)
        }
    }
}

/// The concrete layout of one file, after [`preflight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    JsonLines { gz: bool },
    JsonArray { gz: bool },
    Parquet,
}

#[derive(Debug, Clone)]
pub struct DataFile {
    pub path: PathBuf,
    pub layout: Layout,
}

/// One record: its location and either its JSON value or why it could not be parsed.
pub struct RawRecord {
    pub loc: Loc,
    pub value: std::result::Result<Value, String>,
}

/// Expands patterns, checks each file exists and is the format its name (or `format`) says.
pub(crate) fn preflight(files: &[PathBuf], format: FileFormat) -> Result<Vec<DataFile>> {
    let mut out = Vec::new();
    for pattern in files {
        let paths = expand(pattern)?;
        for path in paths {
            let layout = check_file(&path, format)?;
            out.push(DataFile { path, layout });
        }
    }
    Ok(out)
}

fn has_wildcard(s: &str) -> bool {
    s.contains('*') || s.contains('?')
}

/// `*` and `?` inside path components; no crate needed for this small subset of glob.
fn expand(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    if !has_wildcard(&text) {
        if !crate::util::fs::exists(pattern, "data file")? {
            bail!("data file {} does not exist", pattern.display());
        }
        if !pattern.is_file() {
            bail!("data file {} is not a regular file", pattern.display());
        }
        return Ok(vec![pattern.to_path_buf()]);
    }
    let mut current: Vec<PathBuf> = vec![PathBuf::new()];
    for comp in pattern.components() {
        let c = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for base in &current {
            if has_wildcard(&c) {
                let dir = if base.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    base.as_path()
                };
                let Ok(rd) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| wildcard_match(&c, n))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| base.join(n)));
            } else {
                next.push(base.join(comp.as_os_str()));
            }
        }
        current = next;
    }
    let files: Vec<PathBuf> = current.into_iter().filter(|p| p.is_file()).collect();
    if files.is_empty() {
        bail!("data file pattern {} matches no file", pattern.display());
    }
    Ok(files)
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Classic two-pointer matcher with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

const ALLOWED: &str = ".jsonl, .ndjson, .json, .jsonl.gz, .ndjson.gz, .json.gz or .parquet \
                       (or set the source's `format`)";

fn format_from_name(path: &Path) -> Result<FileFormat> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let f = if name.ends_with(".jsonl.gz") || name.ends_with(".ndjson.gz") {
        FileFormat::JsonlGz
    } else if name.ends_with(".json.gz") {
        // Sniffed below like .json: array or lines.
        FileFormat::JsonlGz
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        FileFormat::Jsonl
    } else if name.ends_with(".json") {
        FileFormat::Json
    } else if name.ends_with(".parquet") {
        FileFormat::Parquet
    } else {
        bail!(
            "data file {}: cannot tell its format from the name; expected {ALLOWED}",
            path.display()
        );
    };
    Ok(f)
}

/// First non-whitespace byte (after an optional UTF-8 BOM) of `head`.
fn first_char(head: &[u8]) -> Option<u8> {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    head.iter().copied().find(|b| !b.is_ascii_whitespace())
}

fn read_head(path: &Path, gz: bool) -> Result<Vec<u8>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = Vec::new();
    if gz {
        let mut dec = flate2::read::MultiGzDecoder::new(file);
        // A whitespace-padded start is rare; 4 KiB is plenty to find the first character.
        let mut chunk = vec![0u8; 4096];
        let n = dec.read(&mut chunk).map_err(|e| {
            anyhow!(
                "data file {} is not valid gzip ({e}); expected a gzip-compressed JSON lines file",
                path.display()
            )
        })?;
        buf.extend_from_slice(&chunk[..n]);
    } else {
        file.take(4096).read_to_end(&mut buf)?;
    }
    Ok(buf)
}

fn check_file(path: &Path, format: FileFormat) -> Result<Layout> {
    let format = match format {
        FileFormat::Auto => format_from_name(path)?,
        f => f,
    };
    let what = |expected: &str, found: &str| {
        anyhow!("data file {} is not {expected}: {found}", path.display())
    };
    match format {
        FileFormat::Parquet => {
            let mut magic = [0u8; 4];
            let mut f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let ok = f.read_exact(&mut magic).is_ok() && &magic == b"PAR1";
            if !ok {
                return Err(what("a Parquet file", "it does not start with PAR1"));
            }
            parquet::file::reader::SerializedFileReader::new(f_reopen(path)?)
                .map_err(|e| what("a readable Parquet file", &e.to_string()))?;
            Ok(Layout::Parquet)
        }
        FileFormat::JsonlGz => {
            let mut magic = [0u8; 2];
            let mut f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            if f.read_exact(&mut magic).is_err() || magic != [0x1f, 0x8b] {
                return Err(what("gzip-compressed", "it lacks the gzip magic bytes"));
            }
            let head = read_head(path, true)?;
            let is_json_name = path.to_string_lossy().to_lowercase().ends_with(".json.gz");
            match first_char(&head) {
                None | Some(b'{') => Ok(Layout::JsonLines { gz: true }),
                Some(b'[') if is_json_name => Ok(Layout::JsonArray { gz: true }),
                Some(c) => Err(what(
                    "gzip-compressed JSON lines",
                    &format!("its text starts with `{}`, not `{{`", c as char),
                )),
            }
        }
        FileFormat::Jsonl => match first_char(&read_head(path, false)?) {
            None | Some(b'{') => Ok(Layout::JsonLines { gz: false }),
            Some(0x1f) => Err(what(
                "JSON lines",
                "it looks gzip-compressed; name it .jsonl.gz or set format = \"jsonl.gz\"",
            )),
            Some(c) => Err(what(
                "JSON lines (one object per line)",
                &format!("it starts with `{}`, not `{{`", c as char),
            )),
        },
        FileFormat::Json => match first_char(&read_head(path, false)?) {
            Some(b'[') => Ok(Layout::JsonArray { gz: false }),
            // SHP's train.json files are JSON lines under a .json name.
            Some(b'{') | None => Ok(Layout::JsonLines { gz: false }),
            Some(c) => Err(what(
                "JSON (an array of records, or one record per line)",
                &format!("it starts with `{}`", c as char),
            )),
        },
        FileFormat::Auto => unreachable!("resolved above"),
    }
}

fn f_reopen(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn read_all(path: &Path, gz: bool) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let file = f_reopen(path)?;
    if gz {
        flate2::read::MultiGzDecoder::new(file)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot decompress {}", path.display()))?;
    } else {
        std::io::BufReader::new(file)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(buf)
}

/// All records of `file`, parsed in parallel. A line that is not JSON becomes an `Err` record
/// (reported and skipped by the caller); a JSON array or Parquet file that cannot be read at all
/// is an error of the whole file.
pub(crate) fn read_records(file: &DataFile) -> Result<Vec<RawRecord>> {
    let path = Arc::new(file.path.clone());
    match file.layout {
        Layout::JsonLines { gz } => {
            let bytes = read_all(&file.path, gz)?;
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let lines: Vec<(usize, &[u8])> = bytes
                .split(|b| *b == b'\n')
                .enumerate()
                .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
                // Blank lines hold no record (a trailing newline makes one).
                .filter(|(_, l)| l.iter().any(|b| !b.is_ascii_whitespace()))
                .collect();
            Ok(lines
                .par_iter()
                .map(|(n, l)| RawRecord {
                    loc: Loc {
                        file: path.clone(),
                        index: *n,
                        is_line: true,
                    },
                    value: serde_json::from_slice::<Value>(l).map_err(|e| {
                        format!("not valid JSON ({})", strip_line_info(&e.to_string()))
                    }),
                })
                .collect())
        }
        Layout::JsonArray { gz } => {
            let bytes = read_all(&file.path, gz)?;
            let values: Vec<Value> = serde_json::from_slice(&bytes).map_err(|e| {
                anyhow!(
                    "data file {} is not a valid JSON array: {e}",
                    file.path.display()
                )
            })?;
            Ok(values
                .into_iter()
                .enumerate()
                .map(|(i, v)| RawRecord {
                    loc: Loc {
                        file: path.clone(),
                        index: i + 1,
                        is_line: false,
                    },
                    value: Ok(v),
                })
                .collect())
        }
        Layout::Parquet => read_parquet(file, path),
    }
}

/// serde_json's "at line 1 column 5" is about the line's own text; keep only the column.
fn strip_line_info(msg: &str) -> String {
    msg.replace(" at line 1 column ", " at column ")
}

/// A Parquet file's rows. The footer is trusted for the row count only after checking it against
/// the file (offsets and sizes inside it); the pages are not trusted at all: a corrupt page makes
/// the parquet crate panic, fail on every later row, or decode without end; so decoding runs behind
/// a panic guard, the first row that does not decode ends the file with an error, and a row group
/// that yields more rows than its footer declares is refused. The error names the file and the
/// row group, and memory stays bounded by the declared row count.
fn read_parquet(file: &DataFile, path: Arc<PathBuf>) -> Result<Vec<RawRecord>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let name = file.path.display().to_string();
    let reader = SerializedFileReader::new(f_reopen(&file.path)?)
        .with_context(|| format!("cannot read Parquet file {name}"))?;
    let file_len = std::fs::metadata(&file.path)
        .with_context(|| format!("cannot read {name}"))?
        .len();
    check_parquet_footer(reader.metadata(), file_len, &name)?;
    let mut out = Vec::new();
    for g in 0..reader.num_row_groups() {
        let declared = reader.metadata().row_group(g).num_rows().max(0) as usize;
        let rows = without_panics(|| {
            let group = reader.get_row_group(g)?;
            let mut rows = Vec::with_capacity(declared);
            for row in group.get_row_iter(None)? {
                if rows.len() == declared {
                    return Err(parquet::errors::ParquetError::General(format!(
                        "more rows than the {declared} its footer declares"
                    )));
                }
                // A row that does not decode leaves the decoder in no known state: the rest of
                // the row group cannot be trusted either.
                rows.push(row_to_json(&row?));
            }
            Ok(rows)
        })
        .with_context(|| format!("Parquet file {name}, row group {g}: corrupt data"))?;
        for row in rows {
            let loc = Loc {
                file: path.clone(),
                index: out.len() + 1,
                is_line: false,
            };
            out.push(RawRecord {
                loc,
                value: Ok(row),
            });
        }
    }
    Ok(out)
}

/// Every column chunk of the footer lies inside the file, so no read is sized by a bogus length.
fn check_parquet_footer(
    meta: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
    name: &str,
) -> Result<()> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for c in rg.columns() {
            let (start, len) = c.byte_range();
            if start.checked_add(len).is_none_or(|end| end > file_len) {
                bail!(
                    "Parquet file {name}, row group {g}: column `{}` claims bytes {start}..{} of a                      {file_len}-byte file (corrupt footer)",
                    c.column_path(),
                    start.saturating_add(len)
                );
            }
        }
    }
    Ok(())
}

/// Runs `f`, turning a panic of the parquet crate on corrupt input into an error. The panic
/// message is kept for the error and not printed.
fn without_panics<T>(
    f: impl FnOnce() -> parquet::errors::Result<T>,
) -> std::result::Result<T, anyhow::Error> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    match result {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("a panic in the parquet decoder");
            Err(anyhow!("the parquet decoder failed ({msg})"))
        }
    }
}

fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(k, f)| (k.clone(), field_to_json(f)))
            .collect(),
    )
}

fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(v) => (*v).into(),
        F::Short(v) => (*v).into(),
        F::Int(v) => (*v).into(),
        F::Long(v) => (*v).into(),
        F::UByte(v) => (*v).into(),
        F::UShort(v) => (*v).into(),
        F::UInt(v) => (*v).into(),
        F::ULong(v) => (*v).into(),
        F::Float16(v) => f64::from(*v).into(),
        F::Float(v) => f64::from(*v).into(),
        F::Double(v) => (*v).into(),
        F::Str(s) => Value::String(s.clone()),
        // Untyped binary columns often hold UTF-8 text (writers that omit the String annotation).
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|x| (*x).into()).collect()),
        },
        F::Group(r) => row_to_json(r),
        F::ListInternal(l) => Value::Array(l.elements().iter().map(field_to_json).collect()),
        F::MapInternal(m) => Value::Object(
            m.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        F::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        // Decimals, dates and timestamps carry no text this pipeline reads; keep them readable.
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.json", "train.json"));
        assert!(wildcard_match("train*", "train.json"));
        assert!(wildcard_match("t?ain.json", "train.json"));
        assert!(!wildcard_match("*.jsonl", "train.json"));
        assert!(wildcard_match("*a*b*", "xxaxxbxx"));
        assert!(!wildcard_match("*a*b", "xxaxxbxx"));
    }
}
