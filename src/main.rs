//! `cairn`: the command line. It parses arguments and hands over to the
//! gateway and node crates; nothing else lives here.

use std::process::ExitCode;

const USAGE: &str = "\
cairn — indestructible, multi-site, encrypted object storage

usage: cairn <command>

commands:
  version    print the version and the formats this build speaks
  help       print this text

The swarm node (`cairn serve`), the administration commands (`cairn admin`)
and the local multi-site cluster (`cairn dev`) are not in this build yet.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("version" | "-V" | "--version") => {
            let protocol = cairn_gateway::node::protocol::wire::PROTOCOL_NAME;
            let manifest = cairn_gateway::node::protocol::manifest::FORMAT_VERSION;
            println!("cairn {}", env!("CARGO_PKG_VERSION"));
            println!("piece exchange: {protocol}; manifest format: {manifest}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("cairn: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
