//! Runs the fuzz targets on stable Rust: every file of each target's corpus, then
//! pseudo-random inputs built from the target's dictionary.
//!
//! ```text
//! replay [--random N] [--seed S] [TARGET [FILE...]]
//! ```
//!
//! With no TARGET, all targets run. With FILEs, only those inputs run (for example a
//! crash file saved by `cargo fuzz`). A failing random input is saved under
//! `fuzz/artifacts/TARGET/`; any failure makes the exit status 1.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use postern_fuzz::{Target, XorShift, random_input};

const USAGE: &str = "usage: replay [--random N] [--seed S] [TARGET [FILE...]]";

struct Options {
    random: usize,
    seed: u64,
    targets: Vec<Target>,
    files: Vec<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { random: 10_000, seed: 1, targets: Target::ALL.to_vec(), files: Vec::new() };
    let mut args = std::env::args().skip(1);
    let mut target = None;
    while let Some(arg) = args.next() {
        let mut number = |name: &str| {
            args.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("{name} needs a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--random" => options.random = number("--random")? as usize,
            "--seed" => options.seed = number("--seed")?,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ if target.is_none() => {
                let names: Vec<_> = Target::ALL.iter().map(|t| t.name()).collect();
                target = Some(
                    Target::from_name(&arg)
                        .ok_or_else(|| format!("unknown target {arg:?}; targets: {}", names.join(", ")))?,
                );
            }
            _ => options.files.push(PathBuf::from(arg)),
        }
    }
    if let Some(target) = target {
        options.targets = vec![target];
    }
    Ok(options)
}

fn fuzz_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `target`'s corpus, sorted; none if the folder is missing.
fn corpus(target: Target) -> std::io::Result<Vec<PathBuf>> {
    let dir = fuzz_dir().join("corpus").join(target.name());
    let mut files = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.retain(|p| p.is_file());
    files.sort();
    Ok(files)
}

/// Runs one input; returns whether it passed (a failure's panic message is printed).
fn passes(target: Target, input: &[u8]) -> bool {
    panic::catch_unwind(AssertUnwindSafe(|| target.run(input))).is_ok()
}

/// Saves a failing generated input where `cargo fuzz` keeps its crashes.
fn save_artifact(target: Target, input: &[u8], name: &str) -> String {
    let dir = fuzz_dir().join("artifacts").join(target.name());
    let path = dir.join(name);
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        Ok(()) => format!("input saved to {}", path.display()),
        Err(e) => format!("cannot save the input: {e}"),
    }
}

/// Runs `target` over its inputs; stops at the first failure.
fn run_target(target: Target, options: &Options) -> Result<String, String> {
    let explicit = !options.files.is_empty();
    let files = if explicit {
        options.files.clone()
    } else {
        corpus(target).map_err(|e| format!("cannot read corpus: {e}"))?
    };
    for file in &files {
        let input = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if !passes(target, &input) {
            return Err(format!("{} failed", file.display()));
        }
    }
    if explicit {
        return Ok(format!("{} files", files.len()));
    }
    let mut rng = XorShift::new(options.seed);
    for i in 0..options.random {
        let input = random_input(target, &mut rng);
        if !passes(target, &input) {
            let saved = save_artifact(target, &input, &format!("replay-seed{}-{i}", options.seed));
            return Err(format!("random input {i} of seed {} failed; {saved}", options.seed));
        }
    }
    Ok(format!("{} corpus files, {} random inputs", files.len(), options.random))
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for &target in &options.targets {
        match run_target(target, &options) {
            Ok(summary) => {
                passed += 1;
                println!("replay: {}: ok ({summary})", target.name());
            }
            Err(message) => {
                failed += 1;
                println!("replay: {}: FAILED: {message}", target.name());
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
