"""``python -m sw_hooks.cli``: the same as the ``sw-hooks`` command."""

from sw_hooks.cli import main

raise SystemExit(main())
