#!/bin/sh
# An interpreter for load.py / bench_calls.py --python: "-m sbc ..." runs under
# bench/tail_probe.py (what held up the loop, when); anything else is plain python.
here=$(dirname "$0")
if [ "$1" = "-m" ] && [ "$2" = "sbc" ]; then
    exec python "$here/tail_probe.py" run "$@"
fi
exec python "$@"
