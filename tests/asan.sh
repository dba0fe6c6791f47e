#!/usr/bin/env bash
# The C extension (src/walex/_accel/_speedups.c) under AddressSanitizer and
# UndefinedBehaviorSanitizer: an out-of-bounds read on a damaged frame, a
# use-after-free or an overflow stops the run with a report, where the plain
# build might go on with a wrong value.
#
#   tests/asan.sh                    # the C-facing tests, 10x the property-test examples
#   WALEX_TEST_FUZZ=50 tests/asan.sh # a longer search
#   tests/asan.sh -k damaged         # more pytest arguments
#
# Needs gcc with libasan (Debian: gcc). The sanitized build goes into a
# temporary copy of src/; the checkout and its installed build are untouched.
# Postgres, started by the tests, runs without the sanitizer. pytest captures
# sys.stdout/stderr only, so that a report on file descriptor 2 is seen.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cp -r "$root/src" "$work/src"
inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
so="$work/src/walex/_accel/_speedups$suffix"
gcc -shared -fPIC -g -O1 -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -I"$inc" "$root/src/walex/_accel/_speedups.c" -o "$so"
asan=$(gcc -print-file-name=libasan.so)

# The sanitizer runtime must be loaded first, into Python only: the
# interpreter drops LD_PRELOAD at start-up, so that the Postgres servers and
# tools the tests start do not inherit it.
mkdir "$work/site"
echo 'import os; os.environ.pop("LD_PRELOAD", None)' >"$work/site/sitecustomize.py"

export LD_PRELOAD="$asan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
# Every Python object its own malloc, so that reading past a bytes object
# hits a red zone instead of the next object in a pymalloc arena.
export PYTHONMALLOC=malloc
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$work/site:$work/src"
export WALEX_TEST_FUZZ="${WALEX_TEST_FUZZ:-10}"
cd "$root"
python -c "
import walex._accel._speedups as s, sys
if not s.__file__.startswith('$work'):
    sys.exit(f'the sanitized build is not the one imported: {s.__file__}')
print('sanitized build:', s.__file__)
"
python -m pytest -p no:cacheprovider -q --capture=sys \
    tests/pgoutput/test_decoder.py tests/test_values_json.py tests/test_transactions_fast_path.py tests/test_transactions.py \
    tests/test_values.py tests/test_events_identity.py tests/test_stream.py tests/test_transactions_protocol.py \
    tests/test_wire.py tests/test_wire_encoder.py "$@"
