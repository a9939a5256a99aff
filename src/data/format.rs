//! Prompts and completions as the sources give them, and their rendering into model text.
use crate::config::PromptFormat;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

pub const HUMAN: &str = "\n\nHuman:";
pub const ASSISTANT: &str = "\n\nAssistant:";

/// One chat message with a normalized role (`system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Msg {
    pub role: String,
    pub content: String,
}

impl Msg {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// Text in the shape its source has it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Turns {
    /// Plain text (TRL's standard format; as-is in `raw`, one user/assistant message otherwise).
    Text(String),
    /// An HH-RLHF dialogue ending in `\n\nAssistant:`; parsed into messages for chat formats.
    Dialogue(String),
    /// A conversation.
    Messages(Vec<Msg>),
}

impl Turns {
    fn to_messages(&self, text_role: &str) -> Vec<Msg> {
        match self {
            // The whitespace around a plain text is an artifact of its source's markers (HH's
            // completion " reply"), not content.
            Turns::Text(t) => vec![Msg::new(text_role, t.trim())],
            Turns::Dialogue(d) => parse_dialogue(d),
            Turns::Messages(m) => m.clone(),
        }
    }
}

/// Splits an HH-RLHF dialogue into messages; a trailing empty `Assistant:` turn (the generation
/// prompt of a prompt) is left out.
pub fn parse_dialogue(text: &str) -> Vec<Msg> {
    let mut out: Vec<Msg> = Vec::new();
    let mut rest = text;
    let mut role: Option<&str> = None;
    let mut preamble = String::new();
    loop {
        let h = rest.find(HUMAN);
        let a = rest.find(ASSISTANT);
        let (pos, next_role, len) = match (h, a) {
            (Some(h), Some(a)) if h < a => (h, "user", HUMAN.len()),
            (Some(h), None) => (h, "user", HUMAN.len()),
            (_, Some(a)) => (a, "assistant", ASSISTANT.len()),
            (None, None) => (rest.len(), "", 0),
        };
        let chunk = &rest[..pos];
        match role {
            Some(r) => out.push(Msg::new(r, chunk.trim())),
            None => preamble.push_str(chunk),
        }
        if len == 0 {
            break;
        }
        role = Some(next_role);
        rest = &rest[pos + len..];
    }
    if !preamble.trim().is_empty() {
        out.insert(0, Msg::new("system", preamble.trim()));
    }
    if matches!(out.last(), Some(m) if m.role == "assistant" && m.content.is_empty()) {
        out.pop();
    }
    out
}

/// HH-RLHF-style text of a conversation prompt, as HALOs (the KTO authors' code) renders SHP and
/// OpenAssistant: `\n\nHuman: ...\n\nAssistant: ...` ending in `\n\nAssistant:`.
fn hh_prompt(msgs: &[Msg]) -> String {
    let mut s = String::new();
    for m in msgs {
        match m.role.as_str() {
            "system" => s.push_str(&m.content),
            "assistant" => {
                s.push_str(ASSISTANT);
                s.push(' ');
                s.push_str(&m.content);
            }
            _ => {
                s.push_str(HUMAN);
                s.push(' ');
                s.push_str(&m.content);
            }
        }
    }
    s.push_str(ASSISTANT);
    s
}

/// The completion after [`hh_prompt`]: the reply with its leading space, further turns marked.
fn hh_completion(msgs: &[Msg]) -> String {
    let mut s = String::new();
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            s.push_str(if m.role == "assistant" {
                ASSISTANT
            } else {
                HUMAN
            });
        }
        s.push(' ');
        s.push_str(&m.content);
    }
    s
}

/// A model's Jinja chat template (Hugging Face `chat_template`), rendered with minijinja.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// From a tokenizer_config.json (its `chat_template`, a string or a list of named templates)
    /// or from a .jinja file holding the template itself.
    pub fn from_file(path: &Path, eos_fallback: &str) -> Result<ChatTemplate> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read chat template {}", path.display()))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if !is_json {
            return Self::new(&text, "", eos_fallback)
                .with_context(|| format!("chat template {}", path.display()));
        }
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| anyhow!("{}: chat_template list has no template", path.display()))?
                .to_string(),
            _ => bail!(
                "{} has no `chat_template`; use prompt_format = \"chatml\" or \"raw\", or point \
                 data.chat_template at a file that has one",
                path.display()
            ),
        };
        let token = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos = token("bos_token").unwrap_or_default();
        let eos = token("eos_token").unwrap_or_else(|| eos_fallback.to_string());
        Self::new(&template, &bos, &eos)
            .with_context(|| format!("chat template in {}", path.display()))
    }

    pub fn new(template: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        // HF templates are written for Python's Jinja2: trim_blocks/lstrip_blocks as transformers
        // sets them, and the Python string methods they commonly call.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(py_methods);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", py_tojson);
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| anyhow!("invalid Jinja template: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    pub fn render(&self, msgs: &[Msg], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<minijinja::Value> = msgs
            .iter()
            .map(|m| {
                minijinja::context! { role => m.role.clone(), content => m.content.clone() }
            })
            .collect();
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| anyhow!("chat template: {e}"))
    }
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, whose
/// separators (`", "`, `": "`) and unescaped `<`, `>`, `&`, `'` differ from minijinja's own
/// filter (which escapes for HTML).
fn py_tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(out)
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value;
    let (open, close, items): (char, char, Vec<(Option<&String>, &Value)>) = match v {
        Value::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        Value::Object(m) => ('{', '}', m.iter().map(|(k, x)| (Some(k), x)).collect()),
        scalar => {
            out.push_str(&scalar.to_string());
            return;
        }
    };
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    for (i, (key, x)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        if let Some(k) = key {
            out.push_str(&Value::String(k.clone()).to_string());
            out.push_str(": ");
        }
        python_json(x, indent, depth + 1, out);
    }
    newline(out, depth);
    out.push(close);
}

/// The few Python `str`/`dict` methods chat templates call (`.strip()`, `.startswith(..)`, ...),
/// which minijinja does not know.
fn py_methods(
    _state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, minijinja::Error> {
    use minijinja::{Error, ErrorKind, Value};
    let arg_str =
        |i: usize| -> Option<String> { args.get(i).and_then(|a| a.as_str()).map(str::to_string) };
    if let Some(s) = value.as_str() {
        let chars = arg_str(0);
        let v = match (method, chars) {
            ("strip", None) => Value::from(s.trim()),
            ("lstrip", None) => Value::from(s.trim_start()),
            ("rstrip", None) => Value::from(s.trim_end()),
            ("strip", Some(c)) => Value::from(s.trim_matches(|x| c.contains(x))),
            ("lstrip", Some(c)) => Value::from(s.trim_start_matches(|x| c.contains(x))),
            ("rstrip", Some(c)) => Value::from(s.trim_end_matches(|x| c.contains(x))),
            ("startswith", Some(p)) => Value::from(s.starts_with(p.as_str())),
            ("endswith", Some(p)) => Value::from(s.ends_with(p.as_str())),
            ("lower", None) => Value::from(s.to_lowercase()),
            ("upper", None) => Value::from(s.to_uppercase()),
            ("split", None) => {
                Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>())
            }
            ("split", Some(p)) => {
                Value::from(s.split(p.as_str()).map(Value::from).collect::<Vec<_>>())
            }
            ("replace", Some(a)) => match arg_str(1) {
                Some(b) => Value::from(s.replace(a.as_str(), &b)),
                None => return Err(Error::new(ErrorKind::MissingArgument, "replace(old, new)")),
            },
            _ => {
                return Err(Error::new(
                    ErrorKind::UnknownMethod,
                    format!("str.{method}"),
                ))
            }
        };
        return Ok(v);
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        match method {
            "get" => {
                let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
                let v = value.get_item(&key).unwrap_or(Value::UNDEFINED);
                return Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                });
            }
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                return Ok(Value::from(out));
            }
            "keys" => return Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            _ => {}
        }
    }
    Err(Error::new(ErrorKind::UnknownMethod, method.to_string()))
}

/// Renders prompts and completions for one `prompt_format`.
pub struct Renderer {
    pub format: PromptFormat,
    pub template: Option<std::sync::Arc<ChatTemplate>>,
}

/// A prompt rendered once per interaction, reused for each of its completions.
pub struct RenderedPrompt {
    pub text: String,
    /// The prompt's messages when it went through the chat template (empty otherwise).
    msgs: Vec<Msg>,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

fn chatml(msgs: &[Msg], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in msgs {
        s.push_str(IM_START);
        s.push_str(&m.role);
        s.push('\n');
        s.push_str(&m.content);
        s.push_str(IM_END);
        s.push('\n');
    }
    if add_generation_prompt {
        s.push_str(IM_START);
        s.push_str("assistant\n");
    }
    s
}

impl Renderer {
    /// The format a prompt is rendered in: `auto` resolves per prompt, as TRL does (message lists
    /// through the chat template when there is one; plain text as it is).
    fn format_for(&self, prompt: &Turns) -> PromptFormat {
        match (self.format, prompt, &self.template) {
            (PromptFormat::Auto, Turns::Messages(_), Some(_)) => PromptFormat::Template,
            (PromptFormat::Auto, _, _) => PromptFormat::Raw,
            (f, _, _) => f,
        }
    }

    pub fn prompt(&self, prompt: &Turns) -> Result<RenderedPrompt> {
        match self.format_for(prompt) {
            PromptFormat::Raw | PromptFormat::Auto => Ok(RenderedPrompt {
                text: match prompt {
                    Turns::Text(t) | Turns::Dialogue(t) => t.clone(),
                    Turns::Messages(m) => hh_prompt(m),
                },
                msgs: Vec::new(),
            }),
            PromptFormat::Chatml => {
                let msgs = prompt.to_messages("user");
                Ok(RenderedPrompt {
                    text: chatml(&msgs, true),
                    msgs,
                })
            }
            PromptFormat::Template => {
                let msgs = prompt.to_messages("user");
                let t = self
                    .template
                    .as_ref()
                    .expect("template loaded for this format");
                Ok(RenderedPrompt {
                    text: t.render(&msgs, true)?,
                    msgs,
                })
            }
        }
    }

    /// The completion text as it follows `prompt` (TRL: the rendered prompt + completion
    /// conversation minus the rendered prompt with its generation prompt).
    pub fn completion(&self, prompt: &RenderedPrompt, completion: &Turns) -> Result<String> {
        let format = match self.format {
            PromptFormat::Auto if prompt.msgs.is_empty() => PromptFormat::Raw,
            PromptFormat::Auto => PromptFormat::Template,
            f => f,
        };
        match format {
            PromptFormat::Raw | PromptFormat::Auto => Ok(match completion {
                Turns::Text(t) | Turns::Dialogue(t) => t.clone(),
                Turns::Messages(m) => hh_completion(m),
            }),
            PromptFormat::Chatml => {
                // ChatML is additive: the generation prompt is exactly what the assistant turn
                // starts with, so the completion is the rest of that turn.
                let cm = completion.to_messages("assistant");
                let full = chatml(&cm, false);
                let gen = format!("{IM_START}assistant\n");
                Ok(match full.strip_prefix(&gen) {
                    Some(rest) => rest.to_string(),
                    None => full,
                })
            }
            PromptFormat::Template => {
                let t = self
                    .template
                    .as_ref()
                    .expect("template loaded for this format");
                let mut all = prompt.msgs.clone();
                all.extend(completion.to_messages("assistant"));
                let full = t.render(&all, false)?;
                full.strip_prefix(&prompt.text)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        anyhow!(
                            "the chat template does not render the prompt (with its generation \
                             prompt) as a prefix of prompt + completion"
                        )
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialogue_parse() {
        let m = parse_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:");
        assert_eq!(
            m,
            vec![
                Msg::new("user", "hi"),
                Msg::new("assistant", "hello"),
                Msg::new("user", "bye")
            ]
        );
    }

    #[test]
    fn hh_style_roundtrip() {
        let msgs = vec![
            Msg::new("user", "Q?"),
            Msg::new("assistant", "A."),
            Msg::new("user", "Q2"),
        ];
        assert_eq!(
            hh_prompt(&msgs),
            "\n\nHuman: Q?\n\nAssistant: A.\n\nHuman: Q2\n\nAssistant:"
        );
        assert_eq!(parse_dialogue(&hh_prompt(&msgs)), msgs);
        assert_eq!(hh_completion(&[Msg::new("assistant", "R")]), " R");
    }

    #[test]
    fn chatml_completion() {
        let r = Renderer {
            format: PromptFormat::Chatml,
            template: None,
        };
        let p = r
            .prompt(&Turns::Dialogue("\n\nHuman: hi\n\nAssistant:".into()))
            .unwrap();
        assert_eq!(
            p.text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let c = r.completion(&p, &Turns::Text(" hello".into())).unwrap();
        assert_eq!(c, "hello<|im_end|>\n");
    }

    #[test]
    fn template_matches_chatml() {
        // SmolLM2-Instruct's chat template (tokenizer_config.json), default system prompt removed.
        let t = ChatTemplate::new(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            "",
            "<|im_end|>",
        )
        .unwrap();
        let r = Renderer {
            format: PromptFormat::Template,
            template: Some(std::sync::Arc::new(t)),
        };
        let c = Renderer {
            format: PromptFormat::Chatml,
            template: None,
        };
        let prompt = Turns::Messages(vec![
            Msg::new("user", "a"),
            Msg::new("assistant", "b"),
            Msg::new("user", "c"),
        ]);
        let (pt, pc) = (r.prompt(&prompt).unwrap(), c.prompt(&prompt).unwrap());
        assert_eq!(pt.text, pc.text);
        let comp = Turns::Text("d".into());
        assert_eq!(
            r.completion(&pt, &comp).unwrap(),
            c.completion(&pc, &comp).unwrap()
        );
    }

    #[test]
    fn python_string_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'].strip() }}|{% if m.content.strip().startswith('x') %}yes{% endif %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Msg::new("user", "  xy ")], false).unwrap(),
            "xy|yes"
        );
    }
}
