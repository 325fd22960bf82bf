"""The framework's ceiling: a bare aiohttp endpoint that reads the body and answers 204."""

from __future__ import annotations

import sys

from aiohttp import web


async def sink(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/events", sink)
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))  # type: ignore[arg-type,return-value]
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
