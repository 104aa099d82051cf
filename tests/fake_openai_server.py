"""A deterministic stand-in for an OpenAI-compatible server (vLLM's `vllm serve`), for the judge tests:
`python tests/fake_openai_server.py --port 0 --model NAME [--mode MODE]` prints `serving http://127.0.0.1:PORT/v1`.

* `GET /v1/models` lists `NAME`.
* `POST /v1/chat/completions` answers from what the user message holds. Its items are the attached images (each read
  back from its PNG data URL: the mean of its pixel values / 255, times 10) or, without images, the counts of the digit
  "1" in the text: in the whole text, or in its last two `|`-separated segments when it has a `|` (a comparison).
  - One item v (a score): the reply `"{v:.4f}/10"`; with `logprobs`, the first token's top log-probs put
    0.4 w on "Yes", 0.1 w on " yes", 0.3 (1 - w) on "No", 0.1 (1 - w) on "no ", 0.05 on "Maybe" and 0.05 on
    "yesterday", w = v / (v + 1): P(yes) = 0.5 w / (0.5 w + 0.4 (1 - w)).
  - Two items (a comparison), weights a = v1 + 2 (a bias for the first position) and b = v2 + 1: the reply
    "Answer: A" when a >= b, else "Answer: B"; with `logprobs`, 0.75 a / z on "A", 0.25 a / z on " A", b / z on "B" and
    1 / z on "C", z = a + b + 1: P(A) = a / (a + b).
  The top list is cut to the request's `top_logprobs`, highest first.
* `GET /v1/requests`: every chat request so far, as `{"body": ..., "authorization": ...}`.

Modes: `ok`; `words` (the reply "I cannot rate this.", top tokens "I" and "Sorry"); `fail` (every chat request gets
HTTP 500 with OpenAI's error object); `slow` (a chat answer waits 5 s).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

DATA_URL = "data:image/png;base64,"


def brightness(url: str) -> float:
    """10 x the mean pixel value (in [0, 1]) of a PNG data URL."""
    assert url.startswith(DATA_URL), url[:40]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(DATA_URL):]))).convert("RGB"), dtype=np.float64)
    return 10 * pixels.mean() / 255


def items(message: dict) -> list[float]:
    content = message["content"]
    if isinstance(content, str):
        text, images = content, []
    else:
        text = "".join(part["text"] for part in content if part["type"] == "text")
        images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    if images:
        return [brightness(url) for url in images]
    return [float(segment.count("1")) for segment in text.split("|")[-2:]] if "|" in text else [float(text.count("1"))]


def answer(body: dict, mode: str) -> tuple[str, list[tuple[str, float]]]:
    """The reply and the first token's (token, probability) list."""
    if mode == "words":
        return "I cannot rate this.", [("I", 0.6), ("Sorry", 0.3)]
    values = items(body["messages"][-1])
    if len(values) == 1:
        w = values[0] / (values[0] + 1)
        top = [("Yes", 0.4 * w), (" yes", 0.1 * w), ("No", 0.3 * (1 - w)), ("no ", 0.1 * (1 - w)), ("Maybe", 0.05),
               ("yesterday", 0.05)]
        return f"{values[0]:.4f}/10", top
    a, b = values[0] + 2, values[1] + 1
    z = a + b + 1
    return f"Answer: {'A' if a >= b else 'B'}", [("A", 0.75 * a / z), (" A", 0.25 * a / z), ("B", b / z), ("C", 1 / z)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["ok", "words", "fail", "slow"], default="ok")
    args = parser.parse_args()
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, answer: dict) -> None:
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            elif self.path == "/v1/requests":
                self._send(200, {"requests": received})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"body": body, "authorization": self.headers.get("Authorization")})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if args.mode == "fail":
                return self._send(500, {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}})
            if args.mode == "slow":
                time.sleep(5)
            if body.get("model") != args.model:
                return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            reply, top = answer(body, args.mode)
            top = sorted(((t, p) for t, p in top if p > 0), key=lambda tp: -tp[1])[: body.get("top_logprobs", 0)]
            choice: dict = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            if body.get("logprobs"):
                entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top]
                choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
            self._send(200, {"id": "chatcmpl-0", "object": "chat.completion", "model": args.model, "choices": [choice]})

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"serving http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
