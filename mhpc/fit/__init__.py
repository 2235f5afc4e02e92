"""The fit: mergeable state (``state``), the passes over one shard (``passes``) and the one schedule that
every fit, ``update`` and a Ray fit run (``driver``); see mhpc/fit/state.py for the contract."""
