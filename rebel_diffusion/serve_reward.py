"""Serve a reward over HTTP: `python -m rebel_diffusion.serve_reward --reward shape_fidelity --port 8000`, then train
with `--config.reward.name=http://127.0.0.1:8000` (the protocol: `rebel_diffusion.rewards.remote`, the README's
"Reward servers"). `--preference NAME` serves a pairwise preference at `POST /compare` instead, for
`preference.name = "http://host:port"` (`--preference bradley_terry --reward large_shape --temperature 0.1`: with
bradley_terry, `--reward` is the reward it compares).

Any reward `make_reward_fn` builds can be served: a registered name, a `module:function` path or a weighted list, and
any preference `make_preference_fn` builds but a server's URL. Its options are flags named after the factory's keyword
parameters (`--head_path /m/head.pth --batch_size 16`), typed by their defaults. The server is the standard
library's `ThreadingHTTPServer`: a connection per thread reads and decodes requests concurrently, while the reward
scores one batch at a time (a lock), as it would in the trainer: a GPU model called from several threads at once gains
nothing and may run out of memory. It listens on 127.0.0.1 unless `--host`
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

from rebel_diffusion.rewards import (_FACTORIES, RewardSetupError, call_reward, check_reward_name, is_url,
                                     make_reward_fn, parse_reward_spec, reward_kind, validate_scores)
from rebel_diffusion.rewards.preference import _FACTORIES as _PREFERENCE_FACTORIES
from rebel_diffusion.rewards.preference import (check_preference_config, check_preference_name, make_preference_fn,
                                                preference_kind)
from rebel_diffusion.rewards.remote import decode_images

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: 85 float32 images of 3 x 1024 x 1024, base64-encoded


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ProtocolError(ValueError):
    """A `/score` request that breaks the protocol (answered 400)."""


class _Service:
    """A built reward or preference and what `/health` and its POST endpoint answer; one batch at a time (a lock)."""

    role: str  # "reward" or "preference": the health's "type"
    endpoint: str  # the POST path
    verb: str  # what it does to outputs, for messages

    def __init__(self, name: str, fn: Callable, kind: str, device: torch.device) -> None:
        self.name, self.fn, self.kind, self.device = name, fn, kind, device
        self._lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {"type": self.role, self.role: self.name, "kind": self.kind}

    def _prompts(self, request: Any) -> list[str]:
        if not isinstance(request, dict):
            raise ProtocolError("the request must be a JSON object")
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ProtocolError('"prompts" must be a list of strings')
        return prompts

    def _outputs(self, request: dict, suffix: str, count: int) -> Any:
        """The request's `"images" + suffix` (a tensor on the device) or `"responses" + suffix` (strings), `count` of
        them; `ProtocolError` when both, neither, the wrong kind or the wrong number are given."""
        images, responses = "images" + suffix, "responses" + suffix
        if (images in request) == (responses in request):
            raise ProtocolError(f'give either "{images}" (images) or "{responses}" (text)')
        if images in request:
            if self.kind == "text":
                raise ProtocolError(f"{self.role} {self.name!r} {self.verb} text; send \"{responses}\"")
            try:
                outputs: Any = torch.from_numpy(decode_images(request[images])).to(self.device)
            except ValueError as e:
                raise ProtocolError(f"{images}: {e}" if suffix else str(e)) from None
        else:
            if self.kind == "image":
                raise ProtocolError(f"{self.role} {self.name!r} {self.verb} images; send \"{images}\"")
            outputs = request[responses]
            if not isinstance(outputs, list) or not all(isinstance(r, str) for r in outputs):
                raise ProtocolError(f'"{responses}" must be a list of strings')
        if len(outputs) != count:
            side = f" in {images if images in request else responses}" if suffix else ""
            raise ProtocolError(f"{len(outputs)} outputs{side} but {count} prompts")
        return outputs


class RewardService(_Service):
    """`POST /score`: `{"scores": [...]}`, the reward of each output for its prompt."""

    role, endpoint, verb = "reward", "/score", "scores"

    def answer(self, request: Any) -> dict[str, Any]:
        """The answer to a `/score` request; `ProtocolError` for a request that breaks the protocol."""
        prompts = self._prompts(request)
        outputs = self._outputs(request, "", len(prompts))
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ProtocolError('"seed" must be an integer')
        generator = torch.Generator().manual_seed(seed % 2**63) if seed is not None else None
        with self._lock, torch.no_grad():
            scores = call_reward(self.fn, outputs, prompts, generator)
        return {"scores": validate_scores(self.name, scores, len(prompts)).tolist()}


class PreferenceService(_Service):
    """`POST /compare`: `{"probabilities": [...]}`, P(a beats b) for each prompt's pair of outputs."""

    role, endpoint, verb = "preference", "/compare", "compares"

    def answer(self, request: Any) -> dict[str, Any]:
        """The answer to a `/compare` request; `ProtocolError` for a request that breaks the protocol."""
        prompts = self._prompts(request)
        outputs_a, outputs_b = (self._outputs(request, side, len(prompts)) for side in ("_a", "_b"))
        with self._lock, torch.no_grad():
            probabilities = self.fn(prompts, outputs_a, outputs_b)
        return {"probabilities": probabilities.tolist()}


def make_handler(service: _Service) -> type[BaseHTTPRequestHandler]:
    usage = f"use GET /health or POST {service.endpoint}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
        served = service

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
                self._answer(404, {"error": f"no such endpoint {self.path!r}; {usage}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != service.endpoint:
                self._answer(404, {"error": f"no such endpoint {self.path!r}; {usage}"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": f"a POST {service.endpoint} needs a Content-Length"})
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
                answer = service.answer(request)
            except ProtocolError as e:  # the request breaks the protocol: final
                self._answer(400, {"error": _one_line(e)})
                return
            except (ValueError, TypeError) as e:  # the reward refuses its input (a prompt it cannot read): final
                self._answer(422, {"error": _one_line(e)})
                return
            except Exception as e:  # the reward failed otherwise (out of memory, a lost device): may pass on retry
                self._answer(500, {"error": _one_line(e)})
                return
            self._answer(200, answer)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
            sys.stderr.write(f"serve_reward {self.address_string()} {format % args}\n")

    return Handler


def _option_flags(factories: list[Callable], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The keyword parameters of `factories` but `device`, `dtype` and `skip`, with their defaults (None: a required
    or untyped option): the options that become flags."""
    options: dict[str, Any] = {}
    for factory in factories:
        for parameter in inspect.signature(factory).parameters.values():
            if parameter.name in ("device", "dtype", *skip) or parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD,
                                                                                       parameter.KEYWORD_ONLY):
                continue
            default = None if parameter.default is parameter.empty else parameter.default
            options.setdefault(parameter.name, default)
    return options


def _reward_factories(spec: str) -> list[Callable]:
    return [_FACTORIES[name] for name, _ in parse_reward_spec(spec) if name in _FACTORIES]


def _served_options(args: argparse.Namespace) -> dict[str, Any]:
    """The option flags of what `args` serve; `ValueError` (one line) for a name that cannot be served."""
    if args.preference is None:
        if is_url(args.reward):
            raise ValueError("a reward server cannot serve another server's URL; give a reward name")
        return _option_flags(_reward_factories(args.reward))
    if is_url(args.preference):
        raise ValueError("a preference server cannot serve another server's URL; give a preference name")
    check_preference_name(args.preference)
    if args.preference != "bradley_terry":
        if args.reward is not None:
            raise ValueError(f"--reward names bradley_terry's reward; preference {args.preference!r} takes none")
        registered = args.preference in _PREFERENCE_FACTORIES  # else a module:function, which takes no options
        return _option_flags([_PREFERENCE_FACTORIES[args.preference]] if registered else [])
    if args.reward is None:
        raise ValueError("--preference bradley_terry compares the scores of a reward: give it with --reward NAME")
    check_reward_name(args.reward)
    # Its own `reward` is the server's --reward flag; the reward's options are its flags too.
    return _option_flags([_PREFERENCE_FACTORIES["bradley_terry"], *_reward_factories(args.reward)],
                         skip=frozenset({"reward"}))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The server's own flags and the reward's options (only those given)."""
    parser = argparse.ArgumentParser(prog="python -m rebel_diffusion.serve_reward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", help="a registered reward, a module:function path or a weighted list; with "
                                          "--preference bradley_terry, the reward it compares")
    parser.add_argument("--preference", help="serve a preference at POST /compare: a registered preference or a "
                                              "module:function path")
    parser.add_argument("--port", type=int, required=True, help="the port to listen on (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    known, rest = parser.parse_known_args(argv)
    if known.reward is None and known.preference is None:
        parser.error("give --reward NAME (a reward, at POST /score) or --preference NAME (a preference, at POST "
                     "/compare)")
    try:
        options = _served_options(known)
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
        parser.error(f"unknown arguments {' '.join(unknown)} ({_served(known)} takes the options: {taken})")
    return known, vars(given)


def _served(args: argparse.Namespace) -> str:
    """What `args` serve, for messages: "reward 'x'" or "preference 'y'"."""
    return f"reward {args.reward!r}" if args.preference is None else f"preference {args.preference!r}"


def build_service(args: argparse.Namespace, options: dict[str, Any]) -> _Service:
    """The reward or preference `args` name, built with its `options`."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.preference is None:
        reward_fn = make_reward_fn(args.reward, device=device, dtype=dtype, **options)
        return RewardService(args.reward, reward_fn, reward_kind(args.reward), device)
    options = {**options, **({"reward": args.reward} if args.reward else {})}
    check_preference_config({"name": args.preference, **options})
    preference_fn = make_preference_fn(args.preference, device=device, dtype=dtype, **options)
    return PreferenceService(args.preference, preference_fn, preference_kind(args.preference, options), device)


def build_server(args: argparse.Namespace, options: dict[str, Any]) -> ThreadingHTTPServer:
    """Build the reward or preference, then bind the server (so that a port in use is found after a reward that fails
    to build)."""
    service = build_service(args, options)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server = build_server(args, options)
    except (RewardSetupError, ValueError) as e:
        print(f"error: {_served(args)}: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    service = server.RequestHandlerClass.served
    print(f"serving {_served(args)} ({service.kind} outputs) at POST {service.endpoint} on http://{host}:{port}",
          flush=True)
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
    with server_process(["-m", "rebel_diffusion.serve_reward", "--port", "0", *args], log, "serving ", env) as line:
        yield line.split()[-1]


if __name__ == "__main__":
    sys.exit(main())
