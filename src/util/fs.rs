//! File-system checks whose messages say what actually went wrong: "does not exist" only when it
//! does not, and the system's reason otherwise (a symlink loop, a permission).

/// Whether `path` exists: Ok(false) only when it does not; an error for anything else that makes
/// it unreadable (a symlink loop, a folder without permission), naming `what` and the path.
pub(crate) fn exists(path: &std::path::Path, what: &str) -> anyhow::Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow::anyhow!(
            "cannot access {what} {}: {e}",
            path.display()
        )),
    }
}
