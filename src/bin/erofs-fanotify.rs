use std::path::PathBuf;

use clap::{Parser, Subcommand};
use erofs_fanotify::cli::{self, agent_cmd, status_cmd};

#[derive(Parser)]
#[command(name = "erofs-fanotify", version, about = "Lazy EROFS mounts backed by fanotify pre-content events")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show every mount (or one): source, bytes present, fetches, agent
    Status {
        mountpoint: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Mount a local EROFS image file-backed, without an agent (for comparisons)
    #[command(hide = true)]
    MountFile {
        image: PathBuf,
        mountpoint: PathBuf,
        #[arg(long, default_value_t = 512)]
        read_ahead_kb: u32,
    },
    /// Run the agent (started by erofs-mount; reads its config on stdin)
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        foreground: bool,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Status { mountpoint, json } => {
            cli::init_cli_logging();
            status_cmd::run(mountpoint, json).map(|_| 0)
        }
        Cmd::Agent { foreground } => agent_cmd::run(foreground),
        Cmd::MountFile { image, mountpoint, read_ahead_kb } => {
            cli::init_cli_logging();
            mount_file(&image, &mountpoint, read_ahead_kb).map(|_| 0)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            cli::print_error("erofs-fanotify", &e);
            std::process::exit(1);
        }
    }
}

fn mount_file(image: &std::path::Path, mountpoint: &std::path::Path, read_ahead_kb: u32) -> Result<(), cli::CliError> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| cli::CliError::new(format!("cannot find {}: {e}", image.display())))?;
    erofs_fanotify::sys::mount::mount_erofs_file(&image, mountpoint, Some(read_ahead_kb))
        .map(|_| ())
        .map_err(|e| cli::CliError::new(format!("cannot mount {}: {e}", image.display())))
}
