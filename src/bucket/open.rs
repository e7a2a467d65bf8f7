//! The agent's side: a bucket image's address space. The image (opened by `agent::sources`) is
//! the segment at 0; the agent reads its record (the probe plus one request for the table), checks
//! it is the one the front end saw, and adds one [`S3Source`] segment per object, all sharing one
//! client (one connection pool, one set of endpoints tried in order, one credential state). No
//! object is asked anything until a reader needs its bytes.

use std::sync::Arc;

use bytes::Bytes;

use crate::http::ClientConfig as HttpConfig;
use crate::remote::s3::location::parse_endpoint;
use crate::remote::s3::{ClientConfig, ObjectInfo, S3Client, S3Source};
use crate::remote::RangeSource;
use crate::segments::{Layout, Segment};

use super::read::{self, ImageBytes};
use super::record::Table;
use super::BucketImageSpec;

/// The layout of a bucket image whose own bytes are `image` (first bytes `probe`).
pub async fn layout(spec: &BucketImageSpec, image: Arc<dyn RangeSource>, probe: &Bytes, image_label: String, http: &HttpConfig) -> Result<Layout, String> {
    let shown = spec.describe();
    let table = read_checked_table(image.as_ref(), probe, &spec.table_sha256).await.map_err(|e| format!("{shown}: {e}"))?;
    let objects = &spec.objects;
    if table.header.bucket != objects.bucket {
        return Err(format!("{shown}: its objects are in bucket {}, not {}", table.header.bucket, objects.bucket));
    }
    let endpoints = objects
        .endpoints
        .iter()
        .map(|e| parse_endpoint(e).map_err(|why| format!("S3 endpoint {e:?}: {why}")))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = ClientConfig {
        bucket: objects.bucket.clone(),
        endpoints,
        region: objects.region.clone(),
        url_style: objects.url_style,
        sig: objects.sig,
        connect_timeout: http.connect_timeout,
        request_timeout: http.request_timeout,
    };
    let client = Arc::new(S3Client::new(&cfg, objects.credentials.clone(), objects.credential_origin.clone()).map_err(|e| e.to_string())?);
    layout_of(&table, image, image_label, &client)
}

/// Reads the table and checks it against the hash the front end pinned.
pub async fn read_checked_table(image: &dyn RangeSource, probe: &[u8], want_sha256: &str) -> Result<Table, String> {
    let img = ImageBytes { source: image, probe, probe_only: false };
    let (sb, locator) = read::locate(&img).await.map_err(|e| e.to_string())?;
    let locator = locator.ok_or("it has no bucket record (trusted.erofs-fanotify.bucket on its root) any more")?;
    if hex::encode(locator.table_sha256) != want_sha256 {
        return Err("its bucket record is not the one read when the mount began".into());
    }
    read::read_table(&img, &sb, &locator).await.map_err(|e| e.to_string())
}

/// The image at 0, then each object at its flat start. Pure apart from the sources it is handed.
pub fn layout_of(table: &Table, image: Arc<dyn RangeSource>, image_label: String, client: &Arc<S3Client>) -> Result<Layout, String> {
    let image_size = image.size();
    let mut segments = Vec::with_capacity(table.entries.len() + 1);
    segments.push(Segment::whole(image_label, 0, image));
    for e in &table.entries {
        let info = ObjectInfo { size: e.size, etag: e.etag.clone(), version_id: None, last_modified: None };
        let source = Arc::new(S3Source::new(Arc::clone(client), e.key.clone(), info));
        segments.push(Segment { label: source.describe(), start: e.flat_start, len: e.size, source_offset: 0, source, sha256: None });
    }
    Layout::new(segments, table.space_end(image_size.checked_next_multiple_of(4096).unwrap_or(u64::MAX))).map_err(|e| format!("bucket image layout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::build::{write_bucket_image, BuildOptions};
    use crate::bucket::keys::plan_tree;
    use crate::bucket::read::tests::Mem;
    use crate::bucket::record::BucketHeader;
    use crate::remote::s3::{CredentialOrigin, ListedObject, SigVersion, UrlStyle};
    use std::io::{Read, Seek, SeekFrom};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn the_layout_maps_each_object_where_the_image_puts_it() {
        let header = BucketHeader {
            bucket: "bkt".into(),
            prefix: String::new(),
            endpoints: vec!["http://127.0.0.1:1".into()],
            region: "us-east-1".into(),
            url_style: Some(UrlStyle::Path),
            sig: SigVersion::V4,
        };
        let listing: Vec<ListedObject> = [("a", 10u64), ("big", (4u64 << 30) + 1), ("c/d", 4096), ("e", 0)]
            .iter()
            .map(|(k, s)| ListedObject { key: k.to_string(), size: *s, etag: Some("\"x\"".into()), last_modified: None })
            .collect();
        let mut f = tempfile::tempfile().unwrap();
        let report = write_bucket_image(&mut f, &header, &listing, &plan_tree("", &listing), &BuildOptions { uuid: Some([7; 16]) }).unwrap();
        let mut bytes = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut bytes).unwrap();
        let mem = Arc::new(Mem { bytes: bytes.clone(), fetches: AtomicU64::new(0) });
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let probe = Bytes::copy_from_slice(&bytes[..4096]);
        // The pinned hash must match.
        let err = rt.block_on(read_checked_table(mem.as_ref(), &probe, "00")).unwrap_err();
        assert!(err.contains("not the one"), "{err}");
        let (_, loc, _) = crate::bucket::read::tests::locate_bytes(&bytes).unwrap();
        let sha = hex::encode(loc.unwrap().table_sha256);
        let before = mem.fetches.load(Ordering::Relaxed);
        let table = rt.block_on(read_checked_table(mem.as_ref(), &probe, &sha)).unwrap();
        assert_eq!(mem.fetches.load(Ordering::Relaxed) - before, 1, "the record is in the probe; the table is one read");
        let cfg = ClientConfig {
            bucket: "bkt".into(),
            endpoints: vec![parse_endpoint("http://127.0.0.1:1").unwrap()],
            region: "us-east-1".into(),
            url_style: None,
            sig: SigVersion::V4,
            connect_timeout: std::time::Duration::from_secs(1),
            request_timeout: std::time::Duration::from_secs(1),
        };
        let client = Arc::new(S3Client::new(&cfg, None, CredentialOrigin::Anonymous).unwrap());
        let layout = layout_of(&table, mem.clone(), "image".into(), &client).unwrap();
        let segs: Vec<(String, u64, u64)> = layout.segments().iter().map(|s| (s.label.clone(), s.start, s.len)).collect();
        let base = report.image_bytes;
        assert_eq!(
            segs,
            vec![
                ("image".into(), 0, base),
                ("s3://bkt/a".into(), base, 10),
                ("s3://bkt/big".into(), base + 4096, (4 << 30) + 1),
                ("s3://bkt/c/d".into(), base + 4096 + (4 << 30) + 4096, 4096),
            ]
        );
        assert_eq!(layout.size(), base + 4096 + (4 << 30) + 8192);
        assert_eq!(layout.size(), report.address_space);
        // A read of the big object's last block is that object's and the zeros after it.
        let last = base + 4096 + (4 << 30);
        let pieces = layout.split(last..last + 4096);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].segment, Some(2));
        assert_eq!(pieces[0].source, (4 << 30)..(4 << 30) + 1);
        assert_eq!(pieces[1].segment, None);
        assert_eq!(layout.region(last + 10), last - (4 << 30)..last + 4096, "one region: the object and its last block");
    }
}
