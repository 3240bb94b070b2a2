//! The thin CLI: parse, call the library, print, exit with the error's code.

mod cli;

fn main() {
    let code = cli::main();
    std::process::exit(code);
}
