"""``python -m modelcache_kserve --store URL --model-class pkg.mod:Class --device-budget SIZE``."""

from ._cli import main

raise SystemExit(main())
