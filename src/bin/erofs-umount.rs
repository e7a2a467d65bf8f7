use clap::Parser;
use erofs_fanotify::cli::{self, umount_cmd};

fn main() {
    cli::init_cli_logging();
    let args = umount_cmd::UmountArgs::parse();
    if let Err(e) = umount_cmd::run(args) {
        cli::print_error("erofs-umount", &e);
        std::process::exit(1);
    }
}
