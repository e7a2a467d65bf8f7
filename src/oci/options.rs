//! The registry source's own options (the `oci.*` mount options of
//! erofs-utils' `mount.erofs`, plus mirrors and a CA file). Parsed by the
//! mount option parser, consumed here: registry code never sees the other
//! mount options.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Carried verbatim from `-o oci.*`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OciOptions {
    pub blob: Option<String>,
    pub layer: Option<u32>,
    pub platform: Option<String>,
    pub username: Option<String>,
    #[serde(skip_serializing)]
    pub password: Option<String>,
    pub insecure: bool,
    /// `oci.mirror=URL`, repeatable: tried in order before the registry.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// `oci.cafile=PATH`: extra CA certificates (PEM) beside the system roots.
    #[serde(default)]
    pub cafile: Option<PathBuf>,
}

// The password never reaches a log line.
impl std::fmt::Debug for OciOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciOptions")
            .field("blob", &self.blob)
            .field("layer", &self.layer)
            .field("platform", &self.platform)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("insecure", &self.insecure)
            .field("mirrors", &self.mirrors.len())
            .field("cafile", &self.cafile)
            .finish()
    }
}

