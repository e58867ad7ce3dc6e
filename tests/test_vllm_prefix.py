"""vLLM prefix caching (--vllm_prefix_caching, on by default) changes nothing sampled, the N
samples of a prompt share its prefill, and nothing is shared between generate calls. Runs
tests/vllm_prefix_check.py in the vLLM environment (see tests/test_vllm.py).

    bash scripts/install_vllm.sh && python -m pytest tests/test_vllm_prefix.py
"""
import json
import os

import pytest

from test_vllm import model, run, vllm_python  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_prefix_caching_samples_what_no_caching_does(vllm_python, model, image_dir):  # noqa: F811
    proc = run(vllm_python, [os.path.join("tests", "vllm_prefix_check.py"), model, image_dir])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for role in ("solver", "proposer"):
        for pair in ("on_vs_off", "on_again"):
            assert result[pair][role]["same_ids"], result
            assert result[pair][role]["max_logprob_gap"] <= 1e-6, result
    # generate calls: proposer (n=1), solver (n=4), then the same again
    cached = result["cached_tokens_on"]
    assert all(t > 0 for t in cached[1] + cached[3]), cached  # the N samples share the prompt
    assert cached[2] == [0, 0], cached  # reset at every generate: no hit from the first call
    assert all(t == 0 for call in result["cached_tokens_off"] for t in call)
