"""scripts/gpu_check.py's legs, argument checks and JSON, on the CPU (--cpu_dry_run: the tiny
model, the same code paths as on a GPU; vLLM legs are skipped in an environment without it).

    python -m pytest tests/test_gpu_check.py -q
"""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--cpu_dry_run", "--legs", "hf_b1,hf_b3"], "--legs takes some of"),
    (["--cpu_dry_run", "--steps", "1"], "--steps must be >= 2"),
    ([], "no CUDA device"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    if not argv and gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_the_legs_are_the_ones_the_check_promises():
    legs = {leg.name: leg for leg in gpu_check.LEGS}
    assert (legs["hf_b8_ckpt_micro"].images, legs["hf_b8_ckpt_micro"].checkpointing) == (8, True)
    assert legs["hf_b2_micro"].micro_batch and legs["vllm_b8"].engine == "vllm"


@pytest.mark.slow
def test_dry_run_legs_a_failing_leg_and_the_torchrun_resume(tmp_path, monkeypatch):
    """hf_b1, a failing hf_b2_micro (recorded, the next leg runs), vllm_b1 (skipped without
    vLLM, or run with it) and the resume under torchrun; the JSON is complete after each leg."""
    real = gpu_check.run_leg
    written = []

    def run_leg(run, leg, *args):
        if leg.name == "hf_b2_micro":
            raise RuntimeError("CUDA out of memory (planted)")
        return real(run, leg, *args)

    def write_json(path, result):
        written.append(sorted(result["legs"]))
        real_write(path, result)
    real_write = gpu_check.write_json
    monkeypatch.setattr(gpu_check, "run_leg", run_leg)
    monkeypatch.setattr(gpu_check, "write_json", write_json)
    code = gpu_check.main(["--cpu_dry_run", "--out", str(tmp_path),
                           "--legs", "hf_b1,hf_b2_micro,vllm_b1,resume_torchrun"])
    assert code == 1  # a leg failed
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    legs = result["legs"]
    assert written[:4] == [[], ["hf_b1"], ["hf_b1", "hf_b2_micro"],
                           ["hf_b1", "hf_b2_micro", "vllm_b1"]]
    assert legs["hf_b2_micro"] == {"error": "RuntimeError: CUDA out of memory (planted)"}
    pre = result["preflight"]
    assert pre["torch"] and pre["transformers"] and pre["peft"]
    if pre["vllm"] is None:
        assert legs["vllm_b1"]["skipped"].startswith("vLLM: ")
    for name in ("hf_b1", "resume_torchrun"):
        r = legs[name]
        assert r["seconds_per_step"] > 0 and r["peak_allocated_gib"] > 0, r
        assert r["proposer_updated"] and 0 <= r["solver_logprob_diff"] < 1e-4, r
        assert r["plan_gib"] > 0, r  # the memory plan beside the measured peak
    assert legs["hf_b1"]["generated_tokens_per_second"] > 0
    assert legs["hf_b1"]["decode_path"][0] == "lean"
    assert legs["resume_torchrun"]["logged_steps"] == [1, 2] and legs["resume_torchrun"]["resumed"]
