//! `flo`: parses the command line and runs it; errors become exit codes.

use clap::Parser;
use flotilla_cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        eprintln!("flo: {error}");
        std::process::exit(error.exit_code());
    }
}
