//! A rank that attaches to the QK fabric its PCT created (`PUMA_QK_FD`) and says
//! so: `yod -n 4 target/debug/examples/qk_attach`. Used by yod's tests to check
//! the PCT → QK seam end to end.

fn main() {
    match qk::Endpoint::from_env() {
        Ok(ep) => println!("rank {} attached to the QK fabric", ep.rank()),
        Err(e) => {
            eprintln!("qk_attach: {e}");
            std::process::exit(1);
        }
    }
}
