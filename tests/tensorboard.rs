//! `output.tensorboard`: the event files read back, by TensorBoard's own Python reader when a
//! Python with the `tensorboard` package is at hand (`KTO_TRAIN_TEST_PYTHON`, else `python3`),
//! and always by the TFRecord framing and protobuf layout checked here.
mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn smoke_run(out: &Path) {
    let o = smoke_command(env!("CARGO_BIN_EXE_kto-train"), out)
        .args(["--set", "output.tensorboard=true"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// (tag, step) -> value, from metrics.jsonl as transformers' callback names them.
fn expected(out: &Path) -> BTreeMap<(String, u64), f64> {
    let mut m = BTreeMap::new();
    for l in std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (k, x) in v["metrics"].as_object().unwrap() {
            let tag = match k.strip_prefix("eval_") {
                Some(r) => format!("eval/{r}"),
                None => format!("train/{k}"),
            };
            m.insert((tag, step), x.as_f64().unwrap());
        }
    }
    m
}

fn event_file(out: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    files[0].clone()
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*i];
        *i += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// Every (field, wire payload) of one protobuf message.
fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let payload = match key & 7 {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, payload));
    }
    out
}

#[test]
fn event_files_hold_the_logged_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke_run(&out);
    let want = expected(&out);
    let bytes = std::fs::read(event_file(&out)).unwrap();
    // TFRecord framing with its CRCs, then the events.
    let mut got = BTreeMap::new();
    let (mut i, mut n) = (0, 0);
    while i < bytes.len() {
        let len = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap()) as usize;
        let crc_len = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(
            crc_len,
            kto_train::report::tensorboard::masked_crc(&bytes[i..i + 8])
        );
        let data = &bytes[i + 12..i + 12 + len];
        let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(crc, kto_train::report::tensorboard::masked_crc(data));
        i += 16 + len;
        let ev = fields(data);
        if n == 0 {
            assert!(ev.iter().any(|(f, p)| *f == 3 && p == b"brain.Event:2"));
        }
        n += 1;
        let step = ev
            .iter()
            .find(|(f, _)| *f == 2)
            .map_or(0, |(_, p)| u64::from_le_bytes(p[..8].try_into().unwrap()));
        for (_, summary) in ev.iter().filter(|(f, _)| *f == 5) {
            for (_, value) in fields(summary) {
                let vf = fields(&value);
                let tag =
                    String::from_utf8(vf.iter().find(|(f, _)| *f == 1).unwrap().1.clone()).unwrap();
                let x = f32::from_le_bytes(
                    vf.iter().find(|(f, _)| *f == 2).unwrap().1[..4]
                        .try_into()
                        .unwrap(),
                );
                got.insert((tag, step), x as f64);
            }
        }
    }
    for (key, w) in &want {
        let g = got.get(key).unwrap_or_else(|| panic!("{key:?} missing"));
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{key:?}: {g} vs {w}"
        );
    }
    assert!(
        want.keys().any(|(t, _)| t == "eval/loss") && want.keys().any(|(t, _)| t == "train/loss")
    );

    // TensorBoard's own reader, when a Python with it is here.
    let python = std::env::var("KTO_TRAIN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys, json\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
        print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))\n";
    let o = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(out.join("tensorboard"))
        .output();
    match o {
        Ok(o) if o.status.success() => {
            let tb: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
            for ((tag, step), w) in &want {
                let series = tb
                    .get(tag)
                    .unwrap_or_else(|| panic!("TensorBoard lacks {tag}"));
                let (_, g) = series.iter().find(|(s, _)| s == step).unwrap();
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{tag}@{step}: {g} vs {w}"
                );
            }
        }
        _ => eprintln!(
            "NOTE: TensorBoard's Python reader not found ({python} -c 'import tensorboard'); \
             the event files were checked by the framing and protobuf reader here only \
             (pip install tensorboard, or KTO_TRAIN_TEST_PYTHON=/path/to/python)"
        ),
    }
}
