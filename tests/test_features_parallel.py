"""Data-parallel extraction on CPU: 2 ranks over gloo write the features directory one process writes.

The ranks are real processes started by ``torchrun`` (this file is their script, see the end) that
load a tiny random-init model saved to disk. One launch runs every scenario in a row to keep the
test fast: equal stores, a failing rank, resume after it, ranks given other data, a complete store,
and ``python -m sapguard.cli extract`` as a user runs it under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from sapguard.data.records import Record, write_jsonl
from sapguard.errors import SapError
from sapguard.features.extract import extract_to_dir
from sapguard.features.parallel import assign_batches, dist_env, rank_device, round_of
from sapguard.features.store import load_features
from sapguard.models.loading import load_model
from tests.conftest import make_tiny

WORLD = 2
WORDS = "how do i make a bomb bake bread cake hack into wifi steal card write poem story".split()
# name -> extract options; "fail" and "resume" share a directory, "again" reruns "strided"'s
SCENARIOS: dict[str, dict[str, Any]] = {
    "strided": {"shard_records": 5, "batch_size": 2},  # 5 shards of 3 batches: a round per shard
    "tokens": {"shard_records": 2, "batch_size": 2, "policy": "response_tokens"},  # rounds of 2 shards
    "fail": {"shard_records": 5, "batch_size": 2},
    "resume": {"shard_records": 5, "batch_size": 2},
    "mismatch": {"shard_records": 5, "batch_size": 2},
    "again": {"shard_records": 5, "batch_size": 2},
}
OUT = {"fail": "resume", "again": "strided"}


def records(n: int = 23) -> list[Record]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + (i * 5) % 11)]
        response = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)) if i % 3 else None
        out.append(Record(" ".join(words), response, i % 2 == 0, split=("train", "validation", "test")[i % 3]))
    return out


@contextlib.contextmanager
def one_thread():
    """The same CPU kernels in the reference as in the ranks (one thread each), for bitwise equality."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cli_args(data: Path, model_dir: Path, out: Path) -> list[str]:
    return ["extract", "--data", str(data), "--model", str(model_dir), "--layer", "2", "--batch-size", "2",
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "--json"]


def rank_main(root: Path, model_dir: Path) -> None:
    """One rank under torchrun: every scenario in order, the outcome of each in ``root/rank{RANK}.json``."""
    import torch.distributed as dist

    from sapguard.features.parallel import extract_to_dir_distributed

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    lm = load_model(str(model_dir), device=rank_device("auto", int(os.environ["LOCAL_RANK"])), dtype="float32")
    broken = copy.deepcopy(lm)  # rank 1's "bad GPU": NaN hidden states in every batch it reads
    with torch.no_grad():
        broken.model.get_input_embeddings().weight.fill_(float("nan"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # the scenarios share it
    outcome: dict[str, Any] = {}
    for name, options in SCENARIOS.items():
        this_lm = broken if name == "fail" and rank == 1 else lm
        data = records()[:-1] if name == "mismatch" and rank == 1 else records()
        try:
            fs = extract_to_dir_distributed(this_lm, data, root / OUT.get(name, name), 2, **options)
            outcome[name] = {"rows": None if fs is None else len(fs)}
        except SapError as err:
            outcome[name] = {"error": str(err)}
        if name == "fail" and rank == 0:  # what the failed run left for the next one to resume
            out = root / OUT[name]
            manifest = json.loads((out / "manifest.json").read_text())
            outcome[name].update(complete=manifest["complete"], shards=manifest["shards"], files=sorted(p.name for p in out.iterdir()))
        dist.barrier()
    dist.destroy_process_group()
    (root / f"rank{rank}.json").write_text(json.dumps(outcome))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = make_tiny("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """``torchrun --standalone --nproc-per-node 2 tests/test_features_parallel.py ROOT MODEL`` (CPU, gloo)."""
    root = tmp_path_factory.mktemp("parallel")
    write_jsonl(root / "data.jsonl", records())
    torchrun(__file__, str(root), str(tiny_dir))
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def cli_run(tiny_dir, tmp_path_factory) -> tuple[Path, str]:
    """``torchrun --standalone --nproc-per-node 2 -m sapguard.cli extract ...``: the command a user runs
    (its own job: re-joining a job whose group was destroyed can hang in gloo's connect)."""
    root = tmp_path_factory.mktemp("cli")
    write_jsonl(root / "data.jsonl", records())
    return root, torchrun("-m", "sapguard.cli", *cli_args(root / "data.jsonl", tiny_dir, root / "cli"))


def torchrun(*args: str, timeout: float = 300) -> str:
    """Run a 2-rank CPU job; its stdout. On a timeout the whole process group is killed (no orphan ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    return stdout


def single_process(tiny_dir: Path, out: Path, **options: Any) -> Path:
    with one_thread():
        extract_to_dir(load_model(str(tiny_dir), device="cpu", dtype="float32"), records(), out, 2, **options)
    return out


def assert_same_store(parallel: Path, single: Path) -> None:
    """The same manifest (so byte-identical shards: their sha256 are in it), records and rows."""
    manifest = json.loads((parallel / "manifest.json").read_text())
    assert manifest == json.loads((single / "manifest.json").read_text())
    assert (parallel / "records.jsonl").read_bytes() == (single / "records.jsonl").read_bytes()
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in single.iterdir())  # no strays
    a, b = load_features(parallel), load_features(single)
    assert torch.equal(a.features, b.features) and torch.equal(a.record_index, b.record_index)
    assert torch.equal(a.position, b.position)


@pytest.mark.parametrize("name", ["strided", "tokens"])
def test_merged_store_equals_single_process(runs, tiny_dir, tmp_path, name):
    root, outcome = runs
    assert outcome[1][name] == {"rows": None}  # only rank 0 returns (and writes) the features
    manifest = json.loads((root / name / "manifest.json").read_text())
    assert outcome[0][name] == {"rows": manifest["rows"]} and manifest["complete"]
    assert len(manifest["shards"]) > 1
    assert_same_store(root / name, single_process(tiny_dir, tmp_path / "single", **SCENARIOS[name]))


def test_failing_rank_is_reported_on_every_rank_and_writes_no_shard(runs, tiny_dir, tmp_path):
    root, outcome = runs
    message = outcome[0]["fail"]["error"]
    assert outcome[1]["fail"]["error"] == message
    assert message.startswith("data-parallel extraction failed on rank 1: ") and "NaN or Inf" in message
    # it failed in its first round: no shard written, the manifest says incomplete (load_features refuses it)
    assert outcome[0]["fail"]["complete"] is False and outcome[0]["fail"]["shards"] == []
    assert outcome[0]["fail"]["files"] == ["manifest.json", "records.jsonl"]
    # the store that failed in its first round was resumed by the next scenario; it equals one process's
    assert outcome[0]["resume"] == {"rows": 23}
    assert_same_store(root / "resume", single_process(tiny_dir, tmp_path / "single", **SCENARIOS["resume"]))


def test_ranks_with_other_data_are_refused(runs):
    _, outcome = runs
    for rank in range(WORLD):
        assert "ranks planned different work" in outcome[rank]["mismatch"]["error"]
    assert not (runs[0] / "mismatch").exists()  # refused before anything is written


def test_complete_store_is_returned_unchanged(runs):
    _, outcome = runs
    assert outcome[0]["again"] == {"rows": 23} and outcome[1]["again"] == {"rows": None}


def test_torchrun_cli_equals_single_process(cli_run, tiny_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m sapguard.cli extract ...` on CPU: one store, printed once."""
    root, stdout = cli_run
    summary = json.loads(stdout)  # one JSON document: rank 1 prints (and writes) nothing
    assert summary["rows"] == 23 and summary["out"] == str(root / "cli")
    single = tmp_path / "single"
    with one_thread():
        extract_to_dir(load_model(str(tiny_dir), device="cpu", dtype="float32"), records(), single, 2, batch_size=2)
    assert_same_store(root / "cli", single)


def test_batches_are_length_balanced_and_rounds_cover_every_rank():
    assert assign_batches([10, 40, 30, 20], 2) == [[0, 1], [2, 3]]  # 40 | 30, 20 -> 30+20 | 40+10
    assert assign_batches([5], 3) == [[0], [], []]
    plan: Any = [[["b"]] * 3, [["b"]], [["b"]], [["b"]] * 2]  # batches per shard: 3, 1, 1, 2
    assert round_of(plan, 0, 2) == [0] and round_of(plan, 1, 2) == [1, 2] and round_of(plan, 3, 4) == [3]


def test_job_environment_and_rank_devices(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert dist_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(SapError, match="out of range"):
        dist_env()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    job = dist_env()
    assert job is not None and (job.rank, job.world_size, job.local_rank) == (3, 4, 1)
    assert rank_device("cpu", 1) == "cpu" and rank_device("cuda:0", 1) == "cuda:0"
    if not torch.cuda.is_available():
        assert rank_device("auto", 1) == "cpu"
        with pytest.raises(SapError, match="CUDA device"):
            rank_device("cuda", 1)


if __name__ == "__main__":  # a rank started by the `runs` fixture's torchrun
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
