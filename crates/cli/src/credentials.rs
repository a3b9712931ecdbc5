//! Where `flo login` keeps tokens: one per API URL, in
//! `$FLOTILLA_CONFIG_DIR/credentials.json` (default
//! `$XDG_CONFIG_HOME/flotilla`, else `~/.config/flotilla`), readable only by
//! its owner.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use crate::CliError;

fn directory() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOTILLA_CONFIG_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("flotilla"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config").join("flotilla"))
}

fn path() -> Result<PathBuf, CliError> {
    directory()
        .map(|dir| dir.join("credentials.json"))
        .ok_or_else(|| CliError::Failed("no home directory: set FLOTILLA_CONFIG_DIR".to_owned()))
}

fn read_all() -> BTreeMap<String, String> {
    let Ok(path) = path() else { return BTreeMap::new() };
    std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

fn write_all(tokens: &BTreeMap<String, String>) -> Result<PathBuf, CliError> {
    let path = path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_vec_pretty(tokens).map_err(|e| CliError::Failed(e.to_string()))?;
    // Written aside and renamed: a crash never leaves half a file.
    let partial = path.with_extension("json.partial");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

fn key(api: &str) -> String {
    api.trim_end_matches('/').to_owned()
}

/// The token saved for `api`.
pub fn load(api: &str) -> Option<String> {
    read_all().remove(&key(api))
}

/// Saves `token` for `api`; returns the file.
pub fn save(api: &str, token: &str) -> Result<PathBuf, CliError> {
    let mut tokens = read_all();
    tokens.insert(key(api), token.to_owned());
    write_all(&tokens)
}

/// Forgets the token of `api`; whether there was one.
pub fn remove(api: &str) -> Result<bool, CliError> {
    let mut tokens = read_all();
    let had = tokens.remove(&key(api)).is_some();
    if had {
        write_all(&tokens)?;
    }
    Ok(had)
}
