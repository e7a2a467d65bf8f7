//! Index artifacts: ranges of an image known before mounting it (DESIGN §8).
//!
//! [`artifact`] is the document; [`build`] makes a layer's entry from a
//! local copy of its blob (`erofs-fanotify index push`); [`lookup`] finds
//! and checks the artifact at mount time and hands the agent a
//! [`KnownRanges`] list.

pub mod artifact;
pub mod build;
pub mod lookup;

use serde::{Deserialize, Serialize};

/// `-o index=`: whether a mount looks for an index artifact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexMode {
    /// Walk, as without artifacts.
    Off,
    /// Use an artifact when one is found and valid; else walk (default).
    #[default]
    Auto,
    /// Fail the mount when no valid artifact is found.
    Require,
}

impl IndexMode {
    pub fn parse(text: &str) -> Option<IndexMode> {
        match text {
            "off" => Some(IndexMode::Off),
            "auto" => Some(IndexMode::Auto),
            "require" => Some(IndexMode::Require),
            _ => None,
        }
    }
}

/// Metadata ranges of the blob, known from an index artifact, handed to the
/// agent: it fetches them up front in few requests, then walks the (now
/// local) metadata only to check them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownRanges {
    /// Where they come from, for `status`: the artifact's digest (and how it
    /// was found) or `file PATH`.
    pub artifact: String,
    /// Sorted, disjoint, inside the blob (checked by the artifact parser).
    pub ranges: Vec<[u64; 2]>,
    /// The artifact's sha256 per chunk of the blob: every fetched byte is checked against it
    /// (`remote::verified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<KnownChunks>,
}

/// `chunkSize` and `chunkSha256` of a layer's index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownChunks {
    pub size: u64,
    /// Lowercase hex, one per chunk (the last may be short).
    pub sha256: Vec<String>,
}
