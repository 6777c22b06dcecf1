"""``python -m ltzoo.hub_server``: serve a local Hub until Ctrl-C."""

from .server import main

raise SystemExit(main())
