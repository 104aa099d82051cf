"""Serve a reward over HTTP: `python -m rebel_diffusion.serve_reward --reward shape_fidelity --port 8000`, then train
with `--config.reward.name=http://127.0.0.1:8000` (the protocol: `rebel_diffusion.rewards.remote`, the README's
"Reward servers").

Any reward `make_reward_fn` builds can be served: a registered name, a `module:function` path or a weighted list. Its
options are flags named after the factory's keyword parameters (`--head_path /m/head.pth --batch_size 16`), typed by
their defaults. The server is the standard library's `ThreadingHTTPServer`: a connection per thread reads and decodes
requests concurrently, while the reward scores one batch at a time (a lock), as it would in the trainer: a GPU model
called from several threads at once gains nothing and may run out of memory. It listens on 127.0.0.1 unless `--host`
says otherwise; it has no authentication, so expose it only on a network you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import torch

from rebel_diffusion.rewards import (_FACTORIES, RewardSetupError, call_reward, is_url, make_reward_fn,
                                     parse_reward_spec, reward_kind, validate_scores)
from rebel_diffusion.rewards.remote import decode_images

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: 85 float32 images of 3 x 1024 x 1024, base64-encoded


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ProtocolError(ValueError):
    """A `/score` request that breaks the protocol (answered 400)."""


class RewardService:
    """A built reward and what `/health` and `/score` answer with it; `score` runs one batch at a time."""

    def __init__(self, name: str, reward_fn: Callable, kind: str, device: torch.device) -> None:
        self.name, self.reward_fn, self.kind, self.device = name, reward_fn, kind, device
        self._lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {"reward": self.name, "kind": self.kind}

    def score(self, request: Any) -> list[float]:
        """The scores of a `/score` request; `ProtocolError` for a request that breaks the protocol."""
        if not isinstance(request, dict):
            raise ProtocolError("the request must be a JSON object")
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ProtocolError('"prompts" must be a list of strings')
        if ("images" in request) == ("responses" in request):
            raise ProtocolError('give either "images" (image rewards) or "responses" (text rewards)')
        if "images" in request:
            if self.kind == "text":
                raise ProtocolError(f"reward {self.name!r} scores text; send \"responses\"")
            try:
                outputs: Any = torch.from_numpy(decode_images(request["images"])).to(self.device)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            count = len(outputs)
        else:
            if self.kind == "image":
                raise ProtocolError(f"reward {self.name!r} scores images; send \"images\"")
            outputs = request["responses"]
            if not isinstance(outputs, list) or not all(isinstance(r, str) for r in outputs):
                raise ProtocolError('"responses" must be a list of strings')
            count = len(outputs)
        if count != len(prompts):
            raise ProtocolError(f"{count} outputs but {len(prompts)} prompts")
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ProtocolError('"seed" must be an integer')
        generator = torch.Generator().manual_seed(seed % 2**63) if seed is not None else None
        with self._lock, torch.no_grad():
            scores = call_reward(self.reward_fn, outputs, prompts, generator)
        return validate_scores(self.name, scores, count).tolist()


def make_handler(service: RewardService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
            if self.path.rstrip("/") == "/health":
                self._answer(200, service.health())
            else:
                self._answer(404, {"error": f"no such endpoint {self.path!r}; use GET /health or POST /score"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._answer(404, {"error": f"no such endpoint {self.path!r}; use GET /health or POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": "a POST /score needs a Content-Length"})
                return
            if length > MAX_REQUEST_BYTES:
                self.close_connection = True
                self._answer(413, {"error": f"the request has {length} bytes; at most {MAX_REQUEST_BYTES} are read"})
                return
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError as e:
                self._answer(400, {"error": f"the request is not JSON ({_one_line(e)})"})
                return
            try:
                scores = service.score(request)
            except ProtocolError as e:  # the request breaks the protocol: final
                self._answer(400, {"error": _one_line(e)})
                return
            except (ValueError, TypeError) as e:  # the reward refuses its input (a prompt it cannot read): final
                self._answer(422, {"error": _one_line(e)})
                return
            except Exception as e:  # the reward failed otherwise (out of memory, a lost device): may pass on retry
                self._answer(500, {"error": _one_line(e)})
                return
            self._answer(200, {"scores": scores})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
            sys.stderr.write(f"serve_reward {self.address_string()} {format % args}\n")

    return Handler


def _option_flags(spec: str) -> dict[str, Any]:
    """The reward options of a spec's factories, with their defaults (None: a required or untyped option)."""
    options: dict[str, Any] = {}
    for name, _ in parse_reward_spec(spec):
        if name not in _FACTORIES:
            continue
        for parameter in inspect.signature(_FACTORIES[name]).parameters.values():
            if parameter.name in ("device", "dtype") or parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD,
                                                                                parameter.KEYWORD_ONLY):
                continue
            default = None if parameter.default is parameter.empty else parameter.default
            options.setdefault(parameter.name, default)
    return options


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The server's own flags and the reward's options (only those given)."""
    parser = argparse.ArgumentParser(prog="python -m rebel_diffusion.serve_reward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a registered reward, a module:function path or a weighted list")
    parser.add_argument("--port", type=int, required=True, help="the port to listen on (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    known, rest = parser.parse_known_args(argv)
    try:
        if is_url(known.reward):
            raise ValueError("a reward server cannot serve another server's URL; give a reward name")
        options = _option_flags(known.reward)
    except ValueError as e:
        parser.error(str(e))
    reward_parser = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    for option, default in options.items():
        kind = type(default) if isinstance(default, (int, float, str)) and not isinstance(default, bool) else str
        reward_parser.add_argument(f"--{option}", type=_parse_bool if isinstance(default, bool) else kind,
                                   default=argparse.SUPPRESS)
    given, unknown = reward_parser.parse_known_args(rest)
    if unknown:
        taken = ", ".join(f"--{o}" for o in options) or "none"
        parser.error(f"unknown arguments {' '.join(unknown)} (reward {known.reward!r} takes the options: {taken})")
    return known, vars(given)


def build_server(args: argparse.Namespace, options: dict[str, Any]) -> ThreadingHTTPServer:
    """Build the reward, then bind the server (so that a port in use is found after a reward that fails to build)."""
    device = torch.device(args.device)
    reward_fn = make_reward_fn(args.reward, device=device, dtype=getattr(torch, args.dtype), **options)
    service = RewardService(args.reward, reward_fn, reward_kind(args.reward), device)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server = build_server(args, options)
    except (RewardSetupError, ValueError) as e:
        print(f"error: reward {args.reward!r}: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward!r} ({reward_kind(args.reward)} outputs) on "
          f"http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


@contextlib.contextmanager
def server_process(argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None,
                   start_timeout_s: float = 60.0) -> Iterator[str]:
    """`python *argv` as a server in a child process, its stderr into `log`: its first stdout line (where it listens)
    while the block runs, once that line starts with `ready`; the child is terminated after (killed after 10 s).
    `RuntimeError` with the end of `log` when it does not say it serves within `start_timeout_s` (a reward that fails
    to build, a bad flag)."""
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, *argv], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    try:
        first: list[str] = []
        # A thread reads the line, so that a server that never says it serves is waited for at most start_timeout_s.
        reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=start_timeout_s)
        if not first or not first[0].startswith(ready):
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        yield first[0].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serve_in_subprocess(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m rebel_diffusion.serve_reward --port 0 *args` in a child process (`server_process`): its URL while the
    block runs."""
    with server_process(["-m", "rebel_diffusion.serve_reward", "--port", "0", *args], log, "serving reward",
                        env) as line:
        yield line.split()[-1]


if __name__ == "__main__":
    sys.exit(main())
