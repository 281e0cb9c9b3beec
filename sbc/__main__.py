"""``python -m sbc``: the same as the ``sbc`` command."""

from sbc.ops.cli import main

raise SystemExit(main())
