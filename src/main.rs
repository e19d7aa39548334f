//! The `caf-worker` binary: parse the command line, hand over to the library.

use clap::Parser;

fn main() {
    let cli = caf_worker::commands::Cli::parse();
    std::process::exit(caf_worker::commands::main(cli));
}
