use clap::Parser;

fn main() {
    let cli = pct::cli::PctCli::parse();
    std::process::exit(pct::cli::main_with(cli));
}
