fn main() {
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { kto_train::util::alloc::tune_for_training() };
    if let Err(e) = kto_train::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(kto_train::cli::exit_code(&e));
    }
}
