#!/usr/bin/env bash
# Short fuzzing pass over every target (or the ones named).
#
#   fuzz/smoke.sh [SECONDS] [TARGET...]
#
# With cargo-fuzz and a nightly toolchain, runs each target under libFuzzer for SECONDS
# (default 10), seeded from fuzz/corpus/TARGET; what it discovers goes to a scratch
# folder, so the committed seeds stay small. Without them, falls back to the stable-Rust
# replayer with about 20,000 random inputs per second asked for. Stops at the first
# crash with a non-zero status; the crashing input is saved under fuzz/artifacts/TARGET/.
# Set POSTERN_FUZZ_STABLE=1 to use the replayer even where cargo-fuzz is installed.
set -euo pipefail

seconds="${1:-10}"
shift || true
cd "$(dirname "$0")"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(imap_preauth pop3_preauth smtp_preauth sasl proxy_header)
fi

have_nightly() { rustup toolchain list 2>/dev/null | grep -q '^nightly'; }
have_cargo_fuzz() { cargo +nightly fuzz --version >/dev/null 2>&1; }

if [ -z "${POSTERN_FUZZ_STABLE:-}" ] && have_nightly && have_cargo_fuzz; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    for target in "${targets[@]}"; do
        mkdir -p "$scratch/$target"
        echo "smoke: $target for ${seconds}s under libFuzzer"
        cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
            -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    done
else
    echo "smoke: running the stable replayer (no cargo-fuzz or nightly, or POSTERN_FUZZ_STABLE set)" >&2
    for target in "${targets[@]}"; do
        cargo run --quiet --bin replay -- --random $((seconds * 20000)) "$target"
    done
fi
