//! The shape of the source tree, checked by reading it: imports point one way (no module uses a
//! layer above it or a peer beside it), clap stays in the CLI, no function grows past a screen
//! and a half, and src/lib.rs and the README's Layout table list every top-level module.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules by layer: a module may use only modules of lower layers.
const LAYERS: [&[&str]; 9] = [
    &["util", "dist"],
    &["config"],
    &["hub"],
    &["kernels"],
    &["model", "data", "loss"],
    &["train"],
    &["eval", "report"],
    &["recipe"],
    &["cli"],
];

/// Longest function body allowed, in lines (signature to closing brace).
const MAX_FUNCTION_LINES: usize = 120;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (file, top-level module) for every source file below src/ except lib.rs and main.rs.
fn module_files() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(src()).unwrap().to_path_buf();
            let first = rel
                .components()
                .next()?
                .as_os_str()
                .to_string_lossy()
                .into_owned();
            let module = first.trim_end_matches(".rs").to_string();
            (module != "lib" && module != "main").then_some((f, module))
        })
        .collect()
}

/// Code without comments and string contents, so that prose naming a module does not count.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut chars, mut in_str) = (text.chars().peekable(), false);
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                '\n' => out.push('\n'),
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
            out.push('"');
        } else if c == 'r' && chars.peek() == Some(&'#') {
            // r#"..."#: skipped whole.
            let rest: String = chars.clone().take(2).collect();
            if rest == "#\"" {
                chars.next();
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if prev == '"' && c == '#' {
                        break;
                    }
                    prev = c;
                }
                out.push_str("\"\"");
            } else {
                out.push(c);
            }
        } else if c == '\'' {
            // A char literal ('x', '\n', '"') is skipped; a lifetime ('a) is kept.
            let ahead: Vec<char> = chars.clone().take(3).collect();
            match ahead.as_slice() {
                ['\\', ..] => {
                    chars.next();
                    for c in chars.by_ref() {
                        if c == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                }
                [_, '\'', ..] => {
                    chars.next();
                    chars.next();
                    out.push_str("' '");
                }
                _ => out.push(c),
            }
        } else if c == '/' && chars.peek() == Some(&'/') {
            for c in chars.by_ref() {
                if c == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every `crate::<module>` a file names.
fn crate_references(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `kto_crate::` or `mycrate::` are other paths.
            !code[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .filter_map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn imports_point_one_way() {
    let mut violations = Vec::new();
    for (file, module) in module_files() {
        let Some(own) = layer_of(&module) else {
            violations.push(format!(
                "{}: module `{module}` has no layer",
                file.display()
            ));
            continue;
        };
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let mut seen = std::collections::BTreeSet::new();
        for used in crate_references(&code) {
            if used == module || !seen.insert(used.clone()) {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                Some(l) => violations.push(format!(
                    "{}: `{module}` (layer {own}) uses `crate::{used}` (layer {l})",
                    file.display()
                )),
                None => violations.push(format!(
                    "{}: uses `crate::{used}`, which has no layer",
                    file.display()
                )),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn clap_types_live_only_in_the_cli() {
    for (file, module) in module_files() {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        if module != "cli" {
            for needle in ["clap::", "#[arg(", "#[command("] {
                assert!(
                    !code.contains(needle),
                    "{}: `{needle}` outside src/cli",
                    file.display()
                );
            }
        }
    }
}

/// (name, first line, length) of every `fn` with a body in `text`.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(pos) = t.find("fn ") else { continue };
        let head = &t[..pos];
        let is_def = head.split_whitespace().all(|w| {
            [
                "pub",
                "pub(crate)",
                "pub(super)",
                "const",
                "unsafe",
                "async",
                "extern",
            ]
            .contains(&w)
                || w.starts_with("\"")
                || w.starts_with("pub(")
        });
        if !is_def {
            continue;
        }
        let name: String = t[pos + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !started && l.contains(';') && !l.contains('{') {
                break;
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if started && depth == 0 {
                out.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_a_screen_and_a_half() {
    let mut long = Vec::new();
    for (file, _) in module_files() {
        for (name, line, len) in functions(&std::fs::read_to_string(&file).unwrap()) {
            if len > MAX_FUNCTION_LINES {
                long.push(format!("{}:{line} `{name}`: {len} lines", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_counter_counts() {
    let text =
        "pub fn a() {\n    if x { y }\n}\nfn b(x: u8) -> u8;\nfn c() {\n    let s = \"}\";\n}\n";
    assert_eq!(
        functions(text),
        vec![("a".to_string(), 1, 3), ("c".to_string(), 5, 3)]
    );
}

/// Top-level modules: folders and files directly in src/.
fn top_level_modules() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            if p.is_dir() {
                Some(name)
            } else {
                name.strip_suffix(".rs").map(str::to_string)
            }
        })
        .filter(|n| n != "lib" && n != "main")
        .collect();
    names.sort();
    names
}

#[test]
fn lib_rs_and_every_layer_list_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut declared: Vec<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    declared.sort();
    assert_eq!(declared, top_level_modules(), "src/lib.rs `pub mod` lines");
    let mut layered: Vec<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .map(|s| s.to_string())
        .collect();
    layered.sort();
    assert_eq!(layered, top_level_modules(), "LAYERS in this test");
}

#[test]
fn readme_layout_table_matches_the_folders() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("## Layout")
        .nth(1)
        .expect("README has a Layout section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `src/")) {
        let path = line.split('`').nth(1).unwrap().to_string();
        rows.insert(path, line.to_string());
    }
    let mut listed: Vec<String> = rows
        .keys()
        .map(|p| {
            p.trim_start_matches("src/")
                .trim_end_matches('/')
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    listed.sort();
    assert_eq!(listed, top_level_modules(), "README Layout table rows");
    for path in rows.keys() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
        assert!(
            p.exists(),
            "README Layout lists {path}, which does not exist"
        );
        assert_eq!(
            path.ends_with('/'),
            p.is_dir(),
            "{path}: folders end with /"
        );
    }
}
