//! The `caf-worker` binary: parse the command line, hand over to the library.

use clap::Parser;

// Frees of steps parsed on another thread are most of what glibc malloc
// costs here; see the `mimalloc` comment in Cargo.toml.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = caf_worker::commands::Cli::parse();
    std::process::exit(caf_worker::commands::main(cli));
}
