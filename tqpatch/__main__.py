"""``python -m tqpatch <command>``: the same as the ``tqpatch`` console script."""

from .cli import main

raise SystemExit(main())
