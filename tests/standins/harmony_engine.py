"""A stand-in for llama-server's raw /completion endpoint serving a GPT-OSS model, which
cannot run here: it replays the completion tokens a test scripted (rendered by
openai-harmony), streamed in chunks of random size, with llama-server's response fields
(`tokens`, `stop`, `stop_type`, `tokens_predicted`, `tokens_evaluated`). It records each
request it gets beside the script, as `<script>.request.json`."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from aiohttp import web


def make_app(script: Path) -> web.Application:
    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        Path(f"{script}.request.json").write_text(json.dumps(body))
        plan = json.loads(script.read_text())
        if plan.get("status", 200) != 200:
            return web.json_response({"error": {"code": plan["status"], "type": "server_error",
                                                "message": plan["error"]}},
                                     status=plan["status"])
        tokens = plan["tokens"]
        stop_type = plan.get("stop_type", "eos")
        if body.get("n_predict") and len(tokens) > body["n_predict"]:
            tokens, stop_type = tokens[: body["n_predict"]], "limit"
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        rng = random.Random(plan.get("seed", 0))
        i = 0
        while i < len(tokens):
            n = rng.randint(1, 5)
            chunk = {"index": 0, "content": "", "tokens": tokens[i:i + n], "stop": False}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            i += n
        end = {"index": 0, "content": "", "tokens": [], "stop": True, "stop_type": stop_type,
               "tokens_predicted": len(tokens), "tokens_evaluated": len(body["prompt"])}
        await resp.write(b"data: " + json.dumps(end).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/completion", completion)
    app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
    return app


# A `cmd` is checked against the --help of the llama-server it runs: the stand-in answers in
# llama-server's format, with the flags it takes.
HELP = """\
-m,    --model FNAME                    ignored: the stand-in replays a script
--port PORT                             port to listen on
--script FNAME                          the completion to replay
"""


def main() -> None:
    if "--help" in sys.argv[1:]:
        print(HELP, end="")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--script", type=Path, required=True)
    args, _ = ap.parse_known_args()
    web.run_app(make_app(args.script), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
