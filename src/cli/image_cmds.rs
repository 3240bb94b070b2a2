//! `boma-qvm image ...`: pull, build, import, list, rm.

use std::path::PathBuf;

use clap::Subcommand;

use boma_qvm::Result;
use boma_qvm::guest::image::{self as img, Boot, Image, build, import, pull, store};
use boma_qvm::paths::Dirs;

#[derive(Debug, Clone, Subcommand)]
pub enum ImageCmd {
    /// Download Debian 13's genericcloud qcow2, verify it against SHA512SUMS, cache it read-only.
    Pull {
        /// Directory URL serving the image and SHA512SUMS in Debian's layout.
        #[arg(long, env = pull::BASE_URL_ENV, default_value = pull::DEFAULT_BASE_URL)]
        base_url: String,
        /// Image file name under the base URL.
        #[arg(long, default_value = pull::DEFAULT_FILE)]
        file: String,
        /// Cache name.
        #[arg(long, default_value = img::CLOUD)]
        name: String,
    },
    /// Build the offline golden image with debootstrap (needs root and a Debian mirror).
    Build {
        #[arg(long, env = build::MIRROR_ENV, default_value = build::DEFAULT_MIRROR)]
        mirror: String,
        /// Cache name.
        #[arg(long, default_value = img::BUILT)]
        name: String,
        /// Virtual disk size in GiB.
        #[arg(long, default_value_t = build::DEFAULT_DISK_SIZE >> 30)]
        size_gib: u64,
        /// Extra packages to include (repeatable).
        #[arg(long = "package")]
        packages: Vec<String>,
    },
    /// Copy a qcow2 you already have into the cache (read-only, with a manifest).
    Import {
        path: PathBuf,
        /// Cache name (default: the file name without extensions).
        #[arg(long)]
        name: Option<String>,
    },
    /// List cached golden images.
    List,
    /// Delete a cached golden image.
    Rm { name: String },
}

/// One line per image: name, boot mode, size, created, source.
pub fn describe(img: &Image) -> String {
    let boot = match &img.boot {
        Boot::Disk => "disk",
        Boot::Kernel { .. } => "kernel",
    };
    let source = match &img.manifest.source {
        img::Source::Pull { url, .. } => format!("pulled {url}"),
        img::Source::Build {
            suite,
            kernel_version,
            ..
        } => format!("built {suite}, kernel {kernel_version}"),
        img::Source::Import { from } => format!("imported {from}"),
    };
    format!(
        "{:<26} {:<6} {:>8.1} MiB  {}  {}",
        img.name,
        boot,
        img.manifest.disk_bytes as f64 / (1024.0 * 1024.0),
        img.manifest.created,
        source
    )
}

/// Run an `image` subcommand, printing results on stdout.
pub async fn run(dirs: &Dirs, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Pull {
            base_url,
            file,
            name,
        } => {
            let p = pull::pull(
                dirs,
                &pull::PullOptions {
                    base_url,
                    file,
                    name,
                },
            )
            .await?;
            let what = match p.outcome {
                pull::Outcome::UpToDate => "up to date".to_string(),
                pull::Outcome::Downloaded { bytes, secs } => {
                    format!("downloaded {bytes} bytes in {secs:.1}s")
                }
            };
            println!("{} ({what})", p.image.disk.display());
        }
        ImageCmd::Build {
            mirror,
            name,
            size_gib,
            packages,
        } => {
            let opts = build::BuildOptions {
                mirror,
                name,
                disk_size: build::disk_size_from_gib(size_gib)?,
                extra_packages: packages,
                ..Default::default()
            };
            let img = build::build(dirs, &opts).await?;
            println!("{}", img.dir.display());
        }
        ImageCmd::Import { path, name } => {
            let img = import::import(dirs, &path, name.as_deref()).await?;
            println!("{}", img.dir.display());
        }
        ImageCmd::List => {
            for img in store::list(dirs)? {
                println!("{}", describe(&img));
            }
        }
        ImageCmd::Rm { name } => store::rm(dirs, &name).await?,
    }
    Ok(())
}
