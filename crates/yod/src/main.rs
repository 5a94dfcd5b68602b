fn main() {
    std::process::exit(yod::cli::main());
}
