//! Writes the seed corpus under `corpus/<target>/seed-*` (libFuzzer adds what it finds
//! beside them).

fn main() -> std::process::ExitCode {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    match lazysnap_fuzz::seeds::write_seeds(&root) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writing seeds: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
