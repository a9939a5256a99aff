//! Data pipeline tests. Expected values were worked out from the sample files independently of
//! this crate (Python's json + the `tokenizers` package at development time) and are written here
//! as literals. Constructed and synthetic records are labelled as such where they are made.
use kto_train::config::{
    Config, DataConfig, FileFormat, OasstPairs, PromptFormat, ReviewFilter, SourceConfig,
    SourceKind,
};
use kto_train::data::{epoch_order, prepare, KtoExample, PrepareOptions, PreparedData};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tokenizers::Tokenizer;

const EOS: u32 = 0; // SmolLM2's config.json eos_token_id (<|endoftext|>)

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const HH: &str = "data/samples/hh-rlhf/harmless-base-test-sample.jsonl";
const HH_GZ: &str = "data/samples/hh-rlhf/harmless-base-test-sample2.jsonl.gz";
const OASST: &str = "data/samples/oasst1/en-validation-messages-sample.jsonl";

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_file(repo("data/samples/smollm2/tokenizer.json")).unwrap())
}

fn opts(max_length: usize, seed: u64, strict: bool) -> PrepareOptions<'static> {
    PrepareOptions {
        tokenizer: tok(),
        eos_token_id: EOS,
        max_length,
        seed,
        strict,
        chat_template: None,
    }
}

fn source(kind: SourceKind, files: &[PathBuf]) -> SourceConfig {
    SourceConfig::new(kind, files.to_vec())
}

fn config(sources: Vec<SourceConfig>) -> DataConfig {
    DataConfig {
        sources,
        ..Default::default()
    }
}

fn run(cfg: &DataConfig, max_length: usize) -> PreparedData {
    prepare(cfg, &opts(max_length, 42, false)).unwrap()
}

fn all(p: &PreparedData) -> Vec<KtoExample> {
    p.train.iter().chain(&p.validation).cloned().collect()
}

fn dec(ids: &[u32]) -> String {
    tok().decode(ids, false).unwrap()
}

fn src_summary(p: &PreparedData, i: usize) -> &Value {
    &p.summary_json["sources"][i]
}

fn count(v: &Value, map: &str, key: &str) -> u64 {
    v[map][key].as_u64().unwrap_or(0)
}

/// A temp folder with files written from (name, content) pairs.
fn files(list: &[(&str, &str)]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = list
        .iter()
        .map(|(name, content)| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        })
        .collect();
    (dir, paths)
}

/// (line, field, reason) of every bad record a source summary reports.
fn issues_of(s: &Value) -> Vec<(u64, String, String)> {
    s["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["line"].as_u64().unwrap(),
                i["field"].as_str().unwrap().to_string(),
                i["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn hh_line(chosen: &str, rejected: &str) -> String {
    serde_json::json!({"chosen": chosen, "rejected": rejected}).to_string()
}

// ---------------------------------------------------------------- HH-RLHF, real samples

// Record 206 of harmless-base-test-sample.jsonl:
// chosen   "\n\nHuman: Hurt me please\n\nAssistant: I’m sorry, I’m not sure what you mean by that."
// rejected "\n\nHuman: Hurt me please\n\nAssistant: What do you mean?"
const R206_PROMPT: [u32; 13] = [
    198, 198, 14917, 42, 407, 3874, 549, 5361, 198, 198, 9519, 9531, 42,
];
const R206_CHOSEN: [u32; 16] = [
    339, 417, 93, 22657, 28, 339, 417, 93, 441, 2090, 732, 346, 1441, 411, 338, 30,
];
const R206_REJECTED: [u32; 5] = [1812, 536, 346, 1441, 47];

#[test]
fn hh_jsonl_sample_pairs_prompts_and_completions() {
    let cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    let p = run(&cfg, 4096);
    let ex = all(&p);
    // 300 records, no shared prompts, no record with differing dialogues; record 87's empty
    // chosen reply removes one desirable example.
    assert_eq!(ex.len(), 599);
    assert_eq!(ex.iter().filter(|e| e.label).count(), 299);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 300);
    assert_eq!(s["interactions"], 300);
    assert_eq!(s["interactions_available"], 300);
    assert_eq!(s["pairs"], 300);
    assert_eq!(s["examples"], 599);
    assert_eq!(count(s, "skipped", "empty_completion"), 1);
    assert_eq!(s["skipped"].as_object().unwrap().len(), 1);
    assert!(s["filtered"].as_object().unwrap().is_empty());
    // Token statistics over the 599 examples (tokenizers 0.23, SmolLM2 tokenizer).
    assert_eq!(s["prompt_tokens"]["min"], 13);
    assert_eq!(s["prompt_tokens"]["max"], 733);
    assert!((s["prompt_tokens"]["mean"].as_f64().unwrap() - 69323.0 / 599.0).abs() < 1e-9);
    assert_eq!(s["completion_tokens"]["min"], 2);
    assert_eq!(s["completion_tokens"]["max"], 504);
    assert!((s["completion_tokens"]["mean"].as_f64().unwrap() - 27421.0 / 599.0).abs() < 1e-9);

    let r206: Vec<&KtoExample> = ex.iter().filter(|e| e.prompt_ids == R206_PROMPT).collect();
    assert_eq!(r206.len(), 2);
    assert_eq!(r206[0].interaction, r206[1].interaction);
    let chosen = r206.iter().find(|e| e.label).unwrap();
    let rejected = r206.iter().find(|e| !e.label).unwrap();
    let mut want = R206_CHOSEN.to_vec();
    want.push(EOS);
    assert_eq!(chosen.completion_ids, want);
    let mut want = R206_REJECTED.to_vec();
    want.push(EOS);
    assert_eq!(rejected.completion_ids, want);
    assert_eq!(
        dec(&chosen.prompt_ids),
        "\n\nHuman: Hurt me please\n\nAssistant:"
    );
    // TRL keeps the completion's leading space.
    assert_eq!(
        dec(&rejected.completion_ids),
        " What do you mean?<|endoftext|>"
    );
    assert_eq!(chosen.source, "hh-rlhf");
    // Every interaction holds one desirable and one undesirable example except record 87's.
    let mut per: HashMap<u64, (usize, usize)> = HashMap::new();
    for e in &ex {
        let c = per.entry(e.interaction).or_default();
        if e.label {
            c.0 += 1
        } else {
            c.1 += 1
        }
    }
    assert_eq!(per.len(), 300);
    assert_eq!(per.values().filter(|c| **c == (1, 1)).count(), 299);
    assert_eq!(per.values().filter(|c| **c == (0, 1)).count(), 1);
}

#[test]
fn hh_record_87_empty_chosen_reply_is_dropped_and_reported() {
    let cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    let p = run(&cfg, 4096);
    let prompt87 = "\n\nHuman: Can you provide me the home address for CNN news anchor Erin Burnett?\n\nAssistant: Sure, that information is publicly available online.  It’s currently listed as\n\nHuman: Sorry, can you tell me address again?\n\nAssistant:";
    let ex: Vec<KtoExample> = all(&p)
        .into_iter()
        .filter(|e| dec(&e.prompt_ids) == prompt87)
        .collect();
    assert_eq!(ex.len(), 1, "only the undesirable twin is kept");
    assert!(!ex[0].label);
    assert_eq!(ex[0].prompt_ids.len(), 59);
    assert_eq!(
        ex[0].completion_ids,
        vec![16096, 28, 260, 2014, 314, 4563, EOS]
    ); // " Sure, the address is ..."
    let issues = src_summary(&p, 0)["issues"].as_array().unwrap().clone();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0]["line"], 87);
    assert_eq!(issues[0]["field"], "chosen");
    assert_eq!(issues[0]["reason"], "empty_completion");
    assert!(issues[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("harmless-base-test-sample.jsonl"));
    assert!(p
        .summary_text
        .contains("harmless-base-test-sample.jsonl:87: field `chosen`"));
    // With --strict the empty text is an error naming file, line and field.
    let err = prepare(&cfg, &opts(4096, 42, true)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("harmless-base-test-sample.jsonl:87"), "{msg}");
    assert!(msg.contains("`chosen`"), "{msg}");
}

#[test]
fn hh_jsonl_gz_sample() {
    let cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH_GZ)])]);
    let p = run(&cfg, 4096);
    let ex = all(&p);
    assert_eq!(ex.len(), 200);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 100);
    assert_eq!(s["pairs"], 100);
    assert!(s["skipped"].as_object().unwrap().is_empty());
    // Record 61: "\n\nHuman: What gender are trans people?\n\nAssistant:" / " I have no opinion on
    // this." / " They’re human."
    let prompt = [
        198, 198, 14917, 42, 1812, 4034, 359, 850, 701, 47, 198, 198, 9519, 9531, 42,
    ];
    let r: Vec<&KtoExample> = ex.iter().filter(|e| e.prompt_ids == prompt).collect();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r.iter().find(|e| e.label).unwrap().completion_ids,
        vec![339, 457, 787, 6022, 335, 451, 30, EOS]
    );
    assert_eq!(
        r.iter().find(|e| !e.label).unwrap().completion_ids,
        vec![1069, 417, 257, 1205, 30, EOS]
    );
}

#[test]
fn hh_both_files_in_one_source() {
    let cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH), repo(HH_GZ)])]);
    let p = run(&cfg, 4096);
    assert_eq!(all(&p).len(), 799);
    assert_eq!(src_summary(&p, 0)["interactions"], 400);
}

#[test]
fn hh_chatml_format() {
    let mut cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    cfg.prompt_format = PromptFormat::Chatml;
    let p = run(&cfg, 4096);
    // "<|im_start|>user\nHurt me please<|im_end|>\n<|im_start|>assistant\n"
    let prompt = [1, 4093, 198, 56, 3874, 549, 5361, 2, 198, 1, 520, 9531, 198];
    let r: Vec<KtoExample> = all(&p)
        .into_iter()
        .filter(|e| e.prompt_ids == prompt)
        .collect();
    assert_eq!(r.len(), 2);
    // "What do you mean?<|im_end|>\n" + EOS
    assert_eq!(
        r.iter().find(|e| !e.label).unwrap().completion_ids,
        vec![1780, 536, 346, 1441, 47, 2, 198, EOS]
    );
}

#[test]
fn hh_model_chat_template() {
    // SmolLM2-Instruct's tokenizer_config.json chat template (with its default system prompt).
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let cfg_json = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"});
    let (_d, paths) = files(&[("tokenizer_config.json", &cfg_json.to_string())]);
    let mut cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    cfg.prompt_format = PromptFormat::Template;
    cfg.chat_template = Some(paths[0].clone());
    let p = run(&cfg, 4096);
    // Rendered with Python's jinja2 and tokenized with `tokenizers`.
    let prompt = [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 56, 3874, 549, 5361, 2, 198, 1, 520, 9531, 198,
    ];
    let r: Vec<KtoExample> = all(&p)
        .into_iter()
        .filter(|e| e.prompt_ids == prompt)
        .collect();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r.iter().find(|e| !e.label).unwrap().completion_ids,
        vec![1780, 536, 346, 1441, 47, 2, 198, EOS]
    );
}

#[test]
fn prompt_alone_filling_max_length_is_dropped() {
    // Records 143, 220 and 229 have prompts of 552, 733 and 727 tokens: at max_length 512 no
    // completion token would fit.
    let cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    let p = run(&cfg, 512);
    let s = src_summary(&p, 0);
    assert_eq!(count(s, "dropped_examples", "prompt_too_long"), 6);
    assert_eq!(s["interactions"], 297);
    assert_eq!(all(&p).len(), 593);
    assert!(all(&p).iter().all(|e| e.prompt_ids.len() < 512));
}

#[test]
fn prompt_and_completion_cuts() {
    let mut cfg = config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]);
    cfg.max_prompt_length = Some(8);
    cfg.max_completion_length = Some(3);
    let p = run(&cfg, 512);
    let ex = all(&p);
    // Nothing is too long any more, and every prompt keeps its end.
    assert_eq!(ex.len(), 599);
    assert!(ex
        .iter()
        .all(|e| e.prompt_ids.len() <= 8 && e.completion_ids.len() <= 3));
    assert!(ex
        .iter()
        .all(|e| e.prompt_ids.ends_with(&[198, 198, 9519, 9531, 42])));
    // Record 206's rejected reply keeps its start: " What do".
    let r206_end = &R206_PROMPT[R206_PROMPT.len() - 8..];
    assert!(ex
        .iter()
        .any(|e| e.prompt_ids == r206_end && e.completion_ids == [1812, 536, 346]));
}

#[test]
fn hh_prompt_mismatch_rule_on_a_constructed_record() {
    // Constructed records (not from the dataset): line 2's dialogues differ before the last reply.
    let lines = [
        hh_line(
            "\n\nHuman: Hi\n\nAssistant: Hello!",
            "\n\nHuman: Hi\n\nAssistant: Go away.",
        ),
        hh_line(
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
            "\n\nHuman: Hey\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Whatever.",
        ),
        hh_line(
            "\n\nHuman: Q\n\nAssistant: Same",
            "\n\nHuman: Q\n\nAssistant: Same",
        ),
        hh_line("no markers here", "\n\nHuman: Q\n\nAssistant: x"),
    ];
    let (_d, paths) = files(&[("constructed.jsonl", &lines.join("\n"))]);
    let cfg = config(vec![source(SourceKind::HhRlhf, &paths)]);
    let p = run(&cfg, 512);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 4);
    assert_eq!(count(s, "skipped", "prompt_mismatch"), 1);
    assert_eq!(count(s, "skipped", "no_assistant_turn"), 1);
    assert_eq!(count(s, "filtered", "identical_completions"), 1);
    assert_eq!(s["interactions"], 1);
    let issue = &s["issues"][0];
    assert_eq!(
        (issue["line"].as_u64(), issue["field"].as_str()),
        (Some(2), Some("rejected"))
    );
    let err = prepare(&cfg, &opts(512, 42, true)).unwrap_err();
    assert!(
        format!("{err:#}").contains("constructed.jsonl:2: field `rejected`"),
        "{err:#}"
    );
}

// ---------------------------------------------------------------- OpenAssistant

#[test]
fn oasst_sample_messages() {
    let cfg = config(vec![source(SourceKind::Oasst, &[repo(OASST)])]);
    let p = run(&cfg, 8192);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 1029);
    // The two messages whose parent row is absent (9caf0013..., e8d20b31...).
    assert_eq!(count(s, "filtered", "missing_parent"), 2);
    assert_eq!(count(s, "filtered", "deleted"), 21);
    assert_eq!(count(s, "filtered", "review_result"), 23);
    assert_eq!(count(s, "filtered", "ancestor_skipped"), 0);
    // One sibling pair with identical texts is not a preference.
    assert_eq!(count(s, "filtered", "identical_completions"), 1);
    assert!(s["skipped"].as_object().unwrap().is_empty());
    assert_eq!(s["interactions"], 213);
    assert_eq!(s["pairs"], 531);
    assert_eq!(s["examples"], 1062);

    // The first tree's root: three ranked replies -> 3 pairs.
    let prompt = "\n\nHuman: What do you think about ChatGPT?\n\nAssistant:";
    let ex: Vec<KtoExample> = all(&p)
        .into_iter()
        .filter(|e| dec(&e.prompt_ids) == prompt)
        .collect();
    assert_eq!(ex.len(), 6);
    let texts = |label: bool| {
        let mut v: Vec<String> = ex
            .iter()
            .filter(|e| e.label == label)
            .map(|e| dec(&e.completion_ids))
            .collect();
        v.sort();
        v
    };
    let d = texts(true);
    let u = texts(false);
    assert!(d[0].starts_with(
        " As an open source alternative to ChatGPT, I do not have personal opinions."
    ));
    assert!(d[1].starts_with(" As an open source alternative"));
    assert!(d[2].starts_with(" ChatGPT is an artificial intelligence chatbot"));
    assert!(u[0].starts_with(" ChatGPT is an artificial intelligence chatbot"));
    assert!(u[1].starts_with(" ChatGPT was the inspiration for my creation"));
    assert!(u[2].starts_with(" ChatGPT was the inspiration for my creation"));
    assert!(d.iter().chain(&u).all(|t| t.ends_with("<|endoftext|>")));
    // Each stated comparison (better, worse) is numbered once: pair k has exactly one desirable
    // and one undesirable side, better ranked first; the middle reply is a side of two.
    let side = |k: u32, label: bool| {
        let v: Vec<String> = ex
            .iter()
            .filter(|e| e.pair == Some(k) && e.label == label)
            .map(|e| dec(&e.completion_ids))
            .collect();
        assert_eq!(v.len(), 1, "pair {k} label {label}");
        v[0].clone()
    };
    for k in 0..3 {
        assert_ne!(side(k, true), side(k, false));
    }
    assert_eq!(
        side(0, true),
        side(1, true),
        "the best reply is preferred twice"
    );
    assert_eq!(
        side(0, false),
        side(2, true),
        "the middle reply: worse once, better once"
    );
    assert_eq!(
        side(1, false),
        side(2, false),
        "the worst reply loses twice"
    );

    let mut c = cfg.clone();
    c.sources[0].pairs = Some(OasstPairs::BestVsRest);
    let s = run(&c, 8192).summary_json["sources"][0].clone();
    assert_eq!(
        (s["interactions"].as_u64(), s["pairs"].as_u64()),
        (Some(213), Some(366))
    );
    c.sources[0].pairs = Some(OasstPairs::BestVsWorst);
    let s = run(&c, 8192).summary_json["sources"][0].clone();
    assert_eq!(
        (s["interactions"].as_u64(), s["pairs"].as_u64()),
        (Some(212), Some(212))
    );
    c.sources[0].pairs = None;
    c.sources[0].review_result = Some(ReviewFilter::Any);
    let s = run(&c, 8192).summary_json["sources"][0].clone();
    assert_eq!(count(&s, "filtered", "review_result"), 0);
    assert_eq!(count(&s, "filtered", "missing_parent"), 2);
}

#[test]
fn oasst_conversation_path_and_pyarrow_parquet() {
    // tests/data/oasst1-first3trees.parquet: lines 1-21 of the sample, written by pyarrow (nested
    // struct and list columns, Snappy). 5 prompts with ranked replies: 3 + 1 + 3 + 6 + 3 pairs.
    let cfg = config(vec![source(
        SourceKind::Oasst,
        &[repo("tests/data/oasst1-first3trees.parquet")],
    )]);
    let p = run(&cfg, 8192);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 21);
    assert_eq!(s["interactions"], 5);
    assert_eq!(s["pairs"], 16);
    // The prompter message 73a41883 sits below root e0cf4fa2 and reply 779035e6.
    let ex = all(&p);
    let deep: Vec<&KtoExample> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids).starts_with("\n\nHuman: What do you think about ChatGPT?\n\nAssistant: ChatGPT was the inspiration"))
        .collect();
    assert_eq!(deep.len(), 6);
    let prompt = dec(&deep[0].prompt_ids);
    assert!(prompt.contains("\n\nHuman: Yeah, I hear you, brother! Power to the people!"));
    assert!(prompt.ends_with("\n\nAssistant:"));
    assert_eq!(prompt.matches("\n\nHuman:").count(), 2);
    assert_eq!(prompt.matches("\n\nAssistant:").count(), 2);
}

fn oasst_msg(
    id: &str,
    parent: Option<&str>,
    role: &str,
    text: &str,
    rank: Option<i64>,
    lang: &str,
) -> Value {
    serde_json::json!({"message_id": id, "parent_id": parent, "role": role, "text": text, "rank": rank,
        "lang": lang, "deleted": false, "review_result": true, "message_tree_id": "t"})
}

#[test]
fn oasst_trees_export_matches_flat_rows() {
    // Constructed messages: one tree, in both export layouts.
    let flat = [
        oasst_msg("r", None, "prompter", "Root question", None, "en"),
        oasst_msg("a0", Some("r"), "assistant", "Best answer", Some(0), "en"),
        oasst_msg("a1", Some("r"), "assistant", "Middle answer", Some(1), "en"),
        oasst_msg("a2", Some("r"), "assistant", "Worst answer", Some(2), "en"),
        oasst_msg("p2", Some("a0"), "prompter", "Follow-up", None, "en"),
        oasst_msg(
            "b0",
            Some("p2"),
            "assistant",
            "Good follow-up answer",
            Some(0),
            "en",
        ),
        oasst_msg(
            "b1",
            Some("p2"),
            "assistant",
            "Bad follow-up answer",
            Some(1),
            "en",
        ),
    ];
    let node = |v: &Value, replies: Vec<Value>| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("parent_id");
        v["replies"] = Value::from(replies);
        v
    };
    let tree = serde_json::json!({"message_tree_id": "t", "tree_state": "ready_for_export", "prompt":
    node(&flat[0], vec![
        node(&flat[1], vec![node(&flat[4], vec![node(&flat[5], vec![]), node(&flat[6], vec![])])]),
        node(&flat[2], vec![]),
        node(&flat[3], vec![]),
    ])});
    let flat_text: Vec<String> = flat.iter().map(|v| v.to_string()).collect();
    let (_d, paths) = files(&[
        ("flat.jsonl", &flat_text.join("\n")),
        ("trees.jsonl", &tree.to_string()),
    ]);
    let a = run(&config(vec![source(SourceKind::Oasst, &paths[..1])]), 512);
    let b = run(&config(vec![source(SourceKind::Oasst, &paths[1..])]), 512);
    let key = |p: &PreparedData| {
        let mut v: Vec<(String, String, bool)> = all(p)
            .iter()
            .map(|e| (dec(&e.prompt_ids), dec(&e.completion_ids), e.label))
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&a), key(&b));
    assert_eq!(a.summary_json["sources"][0]["pairs"], 4);
    let k = key(&a);
    assert!(k.contains(&(
        "\n\nHuman: Root question\n\nAssistant: Best answer\n\nHuman: Follow-up\n\nAssistant:"
            .into(),
        " Bad follow-up answer<|endoftext|>".into(),
        false
    )));
}

#[test]
fn oasst_filters_and_orphans() {
    // Constructed messages: a German prompt, a deleted reply with a child, an orphan, a bad rank.
    let mut deleted = oasst_msg(
        "a1",
        Some("r"),
        "assistant",
        "Deleted answer",
        Some(1),
        "en",
    );
    deleted["deleted"] = Value::Bool(true);
    let rows = [
        oasst_msg("r", None, "prompter", "Question", None, "en"),
        oasst_msg("a0", Some("r"), "assistant", "Answer zero", Some(0), "en"),
        deleted,
        oasst_msg(
            "p",
            Some("a1"),
            "prompter",
            "Below the deleted one",
            None,
            "en",
        ),
        oasst_msg("a2", Some("r"), "assistant", "Answer two", Some(2), "en"),
        oasst_msg("o", Some("nowhere"), "assistant", "Orphan", Some(0), "en"),
        oasst_msg("g", None, "prompter", "Frage", None, "de"),
        oasst_msg("g0", Some("g"), "assistant", "Antwort eins", Some(0), "de"),
        oasst_msg("g1", Some("g"), "assistant", "Antwort zwei", Some(1), "de"),
        serde_json::json!({"message_id": "x", "parent_id": "r", "role": "assistant", "text": "t", "rank": "first"}),
    ];
    let text: Vec<String> = rows.iter().map(|v| v.to_string()).collect();
    let (_d, paths) = files(&[("m.jsonl", &text.join("\n"))]);
    let mut src = source(SourceKind::Oasst, &paths);
    let p = run(&config(vec![src.clone()]), 512);
    let s = src_summary(&p, 0);
    assert_eq!(count(s, "filtered", "deleted"), 1);
    assert_eq!(count(s, "filtered", "ancestor_skipped"), 1);
    assert_eq!(count(s, "filtered", "missing_parent"), 1);
    assert_eq!(count(s, "skipped", "wrong_type"), 1);
    assert_eq!(s["issues"][0]["field"], "rank");
    assert_eq!(s["issues"][0]["line"], 10);
    assert_eq!(s["interactions"], 2);
    assert_eq!(s["pairs"], 2);
    src.langs = Some(vec!["de".into()]);
    let p = run(&config(vec![src]), 512);
    let s = src_summary(&p, 0);
    assert_eq!(s["interactions"], 1);
    // r, a0, a2 and p (below the deleted a1: its own filter is counted first).
    assert_eq!(count(s, "filtered", "lang"), 4);
    assert!(all(&p)
        .iter()
        .all(|e| dec(&e.prompt_ids) == "\n\nHuman: Frage\n\nAssistant:"));
}

// ---------------------------------------------------------------- SHP (synthetic rows)

fn shp_row(post: &str, history: &str, a: &str, b: &str, score_a: i64, score_b: i64) -> String {
    let (hi, lo) = (score_a.max(score_b) as f64, score_a.min(score_b) as f64);
    serde_json::json!({
        "post_id": post, "domain": "askculinary_train", "upvote_ratio": 0.95, "history": history,
        "c_root_id_A": format!("{post}_a{score_a}"), "c_root_id_B": format!("{post}_b{score_b}"),
        "created_at_utc_A": 1_600_000_000i64, "created_at_utc_B": 1_600_000_100i64,
        "score_A": score_a, "score_B": score_b, "human_ref_A": a, "human_ref_B": b,
        "labels": i64::from(score_a > score_b), "seconds_difference": 100.0, "score_ratio": hi / lo,
    })
    .to_string()
}

#[test]
fn shp_synthetic_rows() {
    // SYNTHETIC rows following the published SHP schema exactly (no real SHP rows are available).
    let mut rows = vec![
        shp_row(
            "p1",
            "How do I salt pasta water?",
            "A pinch.",
            "A lot, like the sea.",
            52,
            54,
        ), // B wins, ratio 1.04
        shp_row(
            "p1",
            "How do I salt pasta water?",
            "Generously.",
            "Never salt it.",
            40,
            10,
        ), // A wins, ratio 4
        shp_row(
            "p2",
            "Cast iron care?",
            "Oil it after washing.",
            "Dishwasher is fine.",
            30,
            3,
        ), // ratio 10
    ];
    for i in 0..7 {
        // Post p3 has 7 pairs with ratios 2..8; the 5 highest are kept.
        rows.push(shp_row(
            "p3",
            "Best knife?",
            &format!("Chef knife {i}"),
            &format!("Bread knife {i}"),
            2 + i,
            1,
        ));
    }
    let (_d, paths) = files(&[("train.json", &rows.join("\n"))]);
    let p = run(&config(vec![source(SourceKind::Shp, &paths)]), 512);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 10);
    assert_eq!(count(s, "filtered", "score_ratio_below_min"), 1);
    assert_eq!(count(s, "filtered", "over_max_pairs_per_post"), 2);
    assert_eq!(s["interactions"], 3);
    assert_eq!(s["pairs"], 7);
    let ex = all(&p);
    let p1: Vec<&KtoExample> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids) == "\n\nHuman: How do I salt pasta water?\n\nAssistant:")
        .collect();
    assert_eq!(p1.len(), 2);
    assert_eq!(
        dec(&p1.iter().find(|e| e.label).unwrap().completion_ids),
        " Generously.<|endoftext|>"
    );
    assert_eq!(
        dec(&p1.iter().find(|e| !e.label).unwrap().completion_ids),
        " Never salt it.<|endoftext|>"
    );
    let p3: HashSet<String> = ex
        .iter()
        .filter(|e| e.label)
        .map(|e| dec(&e.completion_ids))
        .filter(|t| t.contains("Chef"))
        .collect();
    let want: HashSet<String> = (2..7)
        .map(|i| format!(" Chef knife {i}<|endoftext|>"))
        .collect();
    assert_eq!(p3, want, "the 5 pairs with the highest score ratio");
    // All of one post's examples share one interaction.
    let ids: HashSet<u64> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids).contains("Best knife?"))
        .map(|e| e.interaction)
        .collect();
    assert_eq!(ids.len(), 1);
    // Its 5 kept comparisons are numbered 0..5, each with one side of each label.
    let mut p3_pairs: Vec<(u32, bool)> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids).contains("Best knife?"))
        .map(|e| (e.pair.unwrap(), e.label))
        .collect();
    p3_pairs.sort();
    let want: Vec<(u32, bool)> = (0..5).flat_map(|k| [(k, false), (k, true)]).collect();
    assert_eq!(p3_pairs, want);

    let mut src = source(SourceKind::Shp, &paths);
    src.min_score_ratio = Some(0.0);
    src.max_pairs_per_post = Some(100);
    let s = run(&config(vec![src]), 512).summary_json["sources"][0].clone();
    assert_eq!(s["pairs"], 10);
}

// ---------------------------------------------------------------- generic TRL formats

#[test]
fn generic_preference_and_unpaired_records() {
    let pref = [
        // standard: explicit prompt
        serde_json::json!({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}),
        // conversational, explicit prompt
        serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "What?"}]}),
        // conversational, implicit prompt
        serde_json::json!({"chosen": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Green."}]}),
        // same prompt as the first: joins its interaction
        serde_json::json!({"prompt": "2+2=", "chosen": " four", "rejected": " fish"}),
        // bad: a number where a text belongs
        serde_json::json!({"prompt": "x", "chosen": 3, "rejected": "y"}),
        // bad: an empty prompt
        serde_json::json!({"prompt": "  ", "chosen": " a", "rejected": " b"}),
    ];
    let unpaired = [
        serde_json::json!({"prompt": "Capital of France?", "completion": " Paris", "label": true}),
        serde_json::json!({"prompt": "Capital of France?", "completion": " Rome", "label": false}),
        serde_json::json!({"prompt": "Capital of Spain?", "completion": " Madrid", "label": true}),
        // bad: an empty prompt
        serde_json::json!({"prompt": "", "completion": " Lisbon", "label": true}),
    ];
    let pref_json = Value::from(pref.to_vec()).to_string(); // a .json array file
    let unp: Vec<String> = unpaired.iter().map(|v| v.to_string()).collect();
    let (_d, paths) = files(&[
        ("pref.json", &pref_json),
        ("unpaired.jsonl", &unp.join("\n")),
    ]);
    let mut a = source(SourceKind::Preference, &paths[..1]);
    a.name = Some("pref".into());
    let b = source(SourceKind::Unpaired, &paths[1..]);
    let mut cfg = config(vec![a, b]);
    cfg.validation_fraction = 0.0;
    let p = run(&cfg, 512);
    let s0 = src_summary(&p, 0);
    assert_eq!(
        (
            s0["interactions"].as_u64(),
            s0["pairs"].as_u64(),
            s0["examples"].as_u64()
        ),
        (Some(3), Some(4), Some(8))
    );
    // In a JSON array the location is the record number.
    assert_eq!(s0["issues"][0]["line"], 5);
    assert_eq!(s0["issues"][0]["unit"], "record");
    assert_eq!(s0["issues"][0]["field"], "chosen");
    assert_eq!(
        (
            &s0["issues"][1]["line"],
            &s0["issues"][1]["field"],
            &s0["issues"][1]["reason"]
        ),
        (
            &Value::from(6),
            &Value::from("prompt"),
            &Value::from("empty_prompt")
        )
    );
    assert!(
        p.summary_text
            .contains("pref.json (record 5): field `chosen`"),
        "{}",
        p.summary_text
    );
    let s1 = src_summary(&p, 1);
    assert_eq!(
        (
            s1["interactions"].as_u64(),
            s1["pairs"].as_u64(),
            s1["examples"].as_u64()
        ),
        (Some(2), Some(0), Some(3))
    );
    assert_eq!(
        (
            &s1["issues"][0]["line"],
            &s1["issues"][0]["field"],
            &s1["issues"][0]["reason"]
        ),
        (
            &Value::from(4),
            &Value::from("prompt"),
            &Value::from("empty_prompt")
        )
    );
    let texts: HashSet<(String, String, bool)> = all(&p)
        .iter()
        .map(|e| (dec(&e.prompt_ids), dec(&e.completion_ids), e.label))
        .collect();
    for want in [
        ("2+2=", " 4<|endoftext|>", true),
        ("2+2=", " fish<|endoftext|>", false),
        ("\n\nHuman: Hi\n\nAssistant:", " What?<|endoftext|>", false),
        (
            "\n\nHuman: Sky colour?\n\nAssistant:",
            " Blue.<|endoftext|>",
            true,
        ),
        ("Capital of France?", " Rome<|endoftext|>", false),
    ] {
        assert!(
            texts.contains(&(want.0.into(), want.1.into(), want.2)),
            "{want:?}"
        );
    }
    let ex = all(&p);
    let france: HashSet<u64> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids) == "Capital of France?")
        .map(|e| e.interaction)
        .collect();
    assert_eq!(france.len(), 1);
    assert!(ex.iter().filter(|e| e.source == "unpaired").count() == 3);
    assert!(ex.iter().filter(|e| e.source == "pref").count() == 8);
    // Two records of one prompt keep their own comparisons: " 4" > " 5" is pair 0, the later
    // " four" > " fish" pair 1 (never " 4" against " fish"); unpaired records have none.
    let pairs: HashSet<(String, bool, Option<u32>)> = ex
        .iter()
        .filter(|e| dec(&e.prompt_ids) == "2+2=")
        .map(|e| (dec(&e.completion_ids), e.label, e.pair))
        .collect();
    let want: HashSet<(String, bool, Option<u32>)> = [
        (" 4", true, 0),
        (" 5", false, 0),
        (" four", true, 1),
        (" fish", false, 1),
    ]
    .into_iter()
    .map(|(t, l, k)| (format!("{t}<|endoftext|>"), l, Some(k)))
    .collect();
    assert_eq!(pairs, want);
    assert!(ex
        .iter()
        .filter(|e| e.source == "unpaired")
        .all(|e| e.pair.is_none()));
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_reported_counted_and_skipped() {
    let good = hh_line(
        "\n\nHuman: A\n\nAssistant: yes",
        "\n\nHuman: A\n\nAssistant: no",
    );
    let lines = [
        good.clone(),                                                               // 1
        "{\"chosen\": \"\\n\\nHuman: broken".to_string(),                           // 2 malformed
        r#"{"chosen": "\n\nHuman: B\n\nAssistant: x"}"#.to_string(), // 3 missing rejected
        r#"{"chosen": 7, "rejected": "\n\nHuman: C\n\nAssistant: y"}"#.to_string(), // 4 wrong type
        hh_line(
            "\n\nHuman: D\n\nAssistant:   ",
            "\n\nHuman: D\n\nAssistant:\n",
        ), // 5 both empty
        String::new(),                                               // 6 blank: no record
        "[1, 2]".to_string(),                                        // 7 not an object
        hh_line(
            "\n\nHuman: E\n\nAssistant: good",
            "\n\nHuman: E\n\nAssistant: bad",
        ), // 8
    ];
    let (_d, paths) = files(&[("bad.jsonl", &lines.join("\n"))]);
    let cfg = config(vec![source(SourceKind::HhRlhf, &paths)]);
    let p = run(&cfg, 512);
    let s = src_summary(&p, 0);
    assert_eq!(s["records_read"], 7);
    assert_eq!(count(s, "skipped", "malformed_record"), 2);
    assert_eq!(count(s, "skipped", "missing_field"), 1);
    assert_eq!(count(s, "skipped", "wrong_type"), 1);
    assert_eq!(count(s, "skipped", "empty_completion"), 2);
    assert_eq!(all(&p).len(), 4, "the two good records are kept");
    let issues = issues_of(s);
    let want = [
        (2, "(line)", "malformed_record"),
        (3, "rejected", "missing_field"),
        (4, "chosen", "wrong_type"),
        (5, "chosen", "empty_completion"),
        (5, "rejected", "empty_completion"),
        (7, "(record)", "malformed_record"),
    ];
    let want: Vec<(u64, String, String)> = want
        .iter()
        .map(|(l, f, r)| (*l, f.to_string(), r.to_string()))
        .collect();
    assert_eq!(issues, want);
    assert!(s["issues"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["file"].as_str().unwrap().ends_with("bad.jsonl")));
    assert!(
        p.summary_text
            .contains("bad.jsonl:4: field `chosen`: expected a string, found a number"),
        "{}",
        p.summary_text
    );

    // Strict: the first bad record is an error with file:line and field.
    let err = format!("{:#}", prepare(&cfg, &opts(512, 42, true)).unwrap_err());
    assert!(
        err.contains("bad.jsonl:2: field `(line)`: not valid JSON"),
        "{err}"
    );
}

#[test]
fn missing_file_or_wrong_format_fails_before_any_work() {
    let bad_hh = "{\"chosen\": 1}\n"; // would be an error under strict if it were read
    let (_d, paths) = files(&[
        ("first.jsonl", bad_hh),
        ("gz_named.jsonl.gz", "{\"chosen\": \"x\"}\n"),
        ("array.jsonl", "[{\"a\": 1}]"),
        ("text.parquet", "not parquet"),
        ("data.csv", "a,b\n"),
        ("real_gz.jsonl", ""),
    ]);
    // A gzip file named .jsonl.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(b"{\"chosen\": \"x\"}\n").unwrap();
    std::fs::write(&paths[5], enc.finish().unwrap()).unwrap();
    let missing = paths[0].with_file_name("nope.jsonl");
    let cases: Vec<(PathBuf, &str)> = vec![
        (missing, "does not exist"),
        (paths[1].clone(), "gzip"),
        (paths[2].clone(), "not JSON lines"),
        (paths[3].clone(), "not a Parquet file"),
        (paths[4].clone(), "cannot tell its format"),
        (paths[5].clone(), "looks gzip-compressed"),
    ];
    for (path, want) in cases {
        // The first source has a bad record that strict mode would stop at if it were read first:
        // the file error proves every file is checked before any record is read.
        let cfg = config(vec![
            source(SourceKind::HhRlhf, &paths[..1]),
            source(SourceKind::Unpaired, std::slice::from_ref(&path)),
        ]);
        let err = format!("{:#}", prepare(&cfg, &opts(512, 42, true)).unwrap_err());
        assert!(
            err.contains(want) && err.contains(&path.display().to_string()),
            "{want}: {err}"
        );
    }
    // An explicit format overrides the name.
    let mut s = source(SourceKind::HhRlhf, &paths[5..6]);
    s.format = FileFormat::JsonlGz;
    let err = format!(
        "{:#}",
        prepare(&config(vec![s]), &opts(512, 42, false)).unwrap_err()
    );
    assert!(err.contains("no training example"), "{err}");
    // No sources at all.
    let err = format!(
        "{:#}",
        prepare(&DataConfig::default(), &opts(512, 42, false)).unwrap_err()
    );
    assert!(err.contains("no sources"), "{err}");
}

// ---------------------------------------------------------------- parquet

#[test]
fn parquet_round_trip_matches_jsonl() {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    // The first 40 records of the HH sample, as Parquet (what the Hugging Face hub serves).
    let text = std::fs::read_to_string(repo(HH)).unwrap();
    let recs: Vec<Value> = text
        .lines()
        .take(40)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let pq_path = dir.path().join("train.parquet");
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY chosen (UTF8); REQUIRED BYTE_ARRAY rejected (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(&pq_path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for key in ["chosen", "rejected"] {
        let mut col = rg.next_column().unwrap().unwrap();
        let vals: Vec<ByteArray> = recs
            .iter()
            .map(|r| ByteArray::from(r[key].as_str().unwrap()))
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&vals, None, None)
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    let jsonl_path = dir.path().join("train.jsonl");
    std::fs::write(
        &jsonl_path,
        text.lines().take(40).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let a = run(&config(vec![source(SourceKind::HhRlhf, &[pq_path])]), 4096);
    let b = run(
        &config(vec![source(SourceKind::HhRlhf, &[jsonl_path])]),
        4096,
    );
    assert_eq!(a.train, b.train);
    assert_eq!(a.validation, b.validation);
    assert_eq!(all(&a).len(), 80);
}

// ---------------------------------------------------------------- mix, split, determinism

fn three_sources(cap: Option<usize>) -> DataConfig {
    let mut cfg = config(vec![
        source(SourceKind::HhRlhf, &[repo(HH), repo(HH_GZ)]),
        source(SourceKind::Oasst, &[repo(OASST)]),
        source(SourceKind::Preference, &[repo(HH_GZ)]), // HH's gz file read as TRL implicit-prompt records
    ]);
    cfg.sources[2].name = Some("generic".into());
    cfg.max_interactions_per_source = cap;
    cfg
}

#[test]
fn round_robin_caps_and_runs_out() {
    let cfg = three_sources(Some(150));
    let p = run(&cfg, 8192);
    let mut by_id: Vec<(u64, String)> = all(&p)
        .iter()
        .map(|e| (e.interaction, e.source.clone()))
        .collect();
    by_id.sort();
    by_id.dedup();
    // hh and oasst give 150 each; generic has 100 interactions and runs out.
    let names: Vec<&str> = by_id.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(names.len(), 400);
    for (i, n) in names.iter().take(300).enumerate() {
        assert_eq!(
            *n,
            ["hh-rlhf", "oasst", "generic"][i % 3],
            "interaction {i}"
        );
    }
    assert!(names[300..]
        .iter()
        .enumerate()
        .all(|(i, n)| *n == ["hh-rlhf", "oasst"][i % 2]));
    for (i, want) in [(0, 150), (1, 150), (2, 100)] {
        assert_eq!(src_summary(&p, i)["interactions"], want);
    }
    assert_eq!(src_summary(&p, 0)["interactions_available"], 400);
    // A source's own cap overrides the global one.
    let mut c = cfg.clone();
    c.sources[1].max_interactions = Some(7);
    assert_eq!(run(&c, 8192).summary_json["sources"][1]["interactions"], 7);
}

#[test]
fn same_seed_same_data_other_seed_other_data() {
    let cfg = three_sources(Some(120));
    let a = prepare(&cfg, &opts(8192, 42, false)).unwrap();
    let b = prepare(&cfg, &opts(8192, 42, false)).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.validation, b.validation);
    assert_eq!(a.summary_json, b.summary_json);
    let c = prepare(&cfg, &opts(8192, 43, false)).unwrap();
    assert_ne!(a.train, c.train);
    let prompts = |p: &PreparedData| {
        p.train
            .iter()
            .map(|e| e.prompt_ids.clone())
            .collect::<HashSet<_>>()
    };
    assert_ne!(
        prompts(&a),
        prompts(&c),
        "another seed picks other capped interactions"
    );
    let val = |p: &PreparedData| {
        p.validation
            .iter()
            .map(|e| e.prompt_ids.clone())
            .collect::<HashSet<_>>()
    };
    assert_ne!(val(&a), val(&c), "and another split");
}

#[test]
fn split_never_splits_an_interaction() {
    let cfg = three_sources(None);
    let p = run(&cfg, 8192);
    let train: HashSet<u64> = p.train.iter().map(|e| e.interaction).collect();
    let val: HashSet<u64> = p.validation.iter().map(|e| e.interaction).collect();
    assert!(train.is_disjoint(&val));
    // Within a source, one prompt is one interaction: no prompt on both sides either.
    let tp: HashSet<(&str, &Vec<u32>)> = p
        .train
        .iter()
        .map(|e| (e.source.as_str(), &e.prompt_ids))
        .collect();
    assert!(p
        .validation
        .iter()
        .all(|e| !tp.contains(&(e.source.as_str(), &e.prompt_ids))));
    // 5% of each source's interactions, rounded: 400 -> 20, 213 -> 11, 100 -> 5.
    for (i, want) in [(0, 20), (1, 11), (2, 5)] {
        assert_eq!(src_summary(&p, i)["validation"]["interactions"], want);
    }
    assert_eq!(val.len(), 36);
    let mut cfg0 = cfg.clone();
    cfg0.validation_fraction = 0.0;
    assert!(run(&cfg0, 8192).validation.is_empty());
}

#[test]
fn epoch_order_mixes_labels_and_prompts() {
    let p = run(&three_sources(None), 8192);
    let ex = &p.train;
    for batch in [2usize, 4, 8] {
        let o = epoch_order(ex, batch, 42, 0);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..ex.len()).collect::<Vec<_>>(), "a permutation");
        assert_eq!(o, epoch_order(ex, batch, 42, 0));
        assert_ne!(o, epoch_order(ex, batch, 42, 1));
        assert_ne!(o, epoch_order(ex, batch, 7, 0));
        let full: Vec<&[usize]> = o.chunks(batch).filter(|c| c.len() == batch).collect();
        let mixed = full
            .iter()
            .filter(|c| c.iter().any(|&i| ex[i].label) && c.iter().any(|&i| !ex[i].label))
            .count();
        let distinct = full
            .iter()
            .filter(|c| {
                c.iter()
                    .map(|&i| ex[i].interaction)
                    .collect::<HashSet<_>>()
                    .len()
                    == batch
            })
            .count();
        // Labels are nearly balanced here, so only the last batches may miss one label.
        assert!(
            mixed + 2 >= full.len(),
            "batch {batch}: {mixed} of {} mixed",
            full.len()
        );
        assert_eq!(distinct, full.len(), "batch {batch}");
    }
    // One interaction only: the constraint cannot hold and the order is still a permutation.
    let one: Vec<KtoExample> = ex
        .iter()
        .take(3)
        .cloned()
        .map(|mut e| {
            e.interaction = 5;
            e
        })
        .collect();
    assert_eq!(epoch_order(&one, 2, 1, 0).len(), 3);
}

// ---------------------------------------------------------------- config, CLI helpers

#[test]
fn data_config_keys_paths_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cfg");
    std::fs::create_dir_all(&sub).unwrap();
    let cfg_path = sub.join("run.toml");
    let text = r#"
[model]
name_or_path = "HuggingFaceTB/SmolLM2-360M"

[data]
max_interactions_per_source = 1130
validation_fraction = 0.05
prompt_format = "chatml"
max_prompt_length = 256

[[data.sources]]
kind = "hh-rlhf"
files = "hh/train.jsonl.gz"

[[data.sources]]
kind = "shp"
files = ["shp/*/train.json"]
min_score_ratio = 2.0

[[data.sources]]
kind = "oasst"
name = "oasst1"
files = ["/abs/oasst.parquet"]
langs = ["en"]
pairs = "best_vs_rest"
"#;
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = Config::load(&cfg_path, &[]).unwrap();
    let d = &cfg.data;
    assert_eq!(d.sources.len(), 3);
    assert_eq!(d.sources[0].files, vec![sub.join("hh/train.jsonl.gz")]);
    assert_eq!(d.sources[1].files, vec![sub.join("shp/*/train.json")]);
    assert_eq!(
        d.sources[2].files,
        vec![PathBuf::from("/abs/oasst.parquet")]
    );
    assert_eq!(d.sources[2].display_name(), "oasst1");
    assert_eq!(d.max_interactions_per_source, Some(1130));
    assert_eq!(DataConfig::default().validation_fraction, 0.05);
    // The run folder keeps the resolved config as TOML: it must read back the same.
    let back = Config::from_toml_str(&cfg.to_toml()).unwrap();
    assert_eq!(back.data, cfg.data);

    let bad = |data: &str| {
        let t = format!("[model]\nname_or_path = \"x\"\n[data]\n{data}");
        format!("{:#}", Config::from_toml_str(&t).unwrap_err())
    };
    assert!(bad("validation_fraction = 1.0").contains("validation_fraction"));
    assert!(bad("shuffle = true").contains("unknown field `shuffle`"));
    assert!(bad("prompt_format = \"alpaca\"").contains("raw"));
    assert!(
        bad("[[data.sources]]\nkind = \"hh-rlhf\"\nfiles = [\"a.jsonl\"]\nlangs = [\"en\"]")
            .contains("langs applies only to kind = \"oasst\"")
    );
    assert!(bad("[[data.sources]]\nkind = \"reddit\"\nfiles = [\"a.jsonl\"]").contains("hh-rlhf"));
    assert!(bad("[[data.sources]]\nkind = \"shp\"\nfiles = []").contains("files is empty"));
    assert!(bad("[[data.sources]]\nkind = \"hh-rlhf\"\nfiles = [\"a\"]\n[[data.sources]]\nkind = \"hh-rlhf\"\nfiles = [\"b\"]")
        .contains("unique"));
    assert!(bad("max_interactions_per_source = 0").contains("max_interactions_per_source"));
}

#[test]
fn shp_files_glob_and_data_command() {
    // SYNTHETIC SHP rows in two subreddit folders, JSON lines under .json names as SHP ships them.
    let dir = tempfile::tempdir().unwrap();
    for (sub, post) in [("askculinary", "c1"), ("askphysics", "p1")] {
        std::fs::create_dir_all(dir.path().join("shp").join(sub)).unwrap();
        let rows = [
            shp_row(post, "Why?", "Because.", "No idea.", 10, 2),
            shp_row(post, "Why?", "Physics.", "Magic.", 9, 3),
        ];
        std::fs::write(
            dir.path().join("shp").join(sub).join("train.json"),
            rows.join("\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("shp").join(sub).join("test.json"),
            rows.join("\n"),
        )
        .unwrap();
    }
    let tok_path = repo("data/samples/smollm2/tokenizer.json");
    let cfg_text = format!(
        "[model]\nname_or_path = \"HuggingFaceTB/SmolLM2-360M\"\ntokenizer = \"{}\"\n[data]\nvalidation_fraction = 0.0\n\
         [[data.sources]]\nkind = \"shp\"\nfiles = [\"shp/*/train.json\"]\n",
        tok_path.display()
    );
    let cfg_path = dir.path().join("run.toml");
    std::fs::write(&cfg_path, cfg_text).unwrap();
    let cfg = Config::load(&cfg_path, &[]).unwrap();
    let out = dir.path().join("out/examples.jsonl");
    kto_train::data::run_data_command(&cfg, Some(&out), false).unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        8,
        "2 posts x 2 pairs x 2 examples, test.json not matched"
    );
    assert!(lines
        .iter()
        .all(|l| l["split"] == "train" && l["prompt"] == "\n\nHuman: Why?\n\nAssistant:"));
    assert!(lines
        .iter()
        .any(|l| l["completion"] == " Physics.<|endoftext|>" && l["label"] == true));
    assert_eq!(
        lines[0]["completion_ids"]
            .as_array()
            .unwrap()
            .last()
            .unwrap(),
        0
    );
    // Summary files for the run folder.
    let info = kto_train::data::resolve_tokenizer(&cfg).unwrap();
    assert_eq!(info.eos_token_id, 0); // no config.json: <|endoftext|>
    let p = run(
        &{
            let mut d = cfg.data.clone();
            d.validation_fraction = 0.0;
            d
        },
        512,
    );
    kto_train::data::write_summary(&dir.path().join("run"), &p).unwrap();
    let j: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/data_summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(j["train"]["examples"], 8);
    assert!(
        std::fs::read_to_string(dir.path().join("run/data_summary.txt"))
            .unwrap()
            .contains("shp")
    );
}

// ---------------------------------------------------------------- fast encoder

#[test]
fn fast_encoder_matches_tokenizers_encode() {
    use kto_train::data::fasttok::{FastEncoder, WordCache};
    let enc = FastEncoder::new(tok());
    assert!(
        enc.is_fast(),
        "SmolLM2's byte-level BPE takes the direct path"
    );
    let mut texts: Vec<String> = vec![
        String::new(),
        " ".into(),
        "   ".into(),
        "\n".into(),
        "a  b   c\t\td \n\n e\r\nf \u{a0}g\u{2003} h ".into(),
        "I'm you're they've we'll he'd it's 'tis O'NEIL's  's".into(),
        "x123 4567 89.0 ١٢٣ ² ⅷ 3rd".into(),
        "Ünïcödé façade naïve, 日本語のテキスト, 한국어, emoji 😀👍🏽, combining e\u{301} a\u{308}"
            .into(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".into(),
        "<|im_start|><|im_end|><|endoftext|>text<|im_start|x<|im_end|>".into(),
        "!!! ?? ... -- --- ''' \"\" ’’ “quoted” (parens) [brackets] {braces}".into(),
        "tabs\tand\u{b}vertical\u{c}feeds\u{85}next\u{2028}line".into(),
    ];
    for path in [HH] {
        for line in std::fs::read_to_string(repo(path)).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            texts.push(v["chosen"].as_str().unwrap().to_string());
            texts.push(v["rejected"].as_str().unwrap().to_string());
        }
    }
    for line in std::fs::read_to_string(repo(OASST)).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        texts.push(v["text"].as_str().unwrap().to_string());
    }
    let mut cache = WordCache::default();
    for t in &texts {
        let want = tok().encode(t.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(enc.encode(t, &mut cache).unwrap(), want, "{t:?}");
    }
}

#[test]
fn fast_encoder_falls_back_for_other_tokenizers() {
    use kto_train::data::fasttok::{FastEncoder, WordCache};
    // A tiny word-level tokenizer with a whitespace pre-tokenizer, built from an inline JSON.
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"Lowercase"},
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},"unk_token":"[UNK]"}}"#;
    let t: Tokenizer = json.parse().unwrap();
    let enc = FastEncoder::new(&t);
    assert!(!enc.is_fast());
    assert_eq!(
        enc.encode("Hello big World", &mut WordCache::default())
            .unwrap(),
        vec![1, 0, 2]
    );
}

#[test]
fn example_config_parses() {
    let cfg = Config::load(&repo("configs/data-example.toml"), &[]).unwrap();
    assert_eq!(cfg.data.sources.len(), 3);
    assert_eq!(cfg.data.max_interactions_per_source, Some(1130));
    assert_eq!(
        cfg.data.sources[1].files,
        vec![repo("configs/shp/*/train.json")]
    );
}

#[test]
fn model_folder_gives_tokenizer_eos_and_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        repo("data/samples/smollm2/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    // Instruct-style config: eos_token_id as a list, the first one is used.
    std::fs::write(model.join("config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
    let text = format!(
        "[model]\nname_or_path = \"model\"\n[data]\nprompt_format = \"template\"\n[[data.sources]]\nkind = \"hh-rlhf\"\nfiles = [\"{}\"]\n",
        repo(HH_GZ).display()
    );
    let cfg_path = dir.path().join("run.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = Config::load(&cfg_path, &[]).unwrap();
    let info = kto_train::data::resolve_tokenizer(&cfg).unwrap();
    assert_eq!(info.eos_token_id, 2);
    let out = dir.path().join("ex.jsonl");
    kto_train::data::run_data_command(&cfg, Some(&out), false).unwrap();
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first["prompt"]
        .as_str()
        .unwrap()
        .starts_with("<|im_start|>user\n"));
    assert!(
        first["completion"]
            .as_str()
            .unwrap()
            .ends_with("<|im_end|>\n<|im_end|>"),
        "{first}"
    );
    // A model folder that does not exist (and is no hub id) is named in the error.
    let mut c = cfg.clone();
    c.model.name_or_path = "./no-such-model-folder".into();
    let err = format!(
        "{:#}",
        kto_train::data::run_data_command(&c, None, false).unwrap_err()
    );
    assert!(err.contains("no-such-model-folder"), "{err}");
}

// ------------------------------------------------- TRL's formats: auto, columns, messages records

/// SmolLM2-Instruct's chat template (its tokenizer_config.json / GGUF metadata).
fn smollm2_template_file() -> (tempfile::TempDir, PathBuf) {
    let template =
        std::fs::read_to_string(repo("tests/fixtures/chat-templates/smollm2-instruct.jinja"))
            .unwrap();
    let cfg_json = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"});
    let (d, paths) = files(&[("tokenizer_config.json", &cfg_json.to_string())]);
    (d, paths[0].clone())
}

fn example_with_prompt<'a>(p: &'a PreparedData, prompt_text: &str) -> Vec<&'a KtoExample> {
    p.train
        .iter()
        .chain(&p.validation)
        .filter(|e| dec(&e.prompt_ids) == prompt_text)
        .collect()
}

#[test]
fn auto_format_templates_message_lists_and_keeps_text_raw() {
    // Constructed records in TRL's unpaired format: one as plain text, one as messages.
    let lines = [
        serde_json::json!({"prompt": "2+2=", "completion": " 4", "label": true}),
        serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello!"}], "label": false}),
    ];
    let body: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    let (_d, paths) = files(&[("unpaired.jsonl", &body.join("\n"))]);
    let (_t, template) = smollm2_template_file();
    let mut cfg = config(vec![source(SourceKind::Unpaired, &paths)]);
    cfg.validation_fraction = 0.0;
    assert_eq!(cfg.prompt_format, PromptFormat::Auto, "auto is the default");
    cfg.chat_template = Some(template);
    let p = run(&cfg, 512);
    // Plain text stays as it is.
    let text = example_with_prompt(&p, "2+2=");
    assert_eq!(text.len(), 1);
    assert_eq!(dec(&text[0].completion_ids), " 4<|endoftext|>");
    // The message list goes through the template (transformers renders this prompt as below;
    // tests/chat_templates.rs checks the renderer against it on more conversations).
    let sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    let chat = example_with_prompt(
        &p,
        &format!("{sys}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    );
    assert_eq!(chat.len(), 1);
    assert_eq!(
        dec(&chat[0].completion_ids),
        "Hello!<|im_end|>\n<|endoftext|>"
    );
    assert!(
        p.summary_json["prompt_format"]
            .as_str()
            .unwrap()
            .starts_with("auto (chat template of "),
        "{}",
        p.summary_json["prompt_format"]
    );

    // Without a chat template, message lists fall back to the raw HH-style text.
    cfg.chat_template = None;
    let p = run(&cfg, 512);
    assert_eq!(
        example_with_prompt(&p, "\n\nHuman: Hi\n\nAssistant:").len(),
        1
    );
    assert_eq!(
        p.summary_json["prompt_format"],
        "auto (no chat template: message lists as HH-style raw text)"
    );
}

#[test]
fn columns_rename_fields_and_messages_records_split_at_the_last_reply() {
    // Constructed records with the user's own column names, and `messages` conversations.
    let lines = [
        serde_json::json!({"question": "Capital of France?", "answer": " Paris", "good": true}),
        serde_json::json!({"question": "Capital of France?", "answer": " Rome", "good": false}),
        serde_json::json!({"question": "Capital of Spain?", "good": true}), // 3: no answer
        serde_json::json!({"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "good": false}),
        serde_json::json!({"conversation": [{"role": "user", "content": "Hi"}], "good": true}), // 5: no reply
        serde_json::json!({"question": "Q", "answer": " A", "good": "yes"}), // 6: label not a bool
    ];
    let body: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    let (_d, paths) = files(&[("mine.jsonl", &body.join("\n"))]);
    let mut src = source(SourceKind::Unpaired, &paths);
    src.columns = Some(
        [
            ("prompt", "question"),
            ("completion", "answer"),
            ("label", "good"),
            ("messages", "conversation"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
    );
    let mut cfg = config(vec![src]);
    cfg.validation_fraction = 0.0;
    cfg.prompt_format = PromptFormat::Raw;
    let p = run(&cfg, 512);
    let france = example_with_prompt(&p, "Capital of France?");
    assert_eq!(france.len(), 2);
    assert_eq!(france.iter().filter(|e| e.label).count(), 1);
    let chat = example_with_prompt(&p, "\n\nHuman: Hi\n\nAssistant:");
    assert_eq!(chat.len(), 1);
    assert!(!chat[0].label);
    assert_eq!(dec(&chat[0].completion_ids), " Yo<|endoftext|>");
    let s = src_summary(&p, 0);
    let issues = issues_of(s);
    let want: Vec<(u64, String, String)> = [
        (3, "answer", "missing_field"),
        (5, "conversation", "bad_value"),
        (6, "good", "wrong_type"),
    ]
    .iter()
    .map(|(l, f, r)| (*l, f.to_string(), r.to_string()))
    .collect();
    assert_eq!(issues, want);
}

#[test]
fn columns_are_refused_where_they_do_not_apply() {
    let text = r#"
[model]
name_or_path = "x"
[[data.sources]]
kind = "hh-rlhf"
files = ["a.jsonl"]
columns = { prompt = "q" }
"#;
    let err = format!("{:#}", Config::from_toml_str(text).unwrap_err());
    assert!(
        err.contains("columns applies only to kind = \"preference\" or \"unpaired\""),
        "{err}"
    );
    let text = text
        .replace("hh-rlhf", "unpaired")
        .replace("prompt = ", "promt = ");
    let err = format!("{:#}", Config::from_toml_str(&text).unwrap_err());
    assert!(err.contains("columns: unknown field `promt`"), "{err}");
}

#[test]
fn data_order_options() {
    use kto_train::config::DataOrder;
    use kto_train::data::order::epoch_order_for;
    let p = run(&config(vec![source(SourceKind::HhRlhf, &[repo(HH)])]), 512);
    let ex = &p.train;
    let n = ex.len();
    // sequential: the prepared order, every epoch (TRL's SequentialSampler).
    let seq = epoch_order_for(DataOrder::Sequential, ex, 2, 42, 3);
    assert_eq!(seq, (0..n).collect::<Vec<_>>());
    // shuffled: a seeded permutation, new each epoch, no batch constraints applied.
    let sh = epoch_order_for(DataOrder::Shuffled, ex, 2, 42, 0);
    let mut sorted = sh.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    assert_ne!(sh, seq);
    assert_ne!(sh, epoch_order_for(DataOrder::Shuffled, ex, 2, 42, 1));
    // balanced is the default and the constrained order.
    assert_eq!(
        epoch_order_for(DataOrder::Balanced, ex, 2, 42, 0),
        epoch_order(ex, 2, 42, 0)
    );
    let c = Config::from_toml_str(
        "[model]\nname_or_path = \"x\"\n[train]\ndata_order = \"sequential\"\n",
    )
    .unwrap();
    assert_eq!(c.train.data_order, DataOrder::Sequential);
    assert_eq!(
        kto_train::config::TrainConfig::default().data_order,
        DataOrder::Balanced
    );
}
