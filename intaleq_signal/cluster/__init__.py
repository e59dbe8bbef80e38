"""Several instances sharing sessions through Redis (docs/design.md,
"Several instances"): :mod:`.records` (keys, records, inbox entries and Lua
scripts as data, no I/O) and :mod:`.node` (the I/O). Imported only when
``REDIS_URL`` is set."""
