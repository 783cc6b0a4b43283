"""The page's folder (FRONTEND_DIR) as the adapter serves it at "/".

Every file goes out with PAGE_HEADERS: revalidated on each load (an upgrade's app.js is used at once,
not days later by the browser's guess at freshness), a Content-Security-Policy that lets the page
talk to this server only and be framed by nobody, and no MIME sniffing. index.html also gets
ADAPTER_PAGE_MARK, which tells app.js that it is the adapter's own page: it then ignores `?api=`
(meant for a copy of the page hosted elsewhere), so a crafted link cannot send users' photos to
another server.
A Range the file cannot give (malformed, not bytes, past its end) is refused in the adapter's shape,
{"error": ...} (Starlette answers plain text): 400, or 416 with `Content-Range: bytes */SIZE`.
"""
from __future__ import annotations

import hashlib
import os
from email.utils import formatdate

from starlette.datastructures import Headers
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles

# What the page needs and nothing more (tests/test_page.py runs it under this policy): its own
# scripts and styles, its pictures plus blob: (the preview) and data: (the heatmap), fetches to
# this server only.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Cache-Control": "no-cache",  # may be stored, but asked again (ETag, 304) before each use
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}
ADAPTER_PAGE_MARK = b'  <meta name="page-server" content="adapter">\n'


class PageFileResponse(FileResponse):
    """Starlette's FileResponse, its Range refusals (plain text: 400 with the reason, 416 with its Content-Range)
    answered as JSON."""

    async def __call__(self, scope, receive, send) -> None:
        refused: dict | None = None  # a refusal's start, held until its body (the reason) comes

        async def send_refusals_as_json(message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                refused = message
            elif refused is None:
                await send(message)
            elif message["type"] == "http.response.body":
                size = self.stat_result.st_size if self.stat_result is not None else 0
                reason = (f"Range not satisfiable: the file has {size} bytes." if refused["status"] == 416
                          else message.get("body", b"").decode("utf-8", "replace"))
                headers = {"Content-Range": f"bytes */{size}"} if refused["status"] == 416 else None
                await JSONResponse({"error": reason}, refused["status"], headers=headers)(scope, receive, send)

        await super().__call__(scope, receive, send_refusals_as_json)


class PageFiles(StaticFiles):
    def __init__(self, directory: str) -> None:
        super().__init__(directory=directory, html=True)
        self._index_path = os.path.realpath(os.path.join(directory, "index.html"))
        self._index: tuple[tuple, bytes, str] | None = None  # (file's mtime and size, marked body, ETag)

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response

    def file_response(self, full_path, stat_result: os.stat_result, scope, status_code: int = 200) -> Response:
        if os.fspath(full_path) != self._index_path:
            response = PageFileResponse(full_path, status_code=status_code, stat_result=stat_result)
            if self.is_not_modified(response.headers, Headers(scope=scope)):
                return NotModifiedResponse(response.headers)
            return response
        body, etag = self._marked_index(stat_result)
        response = Response(body, status_code, media_type="text/html",
                            headers={"ETag": etag, "Last-Modified": formatdate(stat_result.st_mtime, usegmt=True)})
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response

    def _marked_index(self, stat_result: os.stat_result) -> tuple[bytes, str]:
        """index.html with ADAPTER_PAGE_MARK before </head>, read again only when the file changes."""
        key = (stat_result.st_mtime_ns, stat_result.st_size)
        if self._index is None or self._index[0] != key:
            with open(self._index_path, "rb") as f:
                html = f.read()
            end_of_head = html.lower().find(b"</head>")
            # No </head>: served as it is (app.js then honours ?api=, but the CSP still keeps its
            # fetches on this server).
            body = html[:end_of_head] + ADAPTER_PAGE_MARK + html[end_of_head:] if end_of_head >= 0 else html
            self._index = (key, body, f'"{hashlib.md5(body).hexdigest()}"')
        return self._index[1], self._index[2]
