//! Release hygiene that can be checked without a release: the licence and
//! the licences of every dependency (the allow-list in deny.toml, evaluated
//! here on `cargo metadata` so it runs without cargo-deny and offline), the
//! MSRV (`rust-version`) against what the dependencies declare and the
//! toolchain the image builds with, the Dockerfile's build step, and the
//! changelog's format.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use spillway_tests::root;

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The host's target triple (`rustc -vV`).
fn host() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host")
}

/// `cargo metadata` of the workspace for the host platform, from
/// Cargo.lock (`--locked`) and the local crate cache (`--offline`: the
/// build has downloaded every crate the host needs).
fn metadata() -> Result<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            &host()?,
            "--manifest-path",
        ])
        .arg(root().join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `(package, version, licence)` of every dependency (not the workspace's
/// own crates).
fn dependencies(meta: &Value) -> Vec<(String, String, Value)> {
    let members: Vec<&Value> = meta["workspace_members"]
        .as_array()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| !members.contains(&&p["id"]))
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["version"].as_str().unwrap_or_default().to_owned(),
                p.clone(),
            )
        })
        .collect()
}

/// The quoted strings of `allow = [...]` in deny.toml's `[licenses]`
/// (comments after them allowed).
fn deny_allow_list(deny: &str) -> Result<Vec<String>> {
    let section = deny
        .split("\n[licenses]")
        .nth(1)
        .context("deny.toml has [licenses]")?;
    let list = section
        .split("allow = [")
        .nth(1)
        .and_then(|s| s.split("\n]").next())
        .context("[licenses] has allow = [ ... ]")?;
    Ok(list
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect())
}

/// Whether an SPDX licence expression (`A OR B`, `A AND B`, `A WITH E`,
/// parentheses, and the legacy `A/B` for OR) is satisfied by `allowed`.
fn spdx_allowed(expr: &str, allowed: &[String]) -> Result<bool> {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut pos = 0;
    let ok = or_expr(&tokens, &mut pos, allowed)?;
    ensure!(pos == tokens.len(), "trailing tokens in {expr:?}");
    Ok(ok)
}

fn or_expr(t: &[&str], pos: &mut usize, allowed: &[String]) -> Result<bool> {
    let mut v = and_expr(t, pos, allowed)?;
    while t.get(*pos) == Some(&"OR") {
        *pos += 1;
        v |= and_expr(t, pos, allowed)?;
    }
    Ok(v)
}

fn and_expr(t: &[&str], pos: &mut usize, allowed: &[String]) -> Result<bool> {
    let mut v = atom(t, pos, allowed)?;
    while t.get(*pos) == Some(&"AND") {
        *pos += 1;
        v &= atom(t, pos, allowed)?;
    }
    Ok(v)
}

fn atom(t: &[&str], pos: &mut usize, allowed: &[String]) -> Result<bool> {
    let Some(tok) = t.get(*pos) else {
        bail!("licence expression ends early")
    };
    *pos += 1;
    if *tok == "(" {
        let v = or_expr(t, pos, allowed)?;
        ensure!(t.get(*pos) == Some(&")"), "unclosed parenthesis");
        *pos += 1;
        return Ok(v);
    }
    let mut id = (*tok).to_owned();
    if t.get(*pos) == Some(&"WITH") {
        let exception = t.get(*pos + 1).context("WITH without an exception")?;
        id = format!("{id} WITH {exception}");
        *pos += 2;
    }
    Ok(allowed.contains(&id))
}

#[test]
fn spdx_expressions_are_evaluated_like_cargo_deny() -> Result<()> {
    let allowed = vec!["MIT".to_owned(), "Apache-2.0".to_owned()];
    for (expr, want) in [
        ("MIT", true),
        ("GPL-3.0", false),
        ("MIT OR GPL-3.0", true),
        ("MIT AND GPL-3.0", false),
        ("(Apache-2.0 OR MIT) AND BSD-3-Clause", false),
        ("(Apache-2.0 OR MIT) AND (MIT OR BSD-3-Clause)", true),
        ("Apache-2.0/MIT", true),
        ("Apache-2.0 WITH LLVM-exception", false),
        ("Apache-2.0 WITH LLVM-exception OR MIT", true),
    ] {
        assert_eq!(spdx_allowed(expr, &allowed)?, want, "{expr}");
    }
    assert!(spdx_allowed("(MIT", &allowed).is_err());
    Ok(())
}

#[test]
fn every_dependency_licence_is_on_the_deny_allow_list() -> Result<()> {
    let allowed = deny_allow_list(&read("deny.toml"))?;
    assert!(allowed.contains(&"Apache-2.0".to_owned()), "{allowed:?}");
    let meta = metadata()?;
    let mut refused = Vec::new();
    let mut used: BTreeMap<&str, usize> = BTreeMap::new();
    let deps = dependencies(&meta);
    assert!(deps.len() > 100, "{} dependencies", deps.len());
    for (name, version, p) in &deps {
        let Some(expr) = p["license"].as_str() else {
            refused.push(format!(
                "{name} {version}: no SPDX licence (cargo-deny needs a clarification)"
            ));
            continue;
        };
        if !spdx_allowed(expr, &allowed)? {
            refused.push(format!("{name} {version}: {expr}"));
        }
        for a in &allowed {
            if expr.contains(a.as_str()) {
                *used.entry(a.as_str()).or_default() += 1;
            }
        }
    }
    assert!(
        refused.is_empty(),
        "licences not allowed by deny.toml: {refused:#?}"
    );
    // Every allowed licence is some crate's (cargo-deny warns otherwise).
    for a in &allowed {
        assert!(used.contains_key(a.as_str()), "{a} is allowed but unused");
    }
    // Spillway's own licence, and the file that carries it.
    let license = read("LICENSE");
    assert!(
        license.contains("Apache License") && license.contains("Version 2.0, January 2004"),
        "LICENSE is the Apache License 2.0"
    );
    assert!(
        license.contains("END OF TERMS AND CONDITIONS"),
        "the full text"
    );
    assert!(read("Cargo.toml").contains("license = \"Apache-2.0\""));
    Ok(())
}

/// `major.minor` of a version such as `1.89`, `1.89.0` or `1.95-slim`.
fn minor_version(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The MSRV is declared, true for the dependency tree, and not above the
/// toolchain the image (and a rust-toolchain file, if one is added) builds
/// with. Standard-library APIs newer than it are refused by clippy's
/// `incompatible_msrv` lint in `make lint` (-D warnings); building with that
/// exact toolchain is not checked (only the current one is installed).
#[test]
fn rust_version_is_true_for_the_dependencies_and_the_toolchains() -> Result<()> {
    let cargo = read("Cargo.toml");
    let declared = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .context("[workspace.package] sets rust-version")?;
    let msrv = minor_version(declared).context("rust-version is major.minor")?;
    let meta = metadata()?;
    let members: Vec<&Value> = meta["workspace_members"]
        .as_array()
        .context("members")?
        .iter()
        .collect();
    for p in meta["packages"].as_array().context("packages")? {
        if members.contains(&&p["id"]) {
            assert_eq!(
                p["rust_version"].as_str(),
                Some(declared),
                "{} takes rust-version from the workspace",
                p["name"]
            );
        }
    }
    let mut newest = (0, 0);
    let mut too_new = Vec::new();
    for (name, version, p) in dependencies(&meta) {
        let Some(v) = p["rust_version"].as_str().and_then(minor_version) else {
            continue;
        };
        newest = newest.max(v);
        if v > msrv {
            too_new.push(format!("{name} {version} needs Rust {}.{}", v.0, v.1));
        }
    }
    assert!(
        too_new.is_empty(),
        "rust-version {declared} is below what dependencies need: {too_new:#?}"
    );
    eprintln!(
        "rust-version {declared}; the newest a dependency declares: {}.{}",
        newest.0, newest.1
    );
    // The image builds with a toolchain at least that new.
    let dockerfile = read("Dockerfile");
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM docker.io/library/rust:"))
        .context("the build stage uses the rust image")?;
    let toolchain = minor_version(image).context("rust image tag")?;
    assert!(toolchain >= msrv, "rust:{image} is older than {declared}");
    // A pinned toolchain, if the repository gets one, is the MSRV.
    for file in ["rust-toolchain", "rust-toolchain.toml"] {
        if let Ok(text) = std::fs::read_to_string(root().join(file)) {
            let channel = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("channel = \""))
                .map(|l| l.trim_end_matches('"'))
                .unwrap_or(text.trim());
            assert_eq!(minor_version(channel), Some(msrv), "{file}: {channel}");
        }
    }
    Ok(())
}

/// The image builds the binaries the chart runs and the operator starts,
/// with BuildKit cache mounts (the Dockerfile cannot be built here: no
/// Docker; this checks what it asks for).
#[test]
fn dockerfile_builds_every_binary_with_cache_mounts() -> Result<()> {
    let d = read("Dockerfile");
    assert!(
        d.starts_with("# syntax=docker/dockerfile:1\n"),
        "RUN --mount needs the BuildKit frontend"
    );
    for mount in [
        "--mount=type=cache,target=/usr/local/cargo/registry",
        "--mount=type=cache,target=/src/target",
    ] {
        assert!(d.contains(mount), "{mount}");
    }
    assert!(
        d.contains("WORKDIR /src"),
        "the cached target is the build's"
    );
    assert!(d.contains("cargo build --release --locked"));
    let meta = metadata()?;
    for package in [
        "spillway-operator",
        "spillway-gateway",
        "spillway-processor",
        "spillway-cli",
    ] {
        assert!(d.contains(&format!("-p {package}")), "builds {package}");
        let p = meta["packages"]
            .as_array()
            .context("packages")?
            .iter()
            .find(|p| p["name"] == package)
            .with_context(|| package.to_owned())?;
        for t in p["targets"].as_array().context("targets")? {
            if t["kind"] == serde_json::json!(["bin"]) {
                let bin = t["name"].as_str().context("bin name")?;
                assert!(
                    d.contains(&format!("target/release/{bin} "))
                        || d.contains(&format!("target/release/{bin}\n")),
                    "copies {bin}"
                );
            }
        }
    }
    assert!(d.contains("ENTRYPOINT [\"/usr/local/bin/spillway-processor\"]"));
    assert!(d.contains("USER 65532:65532"));
    Ok(())
}

#[test]
fn changelog_follows_keep_a_changelog() {
    let c = read("CHANGELOG.md");
    assert!(c.starts_with("# Changelog\n"));
    assert!(c.contains("https://keepachangelog.com/en/1.1.0/"));
    let headings: Vec<&str> = c.lines().filter(|l| l.starts_with("## ")).collect();
    assert_eq!(headings.first(), Some(&"## [Unreleased]"), "{headings:?}");
    for l in c.lines().filter(|l| l.starts_with("### ")) {
        assert!(
            [
                "### Added",
                "### Changed",
                "### Deprecated",
                "### Removed",
                "### Fixed",
                "### Security"
            ]
            .contains(&l),
            "{l} is not a Keep a Changelog section"
        );
    }
    assert!(c.contains("[Unreleased]: "), "the Unreleased link");
    for f in ["CONTRIBUTING.md", "SECURITY.md"] {
        assert!(!read(f).is_empty(), "{f}");
    }
    assert!(read("SECURITY.md").contains("docs/security.md"));
}

/// hack/krew/spillway.yaml is a krew Plugin manifest for `kubectl spillway`
/// on linux and macOS, amd64 and arm64, each installing kubectl-spillway.
#[test]
fn krew_manifest_names_the_plugin_and_its_binary_per_platform() -> Result<()> {
    let m: Value = serde_saphyr::from_str(&read("hack/krew/spillway.yaml"))?;
    assert_eq!(
        m["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(m["kind"], "Plugin");
    assert_eq!(m["metadata"]["name"], "spillway");
    let spec = &m["spec"];
    assert!(spec["version"].as_str().is_some_and(|v| v.starts_with('v')));
    assert!(
        spec["shortDescription"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    let mut seen = Vec::new();
    for p in spec["platforms"].as_array().context("platforms")? {
        let labels = &p["selector"]["matchLabels"];
        let os = labels["os"].as_str().context("os")?;
        let arch = labels["arch"].as_str().context("arch")?;
        assert_eq!(p["bin"], "kubectl-spillway", "{os}/{arch}");
        assert!(
            p["files"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["from"] == "kubectl-spillway")),
            "{os}/{arch} installs the binary"
        );
        let uri = p["uri"].as_str().context("uri")?;
        assert!(
            uri.starts_with("https://") && uri.contains(&format!("{os}_{arch}")),
            "{uri}"
        );
        let sha = p["sha256"].as_str().context("sha256")?;
        assert!(
            sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
            "{os}/{arch}: sha256 {sha}"
        );
        seen.push(format!("{os}/{arch}"));
    }
    seen.sort();
    assert_eq!(
        seen,
        ["darwin/amd64", "darwin/arm64", "linux/amd64", "linux/arm64"]
    );
    Ok(())
}
