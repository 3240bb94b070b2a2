//! Overlays and the cache's import/list/rm: the golden file is only ever a read-only backing file.

mod common;

use std::process::Command;

use boma_qvm::Error;
use boma_qvm::guest::image::{self, Boot, Source, import, overlay, store};
use common::http::*;

fn qemu_io(img: &std::path::Path, cmd: &str) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .output()
        .unwrap()
}

#[test]
fn overlay_is_backed_by_the_golden_image_which_never_changes() {
    let d = tempfile::tempdir().unwrap();
    let golden = d.path().join("golden.qcow2");
    make_qcow2(&golden, 64, 2, 0xab);
    boma_qvm::guest::image::tool::set_readonly(&golden).unwrap();
    let before = sha256_file(&golden);

    let ov = d.path().join("vm").join("disk.qcow2");
    std::fs::create_dir_all(ov.parent().unwrap()).unwrap();
    overlay::create(&golden, &ov, Some(128 << 20)).unwrap();
    let info = overlay::info(&ov).unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.backing.as_deref(), Some(golden.as_path()));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(info.virtual_size, 128 << 20);

    // The VM's writes land in the overlay; reads fall through to the golden data.
    let w = qemu_io(&ov, "write -P 0xcd 0 1M");
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(qemu_io(&ov, "read -P 0xcd 0 1M").status.success());
    assert!(qemu_io(&ov, "read -P 0xab 1M 1M").status.success());
    let r = qemu_io(&golden, "read -P 0xab 0 2M");
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("read 2097152/2097152"),
        "{r:?}"
    );
    assert_eq!(sha256_file(&golden), before, "the golden image changed");
    assert_eq!(mode(&golden), 0o444);
}

#[test]
fn overlay_refuses_bad_requests_clearly() {
    let d = tempfile::tempdir().unwrap();
    let golden = d.path().join("golden.qcow2");
    make_qcow2(&golden, 64, 0, 0);
    let ov = d.path().join("disk.qcow2");
    let e = overlay::create(&d.path().join("missing.qcow2"), &ov, None).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = overlay::create(&golden, &ov, Some(1 << 20)).unwrap_err();
    assert!(
        matches!(e, Error::Input { .. }) && e.to_string().contains("smaller"),
        "{e}"
    );
    assert!(!ov.exists());
    overlay::create(&golden, &ov, None).unwrap();
    assert_eq!(overlay::info(&ov).unwrap().virtual_size, 64 << 20);
    let e = overlay::create(&golden, &ov, None).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    let raw = d.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = overlay::create(&raw, &d.path().join("o2.qcow2"), None).unwrap_err();
    assert!(
        matches!(e, Error::Image { .. }) && e.to_string().contains("not qcow2"),
        "{e}"
    );
}

#[tokio::test]
async fn import_list_rm_round_trip() {
    let (t, dirs) = tmp_dirs();
    let src = t.path().join("My-Host.Disk.qcow2");
    let bytes = make_qcow2(&src, 64, 1, 0x5a);

    let img = import::import(&dirs, &src, None).await.unwrap();
    assert_eq!(img.name, "my-host");
    assert_eq!(img.boot, Boot::Disk);
    assert_eq!(std::fs::read(&img.disk).unwrap(), bytes);
    assert_eq!(mode(&img.disk), 0o444);
    assert_eq!(img.manifest.disk_sha256, sha256_file(&img.disk));
    assert!(
        matches!(&img.manifest.source, Source::Import { from } if from.ends_with("My-Host.Disk.qcow2"))
    );
    assert_eq!(cache_entries(&dirs.images()), ["my-host"]);

    let e = import::import(&dirs, &src, Some("my-host"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    let raw = t.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = import::import(&dirs, &raw, Some("raw")).await.unwrap_err();
    assert!(matches!(e, Error::Input { .. }), "{e}");
    let e = import::import(&dirs, &t.path().join("nope.qcow2"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    import::import(&dirs, &src, Some("second")).await.unwrap();
    let names: Vec<String> = store::list(&dirs)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["my-host", "second"]);
    let by_name = image::ensure(&dirs, &"second".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(by_name.disk, dirs.images().join("second/disk.qcow2"));

    // An image backing a VM's overlay can be neither removed nor replaced.
    let vm_disk = dirs.vm("boma-it-x").join("disk.qcow2");
    std::fs::create_dir_all(vm_disk.parent().unwrap()).unwrap();
    overlay::create(&img.disk, &vm_disk, None).unwrap();
    let e = store::rm(&dirs, "my-host").await.unwrap_err();
    assert!(
        matches!(e, Error::Image { .. }) && e.to_string().contains("boma-it-x"),
        "{e}"
    );
    assert_eq!(std::fs::read(&img.disk).unwrap(), bytes);
    std::fs::remove_file(&vm_disk).unwrap();

    store::rm(&dirs, "my-host").await.unwrap();
    assert_eq!(cache_entries(&dirs.images()), ["second"]);
    let e = store::rm(&dirs, "my-host").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = image::ensure(&dirs, &"my-host".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::NotFound { .. }) && e.to_string().contains("image pull"),
        "{e}"
    );
}
