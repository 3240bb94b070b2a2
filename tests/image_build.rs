//! The offline build's failure path (the success path is the manual boot check in the report:
//! it takes minutes and a Debian mirror): a failed build leaves no staging junk and never
//! replaces the image already cached under that name.

mod common;

use boma_qvm::Error;
use boma_qvm::guest::image::{self, build, import, store};
use common::http::*;

#[tokio::test]
async fn a_failed_build_keeps_the_previous_image_and_leaves_no_junk() {
    let (t, dirs) = tmp_dirs();
    let src = t.path().join("prev.qcow2");
    let prev = make_qcow2(&src, 64, 1, 0x11);
    import::import(&dirs, &src, Some(image::BUILT))
        .await
        .unwrap();

    let opts = build::BuildOptions {
        mirror: dead_base_url() + "debian",
        ..Default::default()
    };
    let err = build::build(&dirs, &opts).await.unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    if nix::unistd::geteuid().is_root() {
        let msg = err.to_string();
        assert!(msg.contains("debootstrap failed"), "{msg}");
        let log = dirs
            .cache
            .join("logs")
            .join(format!("build-{}.log", image::BUILT));
        assert!(
            msg.contains(&log.display().to_string()),
            "the error should name the log: {msg}"
        );
        assert!(std::fs::metadata(&log).unwrap().len() > 0);
    } else {
        assert!(err.to_string().contains("needs root"), "{err}");
    }
    assert_eq!(cache_entries(&dirs.images()), [image::BUILT]);
    let img = store::get(&dirs, image::BUILT).unwrap();
    assert_eq!(std::fs::read(&img.disk).unwrap(), prev);
}

#[tokio::test]
async fn the_default_never_switches_to_a_cached_cloud_image() {
    let (t, dirs) = tmp_dirs();
    let src = t.path().join("x.qcow2");
    make_qcow2(&src, 64, 0, 0);
    import::import(&dirs, &src, Some(image::CLOUD))
        .await
        .unwrap();
    import::import(&dirs, &src, Some(image::BUILT))
        .await
        .unwrap();
    // A cached cloud image (no Docker, no guest agent) is there, and the default still takes
    // the built one.
    let img = image::ensure(&dirs, &image::ImageChoice::default())
        .await
        .unwrap();
    assert_eq!(img.name, image::BUILT);
}
