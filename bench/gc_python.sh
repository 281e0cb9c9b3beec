#!/bin/sh
# An interpreter for bench_calls.py / load.py --python: "-m sbc ..." runs under
# bench/gc_pauses.py (every garbage collection timed); anything else is plain python. It is
# the python on PATH: activate the virtual environment first.
here=$(dirname "$0")
if [ "$1" = "-m" ] && [ "$2" = "sbc" ]; then
    exec python "$here/gc_pauses.py" run "$@"
fi
exec python "$@"
