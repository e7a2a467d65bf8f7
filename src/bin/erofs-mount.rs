use clap::Parser;
use erofs_fanotify::cli::{self, mount_cmd};

fn main() {
    cli::init_cli_logging();
    let args = mount_cmd::MountArgs::parse();
    if let Err(e) = mount_cmd::run(args) {
        cli::print_error("erofs-mount", &e);
        std::process::exit(1);
    }
}
