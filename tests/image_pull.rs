//! `image pull` against a real local HTTP server: after every outcome the cache holds a correct
//! image or nothing (and a previous good image is untouched), never a partial file.

mod common;

use std::time::Duration;

use boma_qvm::Error;
use boma_qvm::guest::image::pull::{self, Outcome, PullOptions};
use boma_qvm::guest::image::{self, Boot, ImageChoice, Source};
use common::http::*;

const FILE: &str = "debian-13-genericcloud-amd64.qcow2";

fn opts(base: &str) -> PullOptions {
    PullOptions {
        base_url: base.into(),
        file: FILE.into(),
        name: image::CLOUD.into(),
    }
}

/// The cache holds exactly one image, the cloud image, with exactly `bytes`, read-only.
fn assert_cached(dirs: &boma_qvm::paths::Dirs, bytes: &[u8]) {
    assert_eq!(
        cache_entries(&dirs.images()),
        vec![image::CLOUD.to_string()]
    );
    let dir = dirs.images().join(image::CLOUD);
    assert_eq!(files(&dir), vec!["disk.qcow2", "manifest.json"]);
    let disk = dir.join("disk.qcow2");
    assert!(
        std::fs::read(&disk).unwrap() == bytes,
        "cached disk differs from the published one"
    );
    assert_eq!(mode(&disk), 0o444);
    let img = image::store::get(dirs, image::CLOUD).unwrap();
    assert_eq!(img.boot, Boot::Disk);
    assert_eq!(img.manifest.disk_sha256, sha256_file(&disk));
    match &img.manifest.source {
        Source::Pull { sha512: s, url } => {
            assert_eq!(*s, sha512(bytes));
            assert!(url.ends_with(FILE));
        }
        other => panic!("unexpected source {other:?}"),
    }
}

fn image_err(r: Result<pull::Pulled, Error>) -> String {
    match r {
        Err(e @ Error::Image { .. }) => {
            eprintln!("pull error (as the user sees it): {e}");
            e.to_string()
        }
        Err(e) => panic!("expected Error::Image, got {e}"),
        Ok(p) => panic!("expected an error, pull gave {:?}", p.outcome),
    }
}

#[tokio::test]
async fn good_download_then_second_pull_downloads_nothing() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let a = qcow2_bytes(64, 3, 0xab);
    srv.publish(FILE, &a);

    let p = pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    assert!(matches!(p.outcome, Outcome::Downloaded { bytes, .. } if bytes == a.len() as u64));
    assert_cached(&dirs, &a);

    let p = pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    assert_eq!(p.outcome, Outcome::UpToDate);
    assert_eq!(
        srv.hits(FILE),
        1,
        "the up-to-date pull fetched the image again"
    );
    assert_eq!(srv.hits("SHA512SUMS"), 2);
    assert_cached(&dirs, &a);
}

#[tokio::test]
async fn a_new_upstream_image_replaces_the_old_one() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let (a, b) = (qcow2_bytes(64, 1, 0xab), qcow2_bytes(64, 2, 0xcd));
    srv.publish(FILE, &a);
    pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    srv.publish(FILE, &b);
    let p = pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    assert!(matches!(p.outcome, Outcome::Downloaded { .. }));
    assert_cached(&dirs, &b);

    // While a VM's overlay is backed by the cached image, an update is refused (the overlay
    // would otherwise read the new image's blocks) and nothing is downloaded.
    let vm_disk = dirs.vm("boma-it-y").join("disk.qcow2");
    std::fs::create_dir_all(vm_disk.parent().unwrap()).unwrap();
    let golden = dirs.images().join(image::CLOUD).join("disk.qcow2");
    boma_qvm::guest::image::overlay::create(&golden, &vm_disk, None).unwrap();
    srv.publish(FILE, &a);
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("boma-it-y"), "{err}");
    assert_eq!(srv.hits(FILE), 2);
    assert_cached(&dirs, &b);
}

#[tokio::test]
async fn bad_checksum_leaves_nothing_and_keeps_a_previous_image() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let (a, b) = (qcow2_bytes(64, 1, 0xab), qcow2_bytes(64, 2, 0xcd));
    srv.set(FILE, Reply::Ok(a.clone()));
    srv.set_sums(FILE, &sha512(b"something else"));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(cache_entries(&dirs.images()).is_empty());

    srv.publish(FILE, &a);
    pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    srv.set(FILE, Reply::Ok(b));
    srv.set_sums(FILE, &sha512(b"not b"));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_cached(&dirs, &a);
}

#[tokio::test]
async fn truncated_body_leaves_nothing_and_keeps_a_previous_image() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let (a, b) = (qcow2_bytes(64, 1, 0xab), qcow2_bytes(64, 2, 0xcd));
    srv.set(
        FILE,
        Reply::Truncated {
            body: a[..a.len() / 2].to_vec(),
            claimed: a.len() as u64,
        },
    );
    srv.set_sums(FILE, &sha512(&a));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(
        err.contains("broke off") || err.contains("truncated"),
        "{err}"
    );
    assert!(cache_entries(&dirs.images()).is_empty());

    srv.publish(FILE, &a);
    pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    srv.set(
        FILE,
        Reply::Truncated {
            body: b[..1000].to_vec(),
            claimed: b.len() as u64,
        },
    );
    srv.set_sums(FILE, &sha512(&b));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains(&format!("of {}", b.len())), "{err}");
    assert_cached(&dirs, &a);
}

#[tokio::test]
async fn http_404_for_image_or_sums_is_a_clear_error() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("SHA512SUMS answered HTTP 404"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    srv.set_sums(FILE, &sha512(b"x"));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains(&format!("{FILE} answered HTTP 404")), "{err}");
    srv.set_sums("other.qcow2", &sha512(b"x"));
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("has no sha512 for"), "{err}");
    assert!(cache_entries(&dirs.images()).is_empty());
}

#[tokio::test]
async fn server_down_is_unreachable_and_keeps_a_previous_image() {
    let (_t, dirs) = tmp_dirs();
    let f = pull::pull_classified(&dirs, &opts(&dead_base_url()))
        .await
        .unwrap_err();
    assert!(
        f.unreachable,
        "connection refused must count as unreachable: {}",
        f.error
    );
    assert!(f.error.to_string().contains("image build"), "{}", f.error);
    assert!(cache_entries(&dirs.images()).is_empty());

    let srv = Server::start().await;
    let a = qcow2_bytes(64, 1, 0xab);
    srv.publish(FILE, &a);
    let base = srv.base_url();
    pull::pull(&dirs, &opts(&base)).await.unwrap();
    srv.stop().await;
    let f = pull::pull_classified(&dirs, &opts(&base))
        .await
        .unwrap_err();
    assert!(f.unreachable);
    assert_cached(&dirs, &a);
    // Once cached, ensure() needs no network at all.
    let choice = ImageChoice::Cloud(opts(&base));
    assert_eq!(
        image::ensure(&dirs, &choice).await.unwrap().name,
        image::CLOUD
    );
}

#[tokio::test]
async fn an_interrupted_pull_leaves_no_junk_and_the_next_one_works() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let a = qcow2_bytes(64, 3, 0xab);
    srv.set(
        FILE,
        Reply::Stall {
            body: a[..a.len() / 3].to_vec(),
            claimed: a.len() as u64,
        },
    );
    srv.set_sums(FILE, &sha512(&a));
    // Cancel mid-transfer (like Ctrl-C): the future is dropped while the body is streaming.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        pull::pull(&dirs, &opts(&srv.base_url())),
    )
    .await;
    assert!(
        r.is_err(),
        "the stalled pull should still be running when cancelled"
    );
    assert!(cache_entries(&dirs.images()).is_empty());

    // A staging dir left by a killed (SIGKILL) pull is removed by the next operation.
    let stale = dirs.images().join(".tmp-pull-killed");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("disk.qcow2"), &a[..100]).unwrap();

    srv.publish(FILE, &a);
    pull::pull(&dirs, &opts(&srv.base_url())).await.unwrap();
    assert!(!stale.exists());
    assert_cached(&dirs, &a);
}

#[tokio::test]
async fn concurrent_pulls_are_serialised_and_download_once() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    let a = qcow2_bytes(64, 3, 0xab);
    srv.publish(FILE, &a);
    let o = opts(&srv.base_url());
    let (r1, r2) = tokio::join!(pull::pull(&dirs, &o), pull::pull(&dirs, &o));
    let mut outcomes = [r1.unwrap().outcome, r2.unwrap().outcome];
    outcomes.sort_by_key(|o| matches!(o, Outcome::UpToDate));
    assert!(
        matches!(outcomes[0], Outcome::Downloaded { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::UpToDate);
    assert_eq!(srv.hits(FILE), 1);
    assert_cached(&dirs, &a);
}

#[tokio::test]
async fn a_file_that_is_not_qcow2_is_refused() {
    let (_t, dirs) = tmp_dirs();
    let srv = Server::start().await;
    srv.publish(FILE, b"<html>captive portal</html>");
    let err = image_err(pull::pull(&dirs, &opts(&srv.base_url())).await);
    assert!(err.contains("not a qcow2"), "{err}");
    assert!(cache_entries(&dirs.images()).is_empty());
}
