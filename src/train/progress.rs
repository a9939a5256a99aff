//! What a run shows while it goes: a progress bar on a terminal, plain lines otherwise (pipelines,
//! CI logs), nothing but warnings with `--quiet`.

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(total: usize, done: usize, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
            b.set_position(done as u64);
            b
        });
        Self { bar, quiet }
    }

    pub(crate) fn update(&self, step: usize, total: usize, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg.to_string());
            }
            None if !self.quiet => eprintln!("step {step}/{total}: {msg}"),
            None => {}
        }
    }

    pub(crate) fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }

    /// Printed even with --quiet.
    pub(crate) fn warn(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
