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
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            cli::print_error("erofs-fanotify", &e);
            std::process::exit(1);
        }
    }
}
