//! Chat templates rendered with minijinja equal transformers' `apply_chat_template` on the
//! templates of SmolLM2-Instruct, Llama 3 / 3.1-Instruct and Qwen2 / Qwen2.5-Instruct, and on a template
//! with loop controls and `tojson` (tests/fixtures/chat-templates, made by make_expected.py there).
use kto_train::data::{ChatTemplate, Msg};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-templates")
}

fn conversations() -> Vec<Vec<Msg>> {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    cases
        .as_array()
        .unwrap()
        .iter()
        .map(|conv| {
            conv.as_array()
                .unwrap()
                .iter()
                .map(|m| Msg::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn templates_render_as_transformers_does() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap())
            .unwrap();
    let convs = conversations();
    let mut checked = std::collections::BTreeMap::new();
    for r in expected.as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        let text = std::fs::read_to_string(dir().join(name)).unwrap();
        let t = ChatTemplate::new(
            &text,
            r["bos_token"].as_str().unwrap(),
            r["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let conv = &convs[r["case"].as_u64().unwrap() as usize];
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        let got = t
            .render(conv, gen)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(
            got,
            r["text"].as_str().unwrap(),
            "{name}, case {}, add_generation_prompt {gen}",
            r["case"]
        );
        *checked.entry(name.to_string()).or_insert(0) += 1;
    }
    // Every template of the fixture was rendered on every case, both ways.
    assert_eq!(checked.len(), 6, "{checked:?}");
    assert!(
        checked.values().all(|&n| n == 2 * convs.len()),
        "{checked:?}"
    );
}
