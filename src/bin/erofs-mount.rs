use clap::Parser;
use erofs_fanotify::cli::{self, helper, mount_cmd};

fn main() {
    cli::init_cli_logging();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Through the `mount.erofs.fanotify` link, mount(8) calls us with its helper convention.
    let (prog, args) = match argv.first() {
        Some(argv0) if helper::invoked_as_helper(argv0) => match helper::parse_helper_args(&argv[1..]) {
            Ok(inv) if inv.fake => std::process::exit(0),
            Ok(inv) => (helper::HELPER_NAME, inv.args),
            Err(e) => {
                cli::print_error(helper::HELPER_NAME, &e);
                // mount(8) helpers: 1 = incorrect invocation.
                std::process::exit(1);
            }
        },
        _ => ("erofs-mount", mount_cmd::MountArgs::parse()),
    };
    if let Err(e) = mount_cmd::run(args) {
        cli::print_error(prog, &e);
        std::process::exit(1);
    }
}
