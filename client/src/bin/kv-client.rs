//! `kv-client`: the capkv command line (see `kv-client --help`).
use clap::Parser;

// capnp-rpc makes several small heap objects per call (promises, question and answer
// entries, message segments): malloc and free were 8% of kv-server's profile, and
// mimalloc gave 10-18% more calls/s at 50 connections in back-to-back runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = capkv_client::cli::Cli::parse();
    std::process::ExitCode::from(capkv_client::app::main_with(cli))
}
