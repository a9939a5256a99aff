//! The reporting side of a run folder: plots from metrics.jsonl and the model card.
//!
//! Run folders are synthetic (written here), so these tests need no model and run in seconds.
use kto_train::report::{
    draw_plots, format_value, read_metrics, run_plot_command, write_model_card,
};
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};

const ENHANCED_CONFIG: &str = r#"
[model]
name_or_path = "HuggingFaceTB/SmolLM2-360M"
revision = "main"

[lora]
r = 8
alpha = 16.0
dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
use_rslora = false

[loss]
loss_type = "enhanced_kto"
beta = 0.25
desirable_weight = 1.0
undesirable_weight = 1.33
value_function = true
value_alpha_gain = 0.88
value_alpha_loss = 0.9
loss_aversion = 2.5
value_eps = 1.0
weighting = "none"
gamma_gain = 0.61
gamma_loss = 0.69
prelec_alpha = 0.65
odds_ratio_weight = 0.2
odds_ratio_max_mean_logp = -0.0001
bco_shift = true
bco_momentum = 0.9
bco_start_step = 10
bco_ramp_steps = 5

[data]

[train]
epochs = 3
batch_size = 4
grad_accum = 2
lr = 0.0002
lr_schedule = "cosine"
max_length = 512
seed = 42
"#;

const KTO_CONFIG: &str = r#"
[model]
name_or_path = "HuggingFaceTB/SmolLM2-360M"

[lora]
r = 16
alpha = 32.0
dropout = 0.0
target_modules = ["q_proj", "v_proj"]

[loss]
loss_type = "kto"
beta = 0.1

[train]
epochs = 1
batch_size = 2
grad_accum = 1
lr = 0.00005
max_length = 256
seed = 7
"#;

fn loss_at(step: u64) -> f64 {
    0.6917 - 0.0123 * step as f64
}

/// 18 training lines (some missing metrics, one with a null from a NaN), an eval line every 6
/// steps, and a last line cut in the middle of its write: 22 lines in all.
fn metrics_lines(enhanced: bool) -> Vec<String> {
    let mut lines = Vec::new();
    for step in 1..=18u64 {
        let s = step as f64;
        let mut m = json!({
            "loss": loss_at(step),
            "kl": 0.01 * s,
            "rewards/chosen": 0.02 * s,
            "rewards/rejected": -0.015 * s,
            "rewards/margins": 0.035 * s,
            "logps/chosen": -120.5 + s,
            "logps/rejected": -130.1 - s,
            "grad_norm": 1.2,
            "learning_rate": 0.0002 * (1.0 - s / 20.0),
        });
        if enhanced {
            let o = m.as_object_mut().unwrap();
            o.insert("loss/pt".into(), json!(0.6 - 0.01 * s));
            o.insert("loss/or".into(), json!(0.7 - 0.005 * s));
            o.insert("delta".into(), json!(0.001 * s));
        }
        if step == 4 {
            for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
                m.as_object_mut().unwrap().remove(k);
            }
        }
        if step == 7 {
            m["kl"] = serde_json::Value::Null;
        }
        lines.push(
            json!({
                "step": step,
                "epoch": 1.0 + (step / 7) as f64,
                "lr": 0.0002 * (1.0 - s / 20.0),
                "tokens_per_second": 812.5,
                "elapsed_seconds": 12.3 * s,
                "skipped_nonfinite": 1,
                "metrics": m,
            })
            .to_string(),
        );
        if step % 6 == 0 {
            lines.push(
                json!({
                    "step": step,
                    "epoch": 1.0,
                    "eval": true,
                    "metrics": {
                        "eval_loss": 0.7 - 0.01 * s,
                        "eval_rewards/chosen": 0.01 * s,
                        "eval_rewards/rejected": -0.01 * s,
                        "eval_rewards/margins": 0.02 * s,
                        "eval_kl": 0.02,
                    },
                })
                .to_string(),
            );
        }
    }
    lines.push(r#"{"step": 19, "epoch": 3.0, "lr": 0.00001, "metr"#.to_string());
    lines
}

fn data_summary() -> serde_json::Value {
    json!({
        "seed": 42,
        "sources": [
            {"name": "hh-rlhf", "kind": "pairs", "records_read": 100, "interactions": 90,
             "pairs": 90, "examples": 180, "desirable": 90, "undesirable": 90,
             "train": {"examples": 162}, "validation": {"examples": 18}},
            {"name": "oasst1", "kind": "tree", "records_read": 50, "interactions": 40,
             "pairs": 30, "examples": 70, "desirable": 45, "undesirable": 25,
             "train": {"examples": 63}, "validation": {"examples": 7}}
        ],
        "train": {"interactions": 117, "examples": 225, "desirable": 121, "undesirable": 104},
        "validation": {"interactions": 13, "examples": 25, "desirable": 14, "undesirable": 11}
    })
}

struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn write_run(config: &str, lines: &[String]) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-run");
    std::fs::create_dir_all(dir.join("adapter")).unwrap();
    std::fs::write(dir.join("config.toml"), config).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.join("data_summary.json"),
        serde_json::to_string_pretty(&data_summary()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("data_summary.txt"),
        "source  examples\nhh-rlhf 180\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter/adapter_config.json"),
        json!({"peft_type": "LORA", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M",
               "r": 8, "lora_alpha": 16})
        .to_string(),
    )
    .unwrap();
    Run { _tmp: tmp, dir }
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

// ---------- a PNG reader independent of the writer's shortcuts ----------

struct Png {
    width: usize,
    height: usize,
    /// RGB, row-major.
    pixels: Vec<u8>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks the signature, every chunk's CRC, the chunk order and the pixel data size, and undoes
/// all five PNG row filters, so a file that passes is one any viewer decodes the same way.
fn decode_png(path: &Path) -> Png {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: PNG signature",
        path.display()
    );
    let mut pos = 8;
    let mut chunks: Vec<([u8; 4], Vec<u8>)> = Vec::new();
    while pos < bytes.len() {
        let len = be32(&bytes[pos..]) as usize;
        let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
        let data = bytes[pos + 8..pos + 8 + len].to_vec();
        let crc = be32(&bytes[pos + 8 + len..]);
        let mut c = flate2::Crc::new();
        c.update(&kind);
        c.update(&data);
        assert_eq!(c.sum(), crc, "{}: CRC of {:?}", path.display(), kind);
        chunks.push((kind, data));
        pos += 12 + len;
    }
    assert_eq!(pos, bytes.len(), "trailing bytes");
    assert_eq!(&chunks[0].0, b"IHDR");
    assert_eq!(&chunks.last().unwrap().0, b"IEND");
    let ihdr = &chunks[0].1;
    let (width, height) = (be32(&ihdr[0..]) as usize, be32(&ihdr[4..]) as usize);
    assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0], "8-bit RGB, not interlaced");
    let idat: Vec<u8> = chunks
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.clone())
        .collect();
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = width * 3;
    assert_eq!(raw.len(), height * (stride + 1), "pixel data size");
    let mut pixels = vec![0u8; height * stride];
    for y in 0..height {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= 3 {
                pixels[y * stride + x - 3] as i32
            } else {
                0
            };
            let b = if y > 0 {
                pixels[(y - 1) * stride + x] as i32
            } else {
                0
            };
            let c = if x >= 3 && y > 0 {
                pixels[(y - 1) * stride + x - 3] as i32
            } else {
                0
            };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("row {y}: filter type {f}"),
            };
            pixels[y * stride + x] = (line[x] as i32 + pred) as u8;
        }
    }
    Png {
        width,
        height,
        pixels,
    }
}

/// A chart, not a blank canvas: several colours, and text (dark pixels) in the title band.
fn assert_chart(path: &Path) {
    let png = decode_png(path);
    assert!(png.width >= 400 && png.height >= 300, "{}", path.display());
    let colours: std::collections::HashSet<&[u8]> = png.pixels.chunks(3).collect();
    assert!(
        colours.len() > 5,
        "{}: only {} colours",
        path.display(),
        colours.len()
    );
    let title_band = &png.pixels[..png.width * 3 * 45];
    let dark = title_band
        .chunks(3)
        .filter(|p| p.iter().all(|&c| c < 100))
        .count();
    assert!(
        dark > 50,
        "{}: no title text drawn ({dark} dark pixels)",
        path.display()
    );
}

// ---------- tests ----------

#[test]
fn metrics_log_reads_every_complete_line_and_tolerates_a_cut_last_line() {
    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    let log = read_metrics(&run.dir.join("metrics.jsonl")).unwrap();
    assert!(log.partial_last_line);
    assert_eq!(log.lines.len(), 21);
    assert_eq!(log.lines.iter().filter(|l| l.eval).count(), 3);
    let last = log.last_train().unwrap();
    assert_eq!(last.step, 18.0);
    assert_eq!(last.line_no, 20);
    assert_eq!(last.metrics["loss"], loss_at(18));
    assert_eq!(log.last_eval().unwrap().metrics["eval_loss"], 0.7 - 0.18);
    // A missing metric and a null (NaN) one are absent for that step, not errors.
    assert_eq!(log.series("rewards/chosen").len(), 17);
    assert_eq!(log.series("kl").len(), 17);
    assert_eq!(log.series("eval_loss").len(), 3);
}

#[test]
fn top_level_lr_is_the_learning_rate_when_no_metric_has_it() {
    let run = write_run(
        KTO_CONFIG,
        &[json!({"step": 1, "lr": 0.0003, "metrics": {"loss": 0.69}}).to_string()],
    );
    let log = read_metrics(&run.dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.series("learning_rate"), vec![(1.0, 0.0003)]);
    assert!(!log.partial_last_line);
}

#[test]
fn malformed_middle_line_is_an_error_naming_file_and_line() {
    let mut lines = metrics_lines(false);
    lines[4] = "{\"step\": 5, \"metrics\": {\"loss\": 0.6".to_string();
    let run = write_run(KTO_CONFIG, &lines);
    let e = format!("{:#}", draw_plots(&run.dir).unwrap_err());
    assert!(e.contains("metrics.jsonl line 5"), "{e}");

    // A well-formed JSON line that is not a metrics line is named too.
    let mut lines = metrics_lines(false);
    lines[2] = "[1, 2]".to_string();
    let run = write_run(KTO_CONFIG, &lines);
    let e = format!("{:#}", run_plot_command(&run.dir).unwrap_err());
    assert!(
        e.contains("metrics.jsonl line 3") && e.contains("JSON object"),
        "{e}"
    );

    let mut lines = metrics_lines(false);
    lines[0] = json!({"metrics": {"loss": 0.5}}).to_string();
    let run = write_run(KTO_CONFIG, &lines);
    let e = format!("{:#}", run_plot_command(&run.dir).unwrap_err());
    assert!(
        e.contains("metrics.jsonl line 1") && e.contains("step"),
        "{e}"
    );
}

#[test]
fn missing_metrics_file_is_a_clear_error() {
    let run = write_run(KTO_CONFIG, &[]);
    std::fs::remove_file(run.dir.join("metrics.jsonl")).unwrap();
    let e = format!("{:#}", run_plot_command(&run.dir).unwrap_err());
    assert!(e.contains("metrics.jsonl"), "{e}");
    let e = format!("{:#}", run_plot_command(&run.dir.join("nope")).unwrap_err());
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

#[test]
fn plots_are_valid_png_images_written_atomically() {
    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    let plots = draw_plots(&run.dir).unwrap();
    assert_eq!(
        names(&plots),
        [
            "loss.png",
            "rewards.png",
            "kl.png",
            "learning_rate.png",
            "components.png"
        ]
    );
    for p in &plots {
        assert_eq!(p.parent().unwrap(), run.dir.join("plots"));
        assert_chart(p);
    }
    let leftovers: Vec<_> = std::fs::read_dir(run.dir.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".png") || n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // Redrawing replaces the files in place.
    assert_eq!(draw_plots(&run.dir).unwrap(), plots);
}

#[test]
fn a_single_logging_point_still_plots() {
    let line = json!({"step": 1, "epoch": 1.0, "lr": 0.0002,
        "metrics": {"loss": 0.6902, "kl": 0.0, "rewards/chosen": 0.0,
                    "rewards/rejected": 0.0, "rewards/margins": 0.0}})
    .to_string();
    let run = write_run(KTO_CONFIG, &[line]);
    let plots = draw_plots(&run.dir).unwrap();
    assert_eq!(
        names(&plots),
        ["loss.png", "rewards.png", "kl.png", "learning_rate.png"]
    );
    for p in &plots {
        assert_chart(p);
    }
    let card =
        std::fs::read_to_string(write_model_card(&run.dir, &run.dir.join("adapter")).unwrap())
            .unwrap();
    assert!(card.contains(&format_value(0.6902)), "{card}");
}

#[test]
fn component_plot_only_when_enhanced_metrics_were_logged() {
    let run = write_run(KTO_CONFIG, &metrics_lines(false));
    let plain = names(&draw_plots(&run.dir).unwrap());
    assert!(!plain.contains(&"components.png".to_string()), "{plain:?}");
    assert!(!run.dir.join("plots/components.png").exists());

    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    assert!(names(&draw_plots(&run.dir).unwrap()).contains(&"components.png".to_string()));
    // A redraw from metrics without the components drops the stale chart, so the folder and the
    // card never show a plot the metrics do not back.
    std::fs::write(
        run.dir.join("metrics.jsonl"),
        metrics_lines(false).join("\n"),
    )
    .unwrap();
    draw_plots(&run.dir).unwrap();
    assert!(!run.dir.join("plots/components.png").exists());
}

#[test]
fn a_chart_whose_metrics_are_all_missing_is_left_out() {
    // apo_zero_unpaired logs no KL, and an early run may have no rewards yet.
    let lines: Vec<String> = (1..=3)
        .map(|s| json!({"step": s, "lr": 1e-4, "metrics": {"loss": 0.7, "kl": null}}).to_string())
        .collect();
    let run = write_run(KTO_CONFIG, &lines);
    let plots = names(&draw_plots(&run.dir).unwrap());
    assert_eq!(plots, ["loss.png", "learning_rate.png"]);
    let card =
        std::fs::read_to_string(write_model_card(&run.dir, &run.dir.join("adapter")).unwrap())
            .unwrap();
    assert!(card.contains("](plots/loss.png)"));
    assert!(
        !card.contains("kl.png") && !card.contains("rewards.png"),
        "{card}"
    );
}

#[test]
fn model_card_holds_the_runs_real_numbers() {
    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    std::fs::write(
        run.dir.join("eval_results.json"),
        json!({"results": [
            {"task": "hellaswag", "shots": 0, "metric": "acc_norm", "value": 0.4321},
            {"task": "mmlu", "shots": 5, "metric": "acc", "value": 0.2875}
        ]})
        .to_string(),
    )
    .unwrap();
    draw_plots(&run.dir).unwrap();
    let path = write_model_card(&run.dir, &run.dir.join("adapter")).unwrap();
    assert_eq!(path, run.dir.join("adapter/README.md"));
    let card = std::fs::read_to_string(&path).unwrap();

    // Front matter for the Hub.
    assert!(card.starts_with("---\n"), "{card}");
    let front = card.split("---\n").nth(1).unwrap();
    assert!(
        front.contains("base_model: \"HuggingFaceTB/SmolLM2-360M\""),
        "{front}"
    );
    assert!(front.contains("library_name: peft"));
    for tag in ["kto", "enhanced-kto", "lora"] {
        assert!(front.contains(&format!("- \"{tag}\"")), "{tag}: {front}");
    }
    assert!(!front.contains("license"), "no license is known: {front}");

    // Method and the final numbers, formatted as the card formats them.
    assert!(card.contains("Enhanced KTO, beta = 0.25"), "{card}");
    assert!(card.contains("undesirable weight 1.33"));
    let final_loss = format_value(loss_at(18));
    assert!(
        card.contains(&format!(
            "| `loss` | {final_loss} | {} |",
            format_value(0.7 - 0.18)
        )),
        "final loss {final_loss} and eval loss: {card}"
    );
    assert!(card.contains("Training (step 18)") && card.contains("Validation (step 18)"));
    assert!(card.contains(&format!("| `loss/pt` | {} |", format_value(0.6 - 0.18))));
    assert!(card.contains("0:03:41"), "elapsed 221.4 s: {card}");

    // Component table follows the config.
    assert!(card.contains(
        "| Value function (loss aversion) | Active | alpha_gain = 0.88, alpha_loss = 0.9, lambda = 2.5, eps = 1 |"
    ), "{card}");
    assert!(card.contains("| Probability weighting | Disabled | — |"));
    assert!(card.contains("| Odds ratio | Active | weight = 0.2, mean log-prob clamp = -0.0001 |"));
    assert!(card.contains(
        "| BCO shift | Active | EMA baseline, momentum = 0.9, start step = 10, ramp = 5 steps |"
    ));
    assert!(card.contains("| Component gradient clipping | Disabled | — |"));

    // Training configuration.
    for row in [
        "| LoRA rank (r) | 8 |",
        "| LoRA alpha | 16 |",
        "| LoRA dropout | 0.05 |",
        "| LoRA target modules | `q_proj`, `k_proj`, `v_proj`, `o_proj` |",
        "| Learning rate | 0.0002 |",
        "| Batch size | 4 |",
        "| Gradient accumulation | 2 |",
        "| Effective batch size | 8 |",
        "| Epochs | 3 |",
        "| Max length (tokens) | 512 |",
        "| Seed | 42 |",
    ] {
        assert!(card.contains(row), "{row}: {card}");
    }

    // Data mix, with totals.
    assert!(
        card.contains("| hh-rlhf | pairs | 100 | 90 | 90 | 180 | 90 | 90 | 162 | 18 |"),
        "{card}"
    );
    assert!(
        card.contains("| **Total** |  | **150** | **130** | **120** | **250** |"),
        "{card}"
    );
    assert!(card.contains("train: 225 examples (121 desirable, 104 undesirable)"));

    // Evaluation table and usage.
    assert!(
        card.contains("| hellaswag | 0 | acc_norm | 0.4321 |"),
        "{card}"
    );
    assert!(card.contains("from peft import PeftModel"));
    assert!(card.contains("AutoModelForCausalLM.from_pretrained(\"HuggingFaceTB/SmolLM2-360M\")"));
}

#[test]
fn plain_kto_card_marks_every_component_disabled() {
    let run = write_run(KTO_CONFIG, &metrics_lines(false));
    let card =
        std::fs::read_to_string(write_model_card(&run.dir, &run.dir.join("adapter")).unwrap())
            .unwrap();
    assert!(card.contains("KTO, beta = 0.1"), "{card}");
    assert!(!card.contains("enhanced-kto") && !card.contains("Enhanced KTO,"));
    for c in [
        "Value function (loss aversion)",
        "Probability weighting",
        "Odds ratio",
        "BCO shift",
    ] {
        assert!(
            card.contains(&format!("| {c} | Disabled | — |")),
            "{c}: {card}"
        );
    }
    assert!(!card.contains("| Active |"));
    // Keys the config does not have are left out, not invented.
    assert!(
        !card.contains("LR schedule") && !card.contains("rsLoRA"),
        "{card}"
    );
    assert!(card.contains("| LoRA rank (r) | 16 |"));
}

#[test]
fn plot_images_travel_with_the_card() {
    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    draw_plots(&run.dir).unwrap();
    let nested = run.dir.join("exports/final");
    std::fs::create_dir_all(&nested).unwrap();
    for (adapter, prefix) in [
        (run.dir.join("adapter"), "plots/"),
        (run.dir.clone(), "plots/"),
        (nested.clone(), "plots/"),
    ] {
        let card = std::fs::read_to_string(write_model_card(&run.dir, &adapter).unwrap()).unwrap();
        let links: Vec<&str> = card
            .lines()
            .filter(|l| l.starts_with("!["))
            .map(|l| &l[l.find("](").unwrap() + 2..l.len() - 1])
            .collect();
        assert_eq!(links.len(), 5, "{card}");
        for l in &links {
            assert!(l.starts_with(prefix), "{l} from {}", adapter.display());
            assert!(
                adapter.join(l).is_file(),
                "{l} does not resolve from {}",
                adapter.display()
            );
        }
    }
    assert!(std::fs::read_to_string(run.dir.join("adapter/README.md"))
        .unwrap()
        .contains("![Training and validation loss](plots/loss.png)"));
    // The copies are the run's plots, byte for byte.
    assert_eq!(
        std::fs::read(run.dir.join("adapter/plots/loss.png")).unwrap(),
        std::fs::read(run.dir.join("plots/loss.png")).unwrap()
    );
}

#[test]
fn other_data_summary_and_eval_layouts_are_rendered() {
    let run = write_run(KTO_CONFIG, &metrics_lines(false));
    std::fs::write(
        run.dir.join("data_summary.json"),
        json!({"shp": {"records": 12, "examples": 24}, "oasst1": {"records": 3, "examples": 5}})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        run.dir.join("eval_results.json"),
        json!({"results": {"truthfulqa_mc1": {"acc,none": 0.25, "alias": "truthfulqa"}}})
            .to_string(),
    )
    .unwrap();
    let card =
        std::fs::read_to_string(write_model_card(&run.dir, &run.dir.join("adapter")).unwrap())
            .unwrap();
    assert!(card.contains("| shp | 12 | 24 |"), "{card}");
    assert!(card.contains("| **Total** | **15** | **29** |"), "{card}");
    assert!(
        card.contains("| truthfulqa_mc1 | acc,none | 0.2500 |"),
        "{card}"
    );

    // No JSON summary: the text table is shown as it is.
    std::fs::remove_file(run.dir.join("data_summary.json")).unwrap();
    let card =
        std::fs::read_to_string(write_model_card(&run.dir, &run.dir.join("adapter")).unwrap())
            .unwrap();
    assert!(
        card.contains("```text\nsource  examples\nhh-rlhf 180\n```"),
        "{card}"
    );
}

#[test]
fn plot_command_redraws_plots_and_card() {
    let run = write_run(ENHANCED_CONFIG, &metrics_lines(true));
    run_plot_command(&run.dir).unwrap();
    assert!(run.dir.join("plots/loss.png").is_file());
    let card = std::fs::read_to_string(run.dir.join("adapter/README.md")).unwrap();
    assert!(card.contains(&format_value(loss_at(18))));

    // Without an adapter there is no card to write, and that is not an error.
    let run = write_run(KTO_CONFIG, &metrics_lines(false));
    std::fs::remove_dir_all(run.dir.join("adapter")).unwrap();
    run_plot_command(&run.dir).unwrap();
    assert!(run.dir.join("plots/kl.png").is_file());
    assert!(!run.dir.join("adapter").exists());
}

#[test]
fn cli_plot_subcommand() {
    let bin = env!("CARGO_BIN_EXE_kto-train");
    let run = write_run(KTO_CONFIG, &metrics_lines(false));
    let out = std::process::Command::new(bin)
        .arg("plot")
        .arg(&run.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.dir.join("plots/loss.png").is_file());
    assert!(run.dir.join("adapter/README.md").is_file());

    let mut lines = metrics_lines(false);
    lines[6] = "not json".to_string();
    std::fs::write(run.dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
    let out = std::process::Command::new(bin)
        .arg("plot")
        .arg(&run.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.jsonl line 7"), "{err}");
}

#[test]
fn format_value_keeps_small_values_readable() {
    assert_eq!(format_value(0.71234567), "0.7123");
    assert_eq!(format_value(0.0002), "2.000e-4");
    assert_eq!(format_value(-130.1), "-130.1000");
    assert_eq!(format_value(0.0), "0");
}
