"""HTTP route for the pack's frontend extension (web/psa.js): the presets of every section and the
problems met while reading the presets files, in English and Chinese."""
from __future__ import annotations

import logging

from .messages import zh

log = logging.getLogger("psa")
ROUTE = "/psa/presets"
_registered = False


def problem_texts(lib) -> list[str]:
    """The library's loading problems as lines of text, in the store's own form
    (``file (line N): field: message``)."""
    return [str(p) for p in lib.problems]


def presets_payload(lib) -> dict:
    """What the frontend needs: every section's presets (as YAML fields) and the problems."""
    sections = {}
    for name, section in lib.sections.items():
        sections[name] = {"default": section.default_attention,
                          "presets": {p: c.to_dict() for p, c in section.attention_configs.items()}}
    return {"sections": sections, "problems": [{"en": t, "zh": zh(t)} for t in problem_texts(lib)]}


def register(store) -> None:
    """Add the route to ComfyUI's server once; without a server (tests outside ComfyUI) do nothing."""
    global _registered
    if _registered:
        return
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return

    @server.routes.get(ROUTE)
    async def psa_presets(request):
        return web.json_response(presets_payload(store.library()))

    _registered = True
