//! Writes the WebhookEndpoint CRD to stdout, or with `--check FILE...`
//! fails when any FILE differs from what would be generated.

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match spillway_api::crd_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some((flag, files)) if flag == "--check" && !files.is_empty() => {
            let mut ok = true;
            for f in files {
                match std::fs::read_to_string(f) {
                    Ok(s) if s == yaml => {}
                    Ok(_) => {
                        eprintln!("crdgen: {f} is out of date; run `make crds` and commit it");
                        ok = false;
                    }
                    Err(e) => {
                        eprintln!("crdgen: cannot read {f}: {e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some((flag, files)) if flag == "--write" && !files.is_empty() => {
            for f in files {
                if let Err(e) = std::fs::write(f, &yaml) {
                    eprintln!("crdgen: cannot write {f}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: crdgen [--check FILE... | --write FILE...]");
            ExitCode::from(2)
        }
    }
}
