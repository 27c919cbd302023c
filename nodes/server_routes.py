"""The library browser's JSON routes under /noisequery/ on ComfyUI's server (aiohttp glue over search/service.py).

    GET  /noisequery/libraries                      every library: size, model, resolution, what it can answer
    POST /noisequery/query        {library, text, …, offset, limit}  → a page of ranked hits
    GET  /noisequery/thumbnail?library=NAME&seed=N  the entry's stored thumbnail (by name + seed, never a path)

ComfyUI also serves each under /api/… (the frontend's api.fetchApi adds that prefix). Bad requests get a 400
with {"error": message}; a seed that is not in the library a 404. Searching and reading run in this module's
worker threads, never on the server's event loop, so the page and the prompt queue stay responsive.
Kept in sync with web/js/noisequery_library_panel.js (the only client the pack ships).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..noisequery_core.errors import NoiseQueryError, QueryError
from ..noisequery_core.library.manifest import ClipIdentity
from ..noisequery_core.search.clip import spec_for_identity
from ..noisequery_core.search.query import TextEncoder
from ..noisequery_core.search.service import BODY_MAX, LibraryService
from . import _host

log = logging.getLogger("noisequery")

PREFIX = "/noisequery"
# Queries: two threads (a text query and a colour query side by side on a 2-core machine; each library's
# Searcher is locked by the service). Thumbnails get their own threads so a slow query never holds up a grid.
_query_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="noisequery-query")
_thumb_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="noisequery-thumb")
_THUMB_PARAMS = {"library", "seed", "v"}  # v: the library's version, only there to make the URL cache-safe

_service: LibraryService | None = None
_registered = False


def _load_encoder(identity: ClipIdentity) -> TextEncoder:
    return _host.embedder_for(spec_for_identity(identity))


def service() -> LibraryService:
    """The process's one LibraryService over the registered noise_libraries folders."""
    global _service
    if _service is None:
        _service = LibraryService(_host.library_roots, _load_encoder)
    return _service


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _answer(pool: ThreadPoolExecutor, fn: Callable[[], Any], ok: Callable[[Any], web.StreamResponse]) -> web.StreamResponse:
    """Run ``fn`` in ``pool`` and shape its result or its refusal (400 / 404 with the message; 500 logged)."""
    try:
        result = await asyncio.get_running_loop().run_in_executor(pool, fn)
    except NoiseQueryError as exc:
        return _error(400, str(exc))
    except LookupError as exc:
        return _error(404, str(exc.args[0]) if exc.args else "not found")
    except Exception as exc:  # the server keeps serving; the user sees what failed
        log.exception("noisequery route failed")
        return _error(500, f"NoiseQuery failed on this request ({exc.__class__.__name__}: {str(exc)[:300]}); see the server log.")
    return ok(result)


def _refuse_constant(name: str) -> Any:
    raise QueryError(f"The request holds {name}, which is not a number JSON allows; send finite numbers only.")


async def _read_json(request: web.Request) -> Any:
    """The request body as JSON: at most BODY_MAX bytes, no NaN/Infinity; QueryError otherwise."""
    if request.content_length is not None and request.content_length > BODY_MAX:
        raise QueryError(f"The request body is {request.content_length} bytes; at most {BODY_MAX} are accepted.")
    raw = await request.content.read(BODY_MAX + 1)
    if len(raw) > BODY_MAX:
        raise QueryError(f"The request body is larger than {BODY_MAX} bytes.")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise QueryError("The request body is not UTF-8 text; send JSON.") from None
    except json.JSONDecodeError as exc:
        raise QueryError(f"The request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}).") from None


async def libraries(request: web.Request) -> web.StreamResponse:
    return await _answer(_thumb_pool, service().libraries, web.json_response)


async def query(request: web.Request) -> web.StreamResponse:
    try:
        body = await _read_json(request)
    except QueryError as exc:
        return _error(400, str(exc))
    return await _answer(_query_pool, lambda: service().query(body), web.json_response)


async def thumbnail(request: web.Request) -> web.StreamResponse:
    params = request.rel_url.query
    unknown = sorted(set(params) - _THUMB_PARAMS)
    if unknown or any(len(params.getall(k)) > 1 for k in params):
        return _error(400, f"The thumbnail URL takes library, seed (and v) once each; got {', '.join(sorted(params)) or 'nothing'}.")
    if "library" not in params or "seed" not in params:
        return _error(400, "The thumbnail URL needs ?library=<name>&seed=<seed>.")

    def ok(result: tuple[bytes, str]) -> web.Response:
        data, mime = result
        # a seed's thumbnail never changes within a library version (the URL carries v=<version>)
        return web.Response(body=data, content_type=mime, headers={"Cache-Control": "private, max-age=86400"})

    return await _answer(_thumb_pool, lambda: service().thumbnail(params["library"], params["seed"]), ok)


def add_routes(routes: web.RouteTableDef) -> None:
    """Put the pack's routes on ``routes`` (ComfyUI's PromptServer.instance.routes, or a test's own table)."""
    routes.get(f"{PREFIX}/libraries")(libraries)
    routes.post(f"{PREFIX}/query")(query)
    routes.get(f"{PREFIX}/thumbnail")(thumbnail)


def register() -> bool:
    """Register the routes on ComfyUI's running server; False (and nothing done) without one, e.g. in-process tests."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError as exc:  # ComfyUI embedded without its server module
        log.debug("no ComfyUI server: the library browser routes are not registered (%s)", exc)
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if not isinstance(routes, web.RouteTableDef):
        log.debug("ComfyUI has no server instance: the library browser routes are not registered")
        return False
    add_routes(routes)
    _registered = True
    return True
