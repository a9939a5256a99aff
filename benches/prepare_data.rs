//! Prepares 100,000 HH-RLHF-sized records (reading, parsing, mixing, splitting, tokenization with
//! the real SmolLM2 tokenizer) and prints records per second.
//!
//! Run: `cargo bench --bench prepare_data` (RECORDS=n to change the count, ITERS=n for repeats).
//!
//! The records repeat the 400 sample records of data/samples/hh-rlhf; each copy gets its number
//! in its first human turn, so that every record is its own interaction and nothing is
//! tokenized fewer times than in a real dataset of that size (the pipeline groups equal prompts).
use kto_train::config::{DataConfig, SourceConfig, SourceKind};
use kto_train::data::{prepare, PrepareOptions};
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

fn main() {
    let n: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sample: Vec<String> = Vec::new();
    let plain =
        std::fs::File::open(root.join("data/samples/hh-rlhf/harmless-base-test-sample.jsonl"))
            .unwrap();
    sample.extend(std::io::BufReader::new(plain).lines().map(|l| l.unwrap()));
    let gz =
        std::fs::File::open(root.join("data/samples/hh-rlhf/harmless-base-test-sample2.jsonl.gz"))
            .unwrap();
    sample.extend(
        std::io::BufReader::new(flate2::read::MultiGzDecoder::new(gz))
            .lines()
            .map(|l| l.unwrap()),
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hh-100k.jsonl");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut bytes = 0usize;
    for i in 0..n {
        let mut rec: serde_json::Value = serde_json::from_str(&sample[i % sample.len()]).unwrap();
        for key in ["chosen", "rejected"] {
            let text = rec[key]
                .as_str()
                .unwrap()
                .replacen("Human: ", &format!("Human: [{i}] "), 1);
            rec[key] = serde_json::Value::String(text);
        }
        let line = rec.to_string();
        bytes += line.len() + 1;
        writeln!(w, "{line}").unwrap();
    }
    w.flush().unwrap();
    drop(w);

    let tokenizer =
        tokenizers::Tokenizer::from_file(root.join("data/samples/smollm2/tokenizer.json")).unwrap();
    let cfg = DataConfig {
        sources: vec![SourceConfig::new(SourceKind::HhRlhf, vec![path.clone()])],
        ..Default::default()
    };
    let opts = PrepareOptions {
        tokenizer: &tokenizer,
        eos_token_id: 0,
        max_length: 512,
        seed: 42,
        strict: false,
        chat_template: None,
    };
    println!(
        "prepare_data: {n} HH-RLHF records ({:.1} MB JSON lines), SmolLM2 tokenizer, {} rayon threads",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    let mut best = f64::INFINITY;
    for it in 0..iters {
        let t = Instant::now();
        let p = prepare(&cfg, &opts).unwrap();
        let s = t.elapsed().as_secs_f64();
        best = best.min(s);
        let tokens: usize = p
            .train
            .iter()
            .chain(&p.validation)
            .map(|e| e.prompt_ids.len() + e.completion_ids.len())
            .sum();
        println!(
            "  run {}: {:.2} s, {:.0} records/s ({} examples, {} prompt+completion tokens)",
            it + 1,
            s,
            n as f64 / s,
            p.train.len() + p.validation.len(),
            tokens
        );
    }
    println!("best: {:.2} s, {:.0} records/s", best, n as f64 / best);
}
