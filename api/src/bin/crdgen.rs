//! Writes the CRDs to stdout; `--write FILE...` writes each FILE (a CRD
//! named by its file name, e.g. `webhooklisteners.spillway.dev.yaml`; the
//! chart's `templates/crds.yaml`; or for a `.md` FILE the generated API
//! reference); `--check FILE...` fails when
//! any FILE differs from what would be generated.

use std::process::ExitCode;

fn main() -> ExitCode {
    let crds = match spillway_api::crd_files() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reference = match spillway_api::reference::markdown() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("crdgen: cannot render the reference: {e}");
            return ExitCode::FAILURE;
        }
    };
    let all = crds
        .iter()
        .map(|(_, y)| y.as_str())
        .collect::<Vec<_>>()
        .join("---\n");
    let template = match spillway_api::chart_crds_template() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("crdgen: cannot render the chart's CRD template: {e}");
            return ExitCode::FAILURE;
        }
    };
    let content = |f: &str| -> &str {
        if f.ends_with(".md") {
            return &reference;
        }
        if f.ends_with("templates/crds.yaml") {
            return &template;
        }
        crds.iter()
            .find(|(name, _)| f.ends_with(name))
            .map_or(all.as_str(), |(_, y)| y.as_str())
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        None => {
            print!("{all}");
            ExitCode::SUCCESS
        }
        Some((flag, files)) if flag == "--check" && !files.is_empty() => {
            let mut ok = true;
            for f in files {
                match std::fs::read_to_string(f) {
                    Ok(s) if s == content(f) => {}
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
                if let Err(e) = std::fs::write(f, content(f)) {
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
