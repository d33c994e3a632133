"""Bad input: a clear one-line SapError before any token is served."""

from __future__ import annotations

import pytest

from sapguard.engines.vllm import VLLMGuard, build_llm
from sapguard.errors import SapError
from sapguard.polytope.model import EncoderSpec, SafetyPolytope


@pytest.fixture(scope="module")
def small_polytope(tmp_path_factory):
    path = tmp_path_factory.mktemp("poly") / "p64"
    SafetyPolytope(64, 4, EncoderSpec(width=8), meta={"layer": 5, "base_model": {"id": "default"}}).save_pretrained(path)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_other_hidden_size(llm, small_polytope):
    with pytest.raises(SapError) as err:
        VLLMGuard(llm, small_polytope)
    assert "hidden size 64" in _one_line(err) and "576" in str(err.value)


def test_other_hidden_size_before_the_engine_starts(small_polytope):
    with pytest.raises(SapError, match="hidden size 64"):
        build_llm("default", polytope=str(small_polytope))


def test_layer_out_of_range(llm):
    with pytest.raises(SapError) as err:
        VLLMGuard(llm, "default", layer=31)
    assert "out of range" in _one_line(err)


def test_unknown_mode(llm):
    with pytest.raises(SapError) as err:
        VLLMGuard(llm, "default", mode="teleport")
    assert "unknown sapguard mode 'teleport'" in _one_line(err)
    with pytest.raises(SapError, match="not available"):
        VLLMGuard(llm, "default", mode="redirect")  # the detector has no steering direction


def test_unknown_mode_per_request(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with VLLMGuard(llm, "default") as guard:
        with pytest.raises(SapError, match="unknown sapguard mode"):
            guard.generate(["hi"], mode="teleport", max_tokens=2)
        # a raw request that bypasses VLLMGuard is refused at admission by the logits processor
        params = SamplingParams(max_tokens=2, extra_args={"sapguard_mode": "teleport"})
        with pytest.raises(VLLMValidationError, match="unknown sapguard mode"):
            llm.generate([{"prompt_token_ids": guard.encode("hi")}], params, use_tqdm=False)


def test_engine_without_the_extension(llm, monkeypatch):
    def missing(method, *args, **kwargs):  # what vLLM's run_method raises for an unknown worker method
        raise NotImplementedError(f"Method {method!r} is not implemented.")

    monkeypatch.setattr(llm, "collective_rpc", missing)
    with pytest.raises(SapError, match="without sapguard's worker extension"):
        VLLMGuard(llm, "default")


def test_polytope_for_another_model(llm, tmp_path):
    path = tmp_path / "other"
    meta = {"layer": 18, "base_model": {"id": "Qwen/Qwen2-1.5B-Instruct"}}
    SafetyPolytope(576, 4, EncoderSpec(width=8), meta=meta).save_pretrained(path)
    with pytest.raises(SapError) as err:
        VLLMGuard(llm, path)
    assert "trained on 'Qwen/Qwen2-1.5B-Instruct'" in _one_line(err)
