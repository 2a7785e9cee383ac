//! Compiles the wire contract. `capnp` (Debian package `capnproto`) must be on PATH;
//! scripts/setup.sh installs it.
fn main() {
    println!("cargo:rerun-if-changed=kv.capnp");
    if let Err(e) = capnpc::CompilerCommand::new().file("kv.capnp").run() {
        // A build script can only report by panicking; say what to do about it.
        panic!("capnp schema compile failed: {e}. Is the `capnp` tool installed (apt-get install -y capnproto)?");
    }
}
