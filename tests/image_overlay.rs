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

/// Golden images cannot be swapped: `ensure` (what `up` and `cycle` call) refuses one whose file
/// is not the one stamped when it entered the cache (even with its size and mtime put back), and
/// one that the group or another user could write. A byte-identical copy (a restored backup)
/// passes after one full hash, and is stamped again.
#[tokio::test]
async fn a_swapped_or_group_writable_golden_image_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (t, dirs) = tmp_dirs();
    let src = t.path().join("gold.qcow2");
    let bytes = make_qcow2(&src, 64, 1, 0x5a);
    let img = import::import(&dirs, &src, Some("gold")).await.unwrap();
    let stamp = img.manifest.files.iter().find(|f| f.file == "disk.qcow2");
    assert_eq!(
        stamp.map(|s| s.sha256.as_str()),
        Some(img.manifest.disk_sha256.as_str()),
        "{:?}",
        img.manifest
    );
    let named: image::ImageChoice = "gold".parse().unwrap();
    image::ensure(&dirs, &named).await.unwrap();
    let chmod = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };

    // Swapped: another disk of the same size, read-only, root's, its mtime set back.
    let evil = t.path().join("evil.qcow2");
    make_qcow2(&evil, 64, 1, 0x66);
    assert_eq!(std::fs::metadata(&evil).unwrap().len(), bytes.len() as u64);
    let old = std::fs::metadata(&img.disk).unwrap();
    chmod(&evil, 0o444);
    std::fs::rename(&evil, &img.disk).unwrap();
    let mtime = std::fs::File::options()
        .write(false)
        .read(true)
        .open(&img.disk)
        .unwrap();
    mtime
        .set_modified(old.modified().unwrap())
        .unwrap_or_else(|e| panic!("set mtime: {e}"));
    let e = image::ensure(&dirs, &named).await.unwrap_err();
    assert_eq!(e.exit_code(), 12, "{e}");
    assert!(
        e.to_string()
            .contains("was changed after it entered the cache")
            && e.to_string().contains("image rm gold"),
        "{e}"
    );

    // The same bytes back in a new file (a new inode): hashed once, accepted, stamped again.
    let copy = t.path().join("copy.qcow2");
    std::fs::write(&copy, &bytes).unwrap();
    chmod(&copy, 0o444);
    std::fs::rename(&copy, &img.disk).unwrap();
    image::ensure(&dirs, &named).await.unwrap();
    let restamped = store::get(&dirs, "gold").unwrap().manifest.files;
    assert_eq!(
        restamped[0].inode,
        std::fs::metadata(&img.disk).unwrap().ino(),
        "the new file was stamped"
    );

    // Writable by the group: the disk, then its directory.
    chmod(&img.disk, 0o664);
    let e = image::ensure(&dirs, &named).await.unwrap_err().to_string();
    assert!(
        e.contains("writable by its group") && e.contains("chmod go-w"),
        "{e}"
    );
    chmod(&img.disk, 0o444);
    chmod(&img.dir, 0o775);
    let e = image::ensure(&dirs, &named).await.unwrap_err().to_string();
    assert!(e.contains("writable by its group"), "{e}");
    chmod(&img.dir, 0o755);
    // Another user's file.
    std::os::unix::fs::chown(&img.disk, Some(4242), None).unwrap();
    let e = image::ensure(&dirs, &named).await.unwrap_err().to_string();
    assert!(e.contains("uid 4242"), "{e}");
    std::os::unix::fs::chown(&img.disk, Some(0), None).unwrap();
    image::ensure(&dirs, &named).await.unwrap();
}

/// A manifest from before stamps were recorded: its disk is checked against `disk_sha256` in
/// full, then stamped (by its owner); a mismatching one is refused.
#[tokio::test]
async fn an_unstamped_image_is_hashed_once_then_stamped() {
    let (t, dirs) = tmp_dirs();
    let src = t.path().join("old.qcow2");
    make_qcow2(&src, 64, 1, 0x11);
    let img = import::import(&dirs, &src, Some("old")).await.unwrap();
    let mut m = img.manifest.clone();
    m.files.clear();
    m.write(&img.dir).unwrap();
    let named: image::ImageChoice = "old".parse().unwrap();
    image::ensure(&dirs, &named).await.unwrap();
    assert_eq!(store::get(&dirs, "old").unwrap().manifest.files.len(), 1);

    m.disk_sha256 = "0".repeat(64);
    m.write(&img.dir).unwrap();
    let e = image::ensure(&dirs, &named).await.unwrap_err().to_string();
    assert!(e.contains("its manifest says 0000"), "{e}");
}
