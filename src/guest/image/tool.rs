//! Small helpers of the image cache: hash a file, make a file read-only, format a UTC timestamp.
//! (Running external programs is `crate::tools`.)

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::Digest;

use crate::error::{Error, IoContext, Result, show};

fn hash_file<D: Digest>(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).ctx(|| format!("opening {}", show(path)))?;
    let mut h = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ctx(|| format!("reading {}", show(path)))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Lower-case hex sha256 of a file (streamed, blocking).
pub fn sha256_file(path: &Path) -> Result<String> {
    hash_file::<sha2::Sha256>(path)
}

/// Lower-case hex sha512 of a file (streamed, blocking).
pub fn sha512_file(path: &Path) -> Result<String> {
    hash_file::<sha2::Sha512>(path)
}

/// sha256 on a blocking thread, for async callers hashing large images.
pub async fn sha256_file_async(path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || sha256_file(&p))
        .await
        .map_err(|e| Error::image(format!("hashing task failed: {e}"), "retry"))?
}

/// chmod 0444: golden files are never written, and a stray `qemu-img` or QEMU without an
/// overlay then fails with "Permission denied" instead of silently changing the image.
pub fn set_readonly(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .ctx(|| format!("making {} read-only", show(path)))
}

/// The current UTC time as RFC 3339 (`2026-11-26T05:04:42Z`), without a date crate.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_rfc3339(secs)
}

/// RFC 3339 for seconds since the epoch (Howard Hinnant's civil-from-days).
pub fn utc_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(utc_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_rfc3339(1_795_669_482), "2026-11-26T05:04:42Z");
    }
}
