//! What an image reference last resolved to: `<cache_dir>/.refs/<hash>.json`.
//!
//! A mount of a reference asks the registry which blob it names. When the registry cannot be
//! reached, a front end may mount the blob that reference resolved to last time, from the cache
//! (offline). The file lives in the cache dir, so it survives a reboot like the entries it points
//! to; its name starts with '.', so entry listings and `cache prune` never take it for an entry.
//! The resolution is opaque here (the front end's source description, credential-free).

use serde::{Deserialize, Serialize};

use crate::{CacheDir, StateError};

const REFS_DIR: &str = ".refs";
const MAX_BYTES: u64 = 1 << 20;

/// One reference's last resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedRef {
    /// The reference as the user gave it (credential-free).
    pub reference: String,
    /// The blob it resolved to.
    pub digest: String,
    pub resolved_unix: u64,
    /// The front end's source description (without credentials).
    pub source: serde_json::Value,
}

/// The file name for `lookup_key` (any text: the reference plus what selects the blob).
fn file_name(lookup_key: &str) -> String {
    use sha2::Digest;
    format!("{}.json", hex::encode(&sha2::Sha256::digest(lookup_key.as_bytes())[..16]))
}

/// Stores `resolved` under `lookup_key` (atomically, 0600; `.refs/` is made 0700).
pub fn write_resolved_ref(cache: &CacheDir, lookup_key: &str, resolved: &ResolvedRef) -> Result<(), StateError> {
    let root = cache
        .root_dir(true)?
        .ok_or_else(|| StateError::io("create directory", cache.root(), std::io::ErrorKind::NotFound.into()))?;
    let dir = root
        .subdir(REFS_DIR, true, true)?
        .ok_or_else(|| StateError::io("create directory", root.join(REFS_DIR), std::io::ErrorKind::NotFound.into()))?;
    let name = file_name(lookup_key);
    let json = serde_json::to_vec_pretty(resolved)
        .map_err(|e| StateError::Serialize { path: dir.join(&name), reason: e.to_string() })?;
    dir.write_atomic(&name, &json, 0o600)
}

/// The last resolution stored under `lookup_key`; `Ok(None)` if there is none.
pub fn read_resolved_ref(cache: &CacheDir, lookup_key: &str) -> Result<Option<ResolvedRef>, StateError> {
    let Some(root) = cache.root_dir(false)? else { return Ok(None) };
    let Some(dir) = root.subdir(REFS_DIR, false, false)? else { return Ok(None) };
    let name = file_name(lookup_key);
    let Some(bytes) = dir.read_capped(&name, MAX_BYTES)? else { return Ok(None) };
    let resolved: ResolvedRef =
        serde_json::from_slice(&bytes).map_err(|e| StateError::corrupt(dir.join(&name), e.to_string()))?;
    crate::validate_digest(&resolved.digest)?;
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absent() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(tmp.path().join("cache"));
        assert_eq!(read_resolved_ref(&cache, "r:1").unwrap(), None);
        let r = ResolvedRef {
            reference: "r/x:1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            resolved_unix: 5,
            source: serde_json::json!({"kind": "oci"}),
        };
        write_resolved_ref(&cache, "r:1", &r).unwrap();
        assert_eq!(read_resolved_ref(&cache, "r:1").unwrap(), Some(r));
        assert_eq!(read_resolved_ref(&cache, "r:2").unwrap(), None);
        // Not an entry: hidden from listings.
        assert!(crate::validate_cache_key(REFS_DIR).is_err());
    }
}
