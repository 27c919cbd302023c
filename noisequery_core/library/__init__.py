"""The seed library on disk: storage, manifest, name confinement, filling it (import, build) and upkeep.

Modules: ``storage`` (column files + committed row count, writer lock), ``manifest`` (schema, generation
key, feature set), ``paths`` (names from workflows → folders), ``ingest`` (a folder of seed-named images),
``build`` (rows from an injected renderer), ``maintenance`` (verify, merge). Import from the modules.
"""
