//! ListObjectsV2 (continuation tokens) and ListObjects v1 (markers, for stores without v2) pages:
//! the queries and the parsing of their XML. Requests ask `encoding-type=url`, so keys that XML
//! cannot carry (control characters) arrive percent-encoded and are decoded here. Pure.

use super::location::uri_decode;

/// S3 answers at most 1000 keys a page; anything far beyond that is not a page.
pub const MAX_PAGE_ENTRIES: usize = 100_000;
/// A page of 1000 keys of 1 KiB each with their metadata stays well below this.
pub const MAX_PAGE_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListVersion {
    V2,
    V1,
}

/// What to list: keys under `prefix`; with a delimiter (`/`), deeper keys are folded into
/// common prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub prefix: String,
    pub delimiter: Option<String>,
    /// `max-keys` (page size); `None` lets the store choose (1000 on S3).
    pub page_size: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    /// LastModified as seconds and nanoseconds since the epoch.
    pub last_modified: Option<(i64, u32)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ListedObject>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// v2: the token of the next page.
    pub next_continuation_token: Option<String>,
    /// v1: the marker of the next page (only sent by stores when a delimiter was given).
    pub next_marker: Option<String>,
}

impl ListPage {
    /// v1's next marker: `NextMarker`, else the greatest key or common prefix of this page.
    pub fn v1_next_marker(&self) -> Option<String> {
        if let Some(m) = &self.next_marker {
            return Some(m.clone());
        }
        let last_key = self.objects.iter().map(|o| o.key.as_str()).max();
        let last_prefix = self.common_prefixes.iter().map(String::as_str).max();
        last_key.max(last_prefix).map(str::to_string)
    }
}

/// The whole listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ListedObject>,
    pub common_prefixes: Vec<String>,
    /// Pages fetched (one request each).
    pub pages: u32,
}

/// The query pairs of one page request (unencoded; the URL builder encodes them).
pub fn page_query(version: ListVersion, q: &ListQuery, cursor: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if version == ListVersion::V2 {
        out.push(("list-type".to_string(), "2".to_string()));
    }
    if let Some(d) = &q.delimiter {
        out.push(("delimiter".to_string(), d.clone()));
    }
    out.push(("encoding-type".to_string(), "url".to_string()));
    if let Some(n) = q.page_size {
        out.push(("max-keys".to_string(), n.to_string()));
    }
    if !q.prefix.is_empty() {
        out.push(("prefix".to_string(), q.prefix.clone()));
    }
    if let Some(c) = cursor {
        let name = if version == ListVersion::V2 { "continuation-token" } else { "marker" };
        out.push((name.to_string(), c.to_string()));
    }
    // Canonical order: SigV4 sorts them anyway; a fixed order keeps URLs comparable in logs.
    out.sort();
    out
}

/// Parses one `ListBucketResult` page.
pub fn parse_page(body: &[u8]) -> Result<ListPage, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the listing is not UTF-8".to_string())?;
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("the listing is not XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListBucketResult" {
        return Err(format!("expected a ListBucketResult, got <{}>", root.tag_name().name()));
    }
    let text_of = |node: roxmltree::Node<'_, '_>, name: &str| -> Option<String> {
        node.children().find(|n| n.is_element() && n.tag_name().name() == name).map(|n| n.text().unwrap_or("").to_string())
    };
    let url_encoded = text_of(root, "EncodingType").as_deref() == Some("url");
    let decode = |s: String| -> Result<String, String> { if url_encoded { uri_decode(&s) } else { Ok(s) } };
    let mut page = ListPage {
        truncated: text_of(root, "IsTruncated").as_deref().map(str::trim) == Some("true"),
        next_continuation_token: text_of(root, "NextContinuationToken").filter(|t| !t.is_empty()),
        next_marker: text_of(root, "NextMarker").filter(|t| !t.is_empty()).map(decode).transpose()?,
        ..Default::default()
    };
    let mut entries = 0usize;
    for node in root.children().filter(|n| n.is_element()) {
        match node.tag_name().name() {
            "Contents" => {
                let key = decode(text_of(node, "Key").ok_or("an entry without a Key")?)?;
                let size = text_of(node, "Size")
                    .ok_or_else(|| format!("entry {key:?} has no Size"))?
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("entry {key:?} has a bad Size"))?;
                let last_modified = match text_of(node, "LastModified") {
                    Some(t) => Some(parse_timestamp(t.trim()).ok_or_else(|| format!("entry {key:?} has a bad LastModified {t:?}"))?),
                    None => None,
                };
                page.objects.push(ListedObject { key, size, etag: text_of(node, "ETag"), last_modified });
            }
            "CommonPrefixes" => {
                let prefix = decode(text_of(node, "Prefix").ok_or("a CommonPrefixes entry without a Prefix")?)?;
                page.common_prefixes.push(prefix);
            }
            _ => continue,
        }
        entries += 1;
        if entries > MAX_PAGE_ENTRIES {
            return Err(format!("a listing page with more than {MAX_PAGE_ENTRIES} entries"));
        }
    }
    Ok(page)
}

/// `2009-10-12T17:50:30.000Z` -> (seconds, nanoseconds) since the epoch.
pub fn parse_timestamp(text: &str) -> Option<(i64, u32)> {
    let t = aws_smithy_types::DateTime::from_str(text, aws_smithy_types::date_time::Format::DateTime).ok()?;
    Some((t.secs(), t.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bkt</Name><Prefix>dir%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>2</MaxKeys>
  <Delimiter>%2F</Delimiter><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents><Key>dir%2Fa%20b%25%2B%C3%BC</Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>&quot;fba9dede5f27731c9771645a39863328&quot;</ETag><Size>434234</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>dir%2F%01ctl</Key><Size>0</Size></Contents>
  <CommonPrefixes><Prefix>dir%2Fsub%2F</Prefix></CommonPrefixes>
</ListBucketResult>"#;

    #[test]
    fn v2_page_parses_and_decodes_keys() {
        let p = parse_page(V2_PAGE.as_bytes()).unwrap();
        assert!(p.truncated);
        assert_eq!(p.next_continuation_token.as_deref(), Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="));
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.objects[0].key, "dir/a b%+ü");
        assert_eq!(p.objects[0].size, 434_234);
        assert_eq!(p.objects[0].etag.as_deref(), Some("\"fba9dede5f27731c9771645a39863328\""));
        assert_eq!(p.objects[0].last_modified, Some((1_255_369_830, 0)));
        assert_eq!(p.objects[1].key, "dir/\u{1}ctl");
        assert_eq!(p.common_prefixes, vec!["dir/sub/".to_string()]);
    }

    #[test]
    fn v1_markers() {
        let xml = r#"<ListBucketResult><IsTruncated>true</IsTruncated>
            <Contents><Key>a</Key><Size>1</Size></Contents><Contents><Key>c</Key><Size>1</Size></Contents>
            <CommonPrefixes><Prefix>b/</Prefix></CommonPrefixes></ListBucketResult>"#;
        let p = parse_page(xml.as_bytes()).unwrap();
        assert_eq!(p.v1_next_marker().as_deref(), Some("c"));
        let xml = r#"<ListBucketResult><IsTruncated>true</IsTruncated><NextMarker>z%20z</NextMarker><EncodingType>url</EncodingType>
            <CommonPrefixes><Prefix>d/</Prefix></CommonPrefixes></ListBucketResult>"#;
        assert_eq!(parse_page(xml.as_bytes()).unwrap().v1_next_marker().as_deref(), Some("z z"));
        let xml = r#"<ListBucketResult><IsTruncated>false</IsTruncated><CommonPrefixes><Prefix>q/</Prefix></CommonPrefixes></ListBucketResult>"#;
        assert_eq!(parse_page(xml.as_bytes()).unwrap().v1_next_marker().as_deref(), Some("q/"));
    }

    #[test]
    fn broken_pages_are_errors() {
        for bad in [
            "<Error><Code>x</Code></Error>",
            "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>k</Key><Size>1</Size><LastModified>yesterday</LastModified></Contents></ListBucketResult>",
            "<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>%FF</Key><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult>",
        ] {
            assert!(parse_page(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries() {
        let q = ListQuery { prefix: "a b/".into(), delimiter: Some("/".into()), page_size: Some(2) };
        let v2 = page_query(ListVersion::V2, &q, Some("tok"));
        assert!(v2.contains(&("list-type".into(), "2".into())));
        assert!(v2.contains(&("continuation-token".into(), "tok".into())));
        assert!(v2.contains(&("prefix".into(), "a b/".into())));
        let v1 = page_query(ListVersion::V1, &q, Some("m"));
        assert!(v1.contains(&("marker".into(), "m".into())));
        assert!(!v1.iter().any(|(k, _)| k == "list-type"));
    }
}
