fn main() {
    if let Err(e) = kto_train::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
