"""`sap serve` under bounded load on 127.0.0.1: chat batching and moderation against in-process scan().

Run: ``python benchmarks/bench_serve.py [--polytope DIR] [--out benchmarks/results_serve.json]``.

The server runs as a real ``sap serve`` process on a free loopback port; this process is the load
generator (a lean asyncio HTTP/1.1 client on keep-alive connections, so it steals little CPU from
the server). Every phase sends a fixed number of requests per client and has a time limit, so the
benchmark stops by itself. Phases:

1. a server with batching (``--max-batch-size 32``): moderation at 1/8/32 clients, one 50-token prompt
   per request; at 32 clients in ``--rounds`` rounds, each right after an in-process ``scan()`` of the
   same prompts (batch 32) in this process, so both see the same background load;
2. on the same server, chat completions at 1/8/32 clients (greedy, ``max_tokens`` fixed, mode ``detect``:
   the hook reads every token, nothing stops early);
3. a server that serves one request at a time (``--max-batch-size 1``): chat at 32 clients, one
   request each (its throughput does not depend on the number of clients).

Without ``--polytope`` it uses the shipped default polytope when sapguard has one, else a random
polytope of the default training shape (16 facets, MLP width 1024, layer 22) for the default model:
serving cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Describe a walk through a busy market in the morning.",
    "Write a letter to a friend about learning to bake bread.",
    "Explain the rules of chess for a beginner.",
    "Tell me about the history of the printing press.",
    "Write a poem about autumn leaves and cold rain.",
    "Describe how a bicycle works, part by part.",
]
WORDS = ["the", "river", "city", "morning", "garden", "teacher", "library", "window", "music", "history", "science", "market", "bread", "travel", "mountain", "simple", "quiet", "letter", "friend", "winter", "summer", "light", "question", "answer", "story", "paper", "kitchen", "road", "village", "computer", "student", "careful", "bright", "open", "machine", "children", "ocean", "museum", "recipe", "weather", "planet"]


def moderation_prompts(tokenizer: Any, n: int, tokens: int = 50, seed: int = 0) -> list[str]:
    """``n`` deterministic texts of exactly ``tokens`` tokens each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        out.append(tokenizer.decode(ids).strip())
    return out


# -- a lean HTTP/1.1 client ------------------------------------------------------------------------
class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = json.dumps(payload).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        data = json.loads(await self.reader.readexactly(length)) if length else {}
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), so results can be read apart from other load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(
    port: int, clients: int, per_client: int, make: Any, path: str, time_limit: float, pid: int
) -> dict[str, Any]:
    """``clients`` concurrent clients, ``per_client`` requests each; stops at ``time_limit`` seconds."""
    latencies: list[float] = []
    tokens = 0
    items = 0
    errors: list[str] = []

    async def client(c: int) -> None:
        nonlocal tokens, items
        conn = Connection("127.0.0.1", port)
        try:
            for r in range(per_client):
                payload = make(c, r)
                t0 = time.perf_counter()
                try:
                    status, data = await conn.post(path, payload)
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    errors.append(type(err).__name__)
                    conn.close()
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(str(status))
                    continue
                tokens += (data.get("usage") or {}).get("completion_tokens", 0)
                items += len(data.get("results", [])) or 1
        finally:
            conn.close()

    started = time.perf_counter()
    cpu0 = cpu_seconds(pid)
    tasks = [asyncio.ensure_future(client(c)) for c in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0]] * 99 if latencies else [0] * 99
    return {
        "clients": clients, "requests": len(latencies), "planned": clients * per_client, "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 3), "items_per_s": round(items / seconds, 3),
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
        "server_cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / cpu, 2) if cpu else None,
        "items_per_cpu_s": round(items / cpu, 2) if cpu else None,
        "p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
        "errors": len(errors), "error_kinds": sorted(set(errors)),
        "cut_off_clients": len(pending),
    }


# -- server process --------------------------------------------------------------------------------
def start_server(polytope: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-c", "from sapguard.cli import app; app()", "serve", "--polytope", polytope,
           "--host", "127.0.0.1", "--port", "0", "--json", "--mode", "detect", "--timeout", "900", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise SystemExit(f"server did not start: {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, int(json.loads(line)["url"].rsplit(":", 1)[1])


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def default_polytope_dir(tmp: Path) -> tuple[str, str]:
    """The shipped default polytope, else a random one of the default training shape."""
    from sapguard.errors import SapError
    from sapguard.polytope import artifact

    finder = getattr(artifact, "default_polytope", None)
    if finder is not None:
        try:
            finder().save_pretrained(tmp / "poly")
            return str(tmp / "poly"), "shipped default"
        except SapError:
            pass  # this checkout has the loader but not yet the trained asset
    import torch

    from sapguard.models.loading import load_model
    from sapguard.polytope.model import EncoderSpec, SafetyPolytope

    lm = load_model("default")
    torch.manual_seed(0)
    poly = SafetyPolytope(lm.hidden_size, 16, EncoderSpec(width=1024),
                          meta={"layer": 22, "template": "auto", "policy": "last_prompt", "base_model": lm.identity()})
    poly.save_pretrained(tmp / "poly")
    return str(tmp / "poly"), "random, default training shape (16 facets, width 1024, layer 22)"


class Scanner:
    """In-process ``scan()`` on the same prompts, measured in rounds interleaved with the server's."""

    def __init__(self, polytope: str):
        from sapguard.detect import base_model_for
        from sapguard.polytope.artifact import load_polytope

        self.poly = load_polytope(polytope)
        self.lm = base_model_for(self.poly)

    def round(self, prompts: list[str], in_thread: bool = False) -> dict[str, float]:
        """One ``scan()`` of ``prompts``: on the main thread (as a script calls it) or on a worker thread
        (as the server calls it; on this loaded machine torch runs markedly faster there)."""
        from sapguard.detect import scan

        t0, c0 = time.perf_counter(), time.process_time()
        if in_thread:
            worker = threading.Thread(target=scan, args=(self.poly, prompts), kwargs={"lm": self.lm, "batch_size": 32})
            worker.start()
            worker.join()
        else:
            scan(self.poly, prompts, lm=self.lm, batch_size=32)
        return {"prompts_per_s": round(len(prompts) / (time.perf_counter() - t0), 2),
                "prompts_per_cpu_s": round(len(prompts) / (time.process_time() - c0), 2)}

    def single_p50_ms(self, prompts: list[str]) -> float:
        from sapguard.detect import scan

        times = []
        for p in prompts:
            t0 = time.perf_counter()
            scan(self.poly, [p], lm=self.lm)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 1)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "loadavg_start": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--polytope", default=None)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chat-requests", type=int, default=2, help="Chat requests per client.")
    parser.add_argument("--moderation-requests", type=int, default=256, help="Moderation requests per phase.")
    parser.add_argument("--time-limit", type=float, default=240.0, help="Seconds per phase before it is cut off.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved scan()/server rounds at the most clients.")
    parser.add_argument("--out", default="benchmarks/results_serve.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        polytope, kind = (args.polytope, "given") if args.polytope else default_polytope_dir(Path(tmp))
        from transformers import AutoTokenizer

        from sapguard.models.loading import fetch_default_model

        tokenizer = AutoTokenizer.from_pretrained(str(fetch_default_model()))
        prompts = moderation_prompts(tokenizer, args.moderation_requests)
        results: dict[str, Any] = {"machine": info, "polytope": kind, "max_tokens": args.max_tokens}
        scanner = Scanner(polytope)
        scanner.round(prompts[:32])  # warm-up

        def moderation(c: int, r: int) -> dict[str, Any]:
            return {"input": prompts[(c * 7919 + r) % len(prompts)]}

        def chat(c: int, r: int) -> dict[str, Any]:
            prompt = CHAT_PROMPTS[(c + r) % len(CHAT_PROMPTS)]
            return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_tokens": args.max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}]}

        proc, port = start_server(polytope, "--max-batch-size", "32", "--max-wait-ms", "20", "--max-queue", "512")
        try:
            top = max(clients)
            rounds = []
            for c in clients:
                per = max(1, args.moderation_requests // c) if c > 1 else args.moderation_requests // 4
                for r in range(args.rounds if c == top else 1):
                    if c == top:  # in-process scan() and the server, back to back, under the same conditions
                        print(f"in-process scan(), round {r + 1} ...", flush=True)
                        rounds.append({"scan": scanner.round(prompts), "scan_thread": scanner.round(prompts, True)})
                    if c == 1:
                        results["scan_single_prompt_p50_ms"] = scanner.single_p50_ms(prompts[:16])
                    print(f"moderation, {c} clients ...", flush=True)
                    results[f"moderation_{c}"] = asyncio.run(run_load(port, c, per, moderation, "/v1/moderations",
                                                                      args.time_limit, proc.pid))
                    if c == top:
                        rounds[-1]["server"] = results[f"moderation_{c}"]
            results["moderation_vs_scan_rounds"] = [
                {"scan_prompts_per_s": x["scan"]["prompts_per_s"], "server_prompts_per_s": x["server"]["items_per_s"],
                 "ratio": round(x["server"]["items_per_s"] / x["scan"]["prompts_per_s"], 2),
                 "cpu_ratio": round(x["server"]["items_per_cpu_s"] / x["scan"]["prompts_per_cpu_s"], 2),
                 "scan_thread_prompts_per_s": x["scan_thread"]["prompts_per_s"],
                 "ratio_vs_thread": round(x["server"]["items_per_s"] / x["scan_thread"]["prompts_per_s"], 2)}
                for x in rounds]
            for c in clients:
                print(f"chat, {c} clients ...", flush=True)
                per = args.chat_requests if c > 1 else 2 * args.chat_requests
                results[f"chat_{c}"] = asyncio.run(run_load(port, c, per, chat, "/v1/chat/completions",
                                                            args.time_limit, proc.pid))
        finally:
            stop_server(proc)
        proc, port = start_server(polytope, "--max-batch-size", "1", "--max-queue", "512")
        try:
            print(f"chat one at a time, {top} clients ...", flush=True)
            results[f"chat_{top}_unbatched"] = asyncio.run(run_load(port, top, 1, chat, "/v1/chat/completions",
                                                                    args.time_limit, proc.pid))
        finally:
            stop_server(proc)
    info["loadavg_end"] = os.getloadavg()[0]
    ratios = {
        "chat_tokens_per_s_batched_vs_one_at_a_time": round(
            results[f"chat_{top}"]["tokens_per_s"] / results[f"chat_{top}_unbatched"]["tokens_per_s"], 2),
        "chat_tokens_per_cpu_s_batched_vs_one_at_a_time": round(
            results[f"chat_{top}"]["tokens_per_cpu_s"] / results[f"chat_{top}_unbatched"]["tokens_per_cpu_s"], 2),
        "moderation_prompts_per_s_vs_scan": round(statistics.median(
            x["ratio"] for x in results["moderation_vs_scan_rounds"]), 2),
        "moderation_prompts_per_cpu_s_vs_scan": round(statistics.median(
            x["cpu_ratio"] for x in results["moderation_vs_scan_rounds"]), 2),
        "moderation_prompts_per_s_vs_scan_in_a_thread": round(statistics.median(
            x["ratio_vs_thread"] for x in results["moderation_vs_scan_rounds"]), 2),
        "moderation_p50_ms_1_client": results["moderation_1"]["p50_ms"] if 1 in clients else None,
    }
    results["ratios"] = ratios
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(markdown(results, clients))


def markdown(results: dict[str, Any], clients: list[int]) -> str:
    header = ("| phase | clients | requests | req/s | gen tok/s | tok or prompts / server CPU-s | p50 ms | p95 ms | "
              "p99 ms | errors |")
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        if isinstance(r, dict) and "clients" in r:
            rows.append(f"| {key.rsplit('_', 1)[0] if key[-1].isdigit() else key} | {r['clients']} | {r['requests']} | "
                        f"{r['requests_per_s']} | {r['tokens_per_s'] if r['tokens'] else '-'} | "
                        f"{r['tokens_per_cpu_s'] if r['tokens'] else r['items_per_cpu_s']} | {r['p50_ms']} | "
                        f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
