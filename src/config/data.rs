use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Placeholder: the data pipeline (sources, mix, split, tokenization) defines its keys here.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {}

impl DataConfig {
    pub(super) fn resolve_paths(&mut self, _base: &Path) {}

    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
