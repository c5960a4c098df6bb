//! `ftvm image` subcommands.

use anyhow::Context;
use clap::{Args, Subcommand};

/// `ftvm image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a guest image (Debian's cloud kernel + a busybox initramfs) into the cache;
    /// does nothing if the cached image is valid.
    Build(BuildArgs),
    /// Show where a built image is and what it was built from.
    Show(ShowArgs),
}

/// Options of `ftvm image build`.
#[derive(Args)]
pub struct BuildArgs {
    /// Image name.
    #[arg(long, default_value = images::DEFAULT_IMAGE)]
    pub name: String,
    /// Rebuild even if the cached image is valid.
    #[arg(long)]
    pub force: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Options of `ftvm image show`.
#[derive(Args)]
pub struct ShowArgs {
    /// Image name.
    #[arg(long, default_value = images::DEFAULT_IMAGE)]
    pub name: String,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn describe(m: &images::Manifest) -> String {
    let pkgs: Vec<String> = m
        .packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    format!(
        "kernel {} ({}), vmlinuz {}, initrd.img {}",
        m.kernel_release,
        pkgs.join(", "),
        mib(m.kernel.size),
        mib(m.initrd.size)
    )
}

/// Runs one `ftvm image` subcommand; returns the process exit status.
pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Build(args) => {
            images::recipe(&args.name)?;
            let out = images::build(
                &args.name,
                images::BuildOptions {
                    progress: !args.quiet,
                    force: args.force,
                },
            )
            .with_context(|| format!("image {}", args.name))?;
            if out.built {
                let how = match out.rebuild_reason.as_deref() {
                    None | Some("not built yet") => "built".to_string(),
                    Some(why) => format!("rebuilt ({why})"),
                };
                println!(
                    "image {}: {how} in {:.1} s in {}: {}",
                    args.name,
                    out.elapsed.as_secs_f64(),
                    out.paths.dir.display(),
                    describe(&out.manifest)
                );
            } else {
                println!(
                    "image {}: cached image is valid, nothing downloaded ({}): {}",
                    args.name,
                    out.paths.dir.display(),
                    describe(&out.manifest)
                );
            }
            Ok(0)
        }
        ImageCommand::Show(args) => {
            images::recipe(&args.name)?;
            match images::cached_in(&images::cache_root(), &args.name) {
                Ok((paths, manifest)) => {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&manifest)?);
                    } else {
                        println!("image {}: {}", args.name, describe(&manifest));
                        println!("kernel: {}", paths.kernel.display());
                        println!("initrd: {}", paths.initrd.display());
                        println!("modules: {}", manifest.modules.join(" "));
                    }
                    Ok(0)
                }
                Err(why) => {
                    eprintln!(
                        "ftvm: image {}: {why} (build it with `ftvm image build --name {}`)",
                        args.name, args.name
                    );
                    Ok(1)
                }
            }
        }
    }
}
