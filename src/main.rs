fn main() {
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { kto_train::util::alloc::tune_for_training() };
    let result = kto_train::cli::main();
    let world = kto_train::dist::world_ref();
    if let Err(e) = result {
        let code = kto_train::cli::exit_code(&e);
        if world.size() == 1 {
            eprintln!("error: {e:#}");
            std::process::exit(code);
        }
        // A stop every rank agreed on (a signal) ends each rank normally, and rank 0 reports it;
        // any other error on one rank ends them all, so that none waits for it in a collective.
        let agreed = kto_train::cli::is_agreed_stop(&e);
        if world.rank() == 0 || !agreed {
            eprintln!("error: rank {} of {}: {e:#}", world.rank(), world.size());
        }
        if !agreed {
            world.abort(code);
        }
        kto_train::dist::finalize();
        std::process::exit(code);
    }
    kto_train::dist::finalize();
}
