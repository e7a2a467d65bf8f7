//! `oci::manifest::parse_manifest` (registry answers are untrusted).
#![no_main]
use erofs_fanotify::oci::manifest::{
    parse_manifest, select_layer, select_platform, LayerChoice, Manifest, Platform,
};
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match parse_manifest(TYPES[sel as usize % TYPES.len()], body) {
        Ok(Manifest::Image { layers }) => {
            let _ = select_layer(&layers, &LayerChoice::Only);
            let _ = select_layer(&layers, &LayerChoice::Index(1));
        }
        Ok(Manifest::Index { manifests }) => {
            let p = Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            };
            let _ = select_platform(&manifests, &p);
        }
        Err(_) => {}
    }
});
