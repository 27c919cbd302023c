"""ComfyUI entry point of the NoiseQuery pack (V3 node API: one ComfyExtension, comfy_entrypoint).

Only ComfyUI imports this file. pytest never does (tests/pytest.ini puts the repository root
on sys.path instead, and there is no tests/__init__.py).
"""

from __future__ import annotations

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():  # type: ignore[no-untyped-def]
    from comfy_api.latest import ComfyExtension

    from .nodes import NODE_CLASSES, server_routes

    server_routes.register()  # the library browser's /noisequery/ routes; a no-op without a server

    class NoiseQueryExtension(ComfyExtension):
        async def get_node_list(self):  # type: ignore[no-untyped-def]
            return list(NODE_CLASSES)

    return NoiseQueryExtension()
