"""The seed library on disk: storage, manifest, name confinement, filling it (import, build) and upkeep.

Modules: ``storage`` (column files + committed row count, writer lock), ``manifest`` (schema, generation
key, feature set), ``paths`` (names from workflows → folders), ``ingest`` (a folder of seed-named images),
``build`` (rows from an injected renderer), ``maintenance`` (verify, merge), ``upgrade`` (recompute the
colour columns of an older library), ``safefs`` (every file access inside a library: no links followed,
own temp files only). Import from the modules.
"""
