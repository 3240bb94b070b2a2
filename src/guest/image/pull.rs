//! `image pull`: download Debian's genericcloud qcow2 from a mirror that serves Debian's layout
//! (`BASE/FILE` and `BASE/SHA512SUMS`), verify it, and install it read-only in the cache.
//!
//! The download streams into a staging directory in the cache while hashing; only a complete,
//! verified file is renamed into place. Any failure (HTTP error, unreachable server, short body,
//! wrong checksum, interruption) drops the staging directory and leaves the cached image as it was.

use std::time::Duration;

use futures::StreamExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::progress::Progress;
use super::{BootSpec, DISK, FileStamp, Image, Manifest, Source, store, tool};
use crate::error::{Error, Result, show};
use crate::paths::Dirs;

/// Debian 13 (trixie) cloud images.
pub const DEFAULT_BASE_URL: &str = "https://cloud.debian.org/images/cloud/trixie/latest/";
pub const DEFAULT_FILE: &str = "debian-13-genericcloud-amd64.qcow2";
/// Overrides the default base URL (a local mirror).
pub const BASE_URL_ENV: &str = "BOMA_QVM_IMAGE_URL";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOptions {
    /// Directory URL holding `file` and `SHA512SUMS`.
    pub base_url: String,
    pub file: String,
    /// Cache name to install as.
    pub name: String,
}

impl Default for PullOptions {
    /// Debian's official trixie location, or `$BOMA_QVM_IMAGE_URL` if set.
    fn default() -> Self {
        let base_url = std::env::var(BASE_URL_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        PullOptions {
            base_url,
            file: DEFAULT_FILE.into(),
            name: super::CLOUD.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Downloaded {
        bytes: u64,
        secs: f64,
    },
    /// The cached image already has the published checksum; nothing was downloaded.
    UpToDate,
}

#[derive(Debug)]
pub struct Pulled {
    pub image: Image,
    pub outcome: Outcome,
}

/// A failed pull, and whether it failed because the server could not be reached at all
/// (`ensure(Auto)` then falls back to the offline build).
#[derive(Debug)]
pub struct PullFailure {
    pub unreachable: bool,
    pub error: Error,
}

impl From<Error> for PullFailure {
    fn from(error: Error) -> Self {
        PullFailure {
            unreachable: false,
            error,
        }
    }
}

/// Pull (or confirm up to date) the image described by `opts`.
pub async fn pull(dirs: &Dirs, opts: &PullOptions) -> Result<Pulled> {
    pull_classified(dirs, opts).await.map_err(|f| f.error)
}

fn url(base: &str, file: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), file)
}

/// The sha512 for `file` in a Debian `SHA512SUMS` (`<hex>  <name>` or `<hex> *<name>` lines).
pub fn parse_sums(text: &str, file: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (sum, name) = l.trim().split_once(char::is_whitespace)?;
        let name = name.trim_start().trim_start_matches('*');
        (name == file && sum.len() == 128 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| sum.to_ascii_lowercase())
    })
}

/// `e` and its sources, joined (reqwest's own message alone hides the cause).
fn chain(e: &reqwest::Error) -> String {
    let mut cause = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        cause = format!("{cause}: {s}");
        src = s.source();
    }
    cause
}

fn net_failure(url: &str, e: &reqwest::Error) -> PullFailure {
    PullFailure {
        unreachable: e.is_connect() || e.is_timeout(),
        error: Error::image(
            format!("cannot fetch {url}: {}", chain(e)),
            "check the network, point --base-url (or $BOMA_QVM_IMAGE_URL) at a reachable mirror of \
             Debian's cloud images, or build offline with `boma-qvm image build`",
        ),
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<reqwest::Response, PullFailure> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| net_failure(url, &e))?;
    if !resp.status().is_success() {
        return Err(Error::image(
            format!("{url} answered HTTP {}", resp.status()),
            "check --base-url serves Debian's cloud image layout (the image file and SHA512SUMS)",
        )
        .into());
    }
    Ok(resp)
}

/// Why `base` is not an http(s) URL with a host, or `None` when it is one.
pub fn url_problem(base: &str) -> Option<String> {
    let url = match reqwest::Url::parse(base) {
        Ok(u) => u,
        Err(e) => return Some(e.to_string()),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Some(format!(
            "the scheme is `{}`, and only http and https are fetched",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some("it names no host".into());
    }
    None
}

/// Refuse a base URL that is not http(s) with a host, naming the flag and setting.
pub fn validate_base_url(base: &str) -> Result<()> {
    match url_problem(base) {
        None => Ok(()),
        Some(why) => Err(Error::input(
            format!(
                "`{base}` is not a usable image server URL (--base-url or ${BASE_URL_ENV}): {why}"
            ),
            format!(
                "give the http:// or https:// URL of a directory in Debian's cloud image layout, \
                 e.g. {DEFAULT_BASE_URL}"
            ),
        )),
    }
}

pub async fn pull_classified(dirs: &Dirs, opts: &PullOptions) -> Result<Pulled, PullFailure> {
    store::validate_name(&opts.name)?;
    validate_base_url(&opts.base_url)?;
    let _lock = store::lock(dirs).await?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| {
            Error::image(
                format!("cannot build an HTTP client: {e}"),
                "report this bug",
            )
        })?;

    let sums_url = url(&opts.base_url, "SHA512SUMS");
    let sums = get(&client, &sums_url)
        .await?
        .text()
        .await
        .map_err(|e| net_failure(&sums_url, &e))?;
    let want = parse_sums(&sums, &opts.file).ok_or_else(|| {
        Error::image(
            format!("{sums_url} has no sha512 for {}", opts.file),
            "check the image file name and that the mirror serves Debian's layout",
        )
    })?;

    if let Ok(Some(img)) = store::find(dirs, &opts.name)
        && matches!(&img.manifest.source, Source::Pull { sha512, .. } if *sha512 == want)
    {
        tracing::info!(image = %opts.name, "up to date (sha512 matches {sums_url}); nothing downloaded");
        return Ok(Pulled {
            image: img,
            outcome: Outcome::UpToDate,
        });
    }

    store::ensure_unused(dirs, &opts.name)?;
    let file_url = url(&opts.base_url, &opts.file);
    let staged = store::staging(dirs, "pull")?;
    let disk = staged.path().join(DISK);
    let start = std::time::Instant::now();
    let (bytes, got512, got256) = download(&client, &file_url, &disk).await?;
    let secs = start.elapsed().as_secs_f64();
    if got512 != want {
        return Err(Error::image(
            format!("checksum mismatch for {file_url}: got sha512 {got512}, {sums_url} says {want}"),
            "the download is corrupt or the mirror is inconsistent; pull again later or use another mirror",
        )
        .into());
    }
    let info = super::overlay::info(&disk)?;
    if info.format != "qcow2" {
        return Err(Error::image(
            format!("{file_url} is {}, not a qcow2 image", info.format),
            "point --base-url at Debian's cloud images",
        )
        .into());
    }
    tool::set_readonly(&disk)?;
    let stamp = FileStamp::of(staged.path(), DISK, got256.clone())?;
    Manifest {
        name: opts.name.clone(),
        source: Source::Pull {
            url: file_url,
            sha512: want,
        },
        created: tool::utc_now(),
        disk_sha256: got256,
        disk_bytes: bytes,
        boot: BootSpec::Disk,
        packages: Default::default(),
        stages: vec![super::Stage {
            name: "download".into(),
            secs: (secs * 10.0).round() / 10.0,
        }],
        files: vec![stamp],
    }
    .write(staged.path())?;
    let image = store::install(dirs, staged, &opts.name)?;
    tracing::info!(image = %opts.name, bytes, secs, "pulled into {}", show(&image.dir));
    Ok(Pulled {
        image,
        outcome: Outcome::Downloaded { bytes, secs },
    })
}

/// Stream `url` into `dest`, hashing as it goes. Returns (bytes, sha512, sha256).
async fn download(
    client: &reqwest::Client,
    url: &str,
    dest: &std::path::Path,
) -> Result<(u64, String, String), PullFailure> {
    let resp = get(client, url).await?;
    let total = resp.content_length();
    let io = |e: std::io::Error| Error::Io {
        context: format!("writing {}", show(dest)),
        source: e,
    };
    let mut out = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::create(dest).await.map_err(io)?,
    );
    let (mut h512, mut h256) = (sha2::Sha512::new(), sha2::Sha256::new());
    let mut progress = Progress::new(url.rsplit('/').next().unwrap_or(url), total);
    let mut done = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                progress.finish(done);
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                return Err(Error::image(
                    format!("transfer of {url} broke off after {done}{of} bytes: {}", chain(&e)),
                    "pull again (the cached image, if any, is unchanged); if it keeps failing, try another mirror",
                )
                .into());
            }
        };
        h512.update(&chunk);
        h256.update(&chunk);
        out.write_all(&chunk).await.map_err(io)?;
        done += chunk.len() as u64;
        progress.update(done);
    }
    progress.finish(done);
    out.flush().await.map_err(io)?;
    out.get_ref().sync_all().await.map_err(io)?;
    if let Some(t) = total
        && t != done
    {
        return Err(Error::image(
            format!("transfer of {url} was truncated: {done} of {t} bytes"),
            "pull again; the cached image (if any) is unchanged",
        )
        .into());
    }
    Ok((
        done,
        hex::encode(h512.finalize()),
        hex::encode(h256.finalize()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_debian_format() {
        let a = "a".repeat(128);
        let b = "B".repeat(128);
        let text = format!("{a}  debian-13-genericcloud-amd64.json\n{b}  {DEFAULT_FILE}\n");
        assert_eq!(parse_sums(&text, DEFAULT_FILE), Some("b".repeat(128)));
        assert_eq!(
            parse_sums(&format!("{a} *x.qcow2"), "x.qcow2"),
            Some(a.clone())
        );
        assert_eq!(parse_sums(&text, "other.qcow2"), None);
        assert_eq!(parse_sums("abc  x.qcow2", "x.qcow2"), None);
    }

    #[test]
    fn base_urls_must_be_http_with_a_host() {
        for good in [
            DEFAULT_BASE_URL,
            "http://127.0.0.1:8080/images/",
            "https://m/x",
        ] {
            validate_base_url(good).unwrap();
        }
        for bad in [
            "ht!tp:/bad url",
            "file:///srv/images/",
            "ftp://h/x",
            "cloud.debian.org/x",
            "",
        ] {
            let e = validate_base_url(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
            assert!(e.to_string().contains("--base-url"), "{e}");
        }
    }

    #[test]
    fn urls_join_with_or_without_slash() {
        assert_eq!(url("http://h/a/", "f"), "http://h/a/f");
        assert_eq!(url("http://h/a", "f"), "http://h/a/f");
    }
}
