//! `kv-client`: the capkv command line (see `kv-client --help`).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = capkv_client::cli::Cli::parse();
    std::process::ExitCode::from(capkv_client::cli::main_with(cli))
}
