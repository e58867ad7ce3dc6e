"""Time real iReasoner training steps on a random-weight Qwen2.5-VL, against a reference-style step.

    python scripts/bench.py                                      # tiny defaults, CPU, float32
    python scripts/bench.py --steps 3 --json runs/bench.json
    python scripts/bench.py --preset 3b --device cuda --dtype bfloat16   # Qwen2.5-VL-3B shapes, on a GPU
    python scripts/bench.py --dtype bfloat16 --decode hf --baseline_steps 0  # HF-layer decode step
    python scripts/bench.py --images_per_step 1,4,8 --baseline_steps 0  # batched steps, side by side
    .compat/vllm/bin/python scripts/bench.py --engines hf,vllm --baseline_steps 0  # rollout engines

Our step is train.train_step itself (rollout -> rewards -> updates); its phases are timed by the
phase timer train_step takes. The yardstick re-creates the published reference's step
in the same process: N separate generate calls, text re-tokenized for the loss, full-sequence
full-vocabulary log-softmax, image re-encoded every forward, N backward passes and optimizer steps.
It runs at our thread count and at torch's default (the published reference never set it), and
the speed-up over each is printed. With several --images_per_step values, the B's take turns
step by step (so a shared machine's load falls on all alike) and their generated tokens/s are
compared with the first B's. Random weights rarely emit eos, so every completion runs to
max_new_tokens. Figures are medians after one warm-up step, with CPU seconds beside wall seconds
because other processes on a shared machine inflate wall time. The decode step sampling takes
(lean or HF layers, sampling.decode_path) is printed with its reason before the steps. With
--engines, each engine (our loop with the lean step, with the HF layers, vLLM: vllm_engine.py) runs
the same train_step in turns and one table compares them; vLLM's figures include its adapter syncs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_reference  # noqa: E402
from bench_plan import plan_peak_mib  # noqa: E402
import cli  # noqa: E402
import sampling  # noqa: E402
import train  # noqa: E402
from config import Config  # noqa: E402
from data_and_utils import ImagePool  # noqa: E402
from distributed import Dist  # noqa: E402
from runtime import keep_freed_memory, seed_all  # noqa: E402
from tools import tiny  # noqa: E402
from vlm import ROLES, core_model  # noqa: E402

# The seed repository's target list; mm_projector matches no language-model Linear (a warning).
SEED_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mm_projector"
MODEL_FLAGS = dict(hidden=256, layers=4, intermediate=512, heads=4, kv_heads=2, vocab=4096,
                   vision_depth=2, vision_hidden=64, vision_heads=2, vision_intermediate=128,
                   fullatt_block_indexes="", max_pixels=224 * 224)
# Qwen2.5-VL-3B-Instruct's shapes, including the real vision tower.
PRESET_3B = dict(hidden=2048, layers=36, intermediate=11008, heads=16, kv_heads=2, vocab=151936,
                 vision_depth=32, vision_hidden=1280, vision_heads=16, vision_intermediate=3420,
                 fullatt_block_indexes="7,15,23,31", max_pixels=1024 * 28 * 28)
DEFAULT_THREADS = torch.get_num_threads()  # before we change it: what an untouched run uses
PHASES = ("prompts", "proposer_generate", "solver_generate", "rewards", "solver_update",
          "proposer_update", "solver_sync", "proposer_sync")  # sync: vllm only (adapter upload)
ENGINES = ("hf", "hf_layers", "vllm")  # our loop (--decode decides the step), HF layers, vLLM


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python scripts/bench.py", description=__doc__.splitlines()[0])
    for name, default in MODEL_FLAGS.items():
        p.add_argument(f"--{name}", type=type(default), default=None,
                       help=f"model shape (default {default!r}; --preset 3b sets the 3B value)")
    p.add_argument("--preset", choices=("tiny", "3b"), default="tiny")
    p.add_argument("--steps", type=int, default=6, help="our steps; the first is a warm-up")
    p.add_argument("--baseline_steps", type=int, default=3, help="reference-style steps (0 = skip)")
    p.add_argument("--baseline_threads", default="same,default",
                   help="thread counts for the reference-style runs: 'same' as --threads, "
                        "'default' (torch's, which the published reference ran with) or numbers")
    p.add_argument("--max_new_tokens_solver", type=int, default=128)
    p.add_argument("--max_new_tokens_proposer", type=int, default=48)
    p.add_argument("--num_solver_samples", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for our steps (0 = torch's default, all cores). 1 is robust "
                        "on a shared 2-core CPU: decode ops are too small to split, and OpenMP "
                        "spin-waiting makes a 2nd thread 10x slower when another process wants it")
    p.add_argument("--images_per_step", default="1",
                   help="comma-separated B values (images per step), timed in turns; the "
                        "smallest is the yardstick; the reference-style step runs one image")
    p.add_argument("--update_micro_batch", type=int, default=0)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--decode", choices=("auto", "hf"), default="auto",
                   help="decode step: 'auto' (the lean step where sampling.decode_path allows it) "
                        "or 'hf' (force the HF layers, to measure what the lean step is worth)")
    p.add_argument("--engines", default="hf",
                   help="comma-separated rollout engines, timed in turns in one run: hf (our loop, "
                        "the step --decode picks), hf_layers (our loop, HF layers), vllm (needs "
                        "vLLM: run bench with .compat/vllm/bin/python, see docs/vllm.md)")
    p.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3)
    p.add_argument("--runs", default="runs", help="cache folder for the model and images")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = cli.parse_or_exit(p, argv)
    try:
        args.images_per_step = sorted({int(b) for b in args.images_per_step.split(",")
                                       if b.strip()})
    except ValueError:
        p.error(f"--images_per_step takes integers like 1,4,8, got {args.images_per_step!r}")
    if not args.images_per_step or min(args.images_per_step) < 1:
        p.error("--images_per_step needs values >= 1")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or set(args.engines) - set(ENGINES):
        p.error(f"--engines takes some of {','.join(ENGINES)}, got {args.engines}")
    preset = PRESET_3B if args.preset == "3b" else MODEL_FLAGS
    for name in MODEL_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    return args


# ---------------------------------------------------------------- setup
def build_model(args) -> str:
    """The random checkpoint, cached under runs/ by its shape (built through from_pretrained)."""
    shape = {k: getattr(args, k) for k in MODEL_FLAGS}
    name = f"bench-model-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if any(shape[k] != v for k, v in MODEL_FLAGS.items() if k not in ("hidden", "layers", "vocab")):
        name += "-" + hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    fullatt = [int(i) for i in args.fullatt_block_indexes.split(",") if i.strip()] or None
    kw = {k: v for k, v in shape.items() if k != "fullatt_block_indexes"}
    return tiny.build_tiny_model(os.path.join(args.runs, name), **kw, fullatt_block_indexes=fullatt,
                                 dtype=args.dtype)


def make_config(args, model_dir: str, images: str) -> Config:
    return Config(data_dir=images, solver_model=model_dir, proposer_model=model_dir,
                  dtype=args.dtype, device_map="cuda:0" if args.device == "cuda" else "cpu",
                  attn_implementation=args.attn_implementation,
                  gradient_checkpointing=args.gradient_checkpointing,
                  use_lora_solver=True, use_lora_proposer=True, lora_targets=SEED_LORA_TARGETS,
                  lora_r=16, lora_alpha=32, num_solver_samples=args.num_solver_samples,
                  max_new_tokens_solver=args.max_new_tokens_solver,
                  max_new_tokens_proposer=args.max_new_tokens_proposer,
                  total_steps=max(args.steps, args.baseline_steps), proposer_update_freq=5,
                  kl_estimator="exact", update_micro_batch=args.update_micro_batch,
                  max_pixels=args.max_pixels, output_dir=args.runs, wandb_mode="disabled",
                  lean_decode=args.decode == "auto",
                  vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)


# ---------------------------------------------------------------- timing
class Split:
    """Wall and CPU seconds per phase within one step, and the tokens generated. CPU seconds of
    this process are kept beside wall time: on a shared machine, wall time hides contention."""
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.reset()

    def reset(self):
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        self.tokens = 0

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    @contextmanager
    def phase(self, name: str):
        wall, cpu = self.now()
        yield
        wall2, cpu2 = self.now()
        self.wall[name] += wall2 - wall
        self.cpu[name] += cpu2 - cpu


def timed_steps(label: str, split: Split, steps: int, run_step) -> list[dict]:
    return [timed_step(label, split, step, run_step) for step in range(1, steps + 1)]


def timed_step(label: str, split: Split, step: int, run_step) -> dict:
    split.reset()
    wall, cpu = split.now()
    run_step(step)
    wall2, cpu2 = split.now()
    print(f"  {label} step {step}: {wall2 - wall:.3f} s (cpu {cpu2 - cpu:.3f} s)", flush=True)
    return {"seconds": wall2 - wall, "cpu_seconds": cpu2 - cpu, "tokens": split.tokens,
            "wall": dict(split.wall), "cpu": dict(split.cpu)}


def run_ours(run, args) -> dict[int, list[dict]]:
    """args.steps steps at each --images_per_step value, interleaved (step 1 at every B, then
    step 2, ...) so that a shared machine's changing load falls on all of them alike. Each
    record carries the peak memory of its own step."""
    split, cfg = Split(args.device), run.cfg

    def run_step(step):
        records = train.train_step(run, step, timer=split.phase)
        if records is None:
            raise SystemExit("interrupted by a signal")
        split.tokens += sum(r["generated_tokens"] for r in records)  # one record per image

    runs = {b: [] for b in args.images_per_step}
    for step in range(1, args.steps + 1):
        for b in args.images_per_step:
            cfg.images_per_step = b
            reset_peak_memory(args.device)
            record = timed_step(f"our B={b}", split, step, run_step)
            runs[b].append({**record, "peak_memory_mib": peak_memory_mib(args.device)})
    cfg.images_per_step = 1
    return runs


def run_engines(run, args) -> dict[tuple, list]:
    """run_ours for each --engines entry: (engine, B) pairs take turns step by step, so a shared
    machine's load falls on all alike. One vLLM engine serves every B (sized for the largest)."""
    cfg, policies, pool, dist = run.cfg, run.policies, run.pool, run.dist
    split, engine, engine_mib = Split(args.device), None, 0.0
    if "vllm" in args.engines:
        import vllm_engine
        cfg.images_per_step = max(args.images_per_step)  # its max_num_seqs
        before = memory_now_mib(args.device)
        engine = vllm_engine.start(cfg, policies, dist, pool.max_pixels, pool.factor)
        # What the engine holds (weights, reserved KV cache) is no part of the hf rows' peak.
        engine_mib = memory_now_mib(args.device) - before
        print(f"vLLM engine started: {engine_mib:.0f} MiB", flush=True)
    lean = args.decode == "auto"
    runs = {(e, b): [] for e in args.engines for b in args.images_per_step}
    try:
        for step in range(1, args.steps + 1):
            for e, b in runs:
                cfg.images_per_step = b
                cfg.lean_decode = lean and e == "hf"

                run.engine = engine if e == "vllm" else None

                def run_step(n):
                    records = train.train_step(run, n, timer=split.phase)
                    if records is None:
                        raise SystemExit("interrupted by a signal")
                    split.tokens += sum(r["generated_tokens"] for r in records)

                reset_peak_memory(args.device)
                record = timed_step(f"{e} B={b}", split, step, run_step)
                peak = peak_memory_mib(args.device) - (engine_mib if e != "vllm" else 0.0)
                runs[(e, b)].append({**record, "peak_memory_mib": peak})
    finally:
        cfg.lean_decode = lean
        cfg.images_per_step = 1
        run.engine = None
        if engine is not None:
            engine.close()
    return runs


def print_engines(rows: list[dict], memory: str) -> None:
    """One row per (engine, B): s/step, generated tokens/s (per wall and per CPU second of this
    process), peak memory, and the phases in seconds per step."""
    shown = [p for p in PHASES if any(r["phases"][p]["wall"] for r in rows)]
    print("\nrollout engines (same run, in turns):")
    print(f"  {'engine':<10} {'B':>3} {'s/step':>8} {'gen tok/s':>10} {'tok/cpu-s':>10} "
          f"{memory + ' MiB (plan)':>22} " + " ".join(f"{p:>17}" for p in shown))
    for r in rows:
        print(f"  {r['engine']:<10} {r['images_per_step']:>3} {r['seconds_per_step']:8.3f} "
              f"{r['generated_tokens_per_second']:10.0f} "
              f"{r['generated_tokens_per_cpu_second']:10.0f} "
              f"{r['peak_memory_mib']:13.0f} ({r['plan_peak_mib']:6.0f}) "
              + " ".join(f"{r['phases'][p]['wall']:17.3f}" for p in shown))
    print("  (phase columns: wall seconds per step; vllm's peak includes its weights and the KV "
          "cache it reserves, the other rows' leave them out; plan: memplan.py's, the "
          "trainer's alone)")


# ---------------------------------------------------------------- the reference-style yardstick
def run_reference(cfg, args, policies, optimizers, pool, st) -> list[dict]:
    split = Split(args.device)

    def run_step(step):
        _, image = pool.get(step - 1)
        bench_reference.reference_step(cfg, policies, optimizers, image, st, step, split)

    return timed_steps("reference-style", split, args.baseline_steps, run_step)


# ---------------------------------------------------------------- report
def summarize(records: list[dict]) -> dict:
    """Medians over the steps after the warm-up. A phase's figure is per step, amortized: the
    median over the steps it ran in, times the share of steps it ran in (the proposer update
    runs every proposer_update_freq-th step)."""
    measured = records[1:] or records
    phases = {}
    for p in PHASES:
        ran = [r for r in measured if p in r["wall"]]
        share = len(ran) / len(measured)
        phases[p] = {key: share * statistics.median(r[key][p] for r in ran) if ran else 0.0
                     for key in ("wall", "cpu")}
        phases[p]["per_call"] = statistics.median(r["wall"][p] for r in ran) if ran else None
    gen = sum(phases[p]["wall"] for p in PHASES if p.endswith("generate"))
    gen_cpu = sum(phases[p]["cpu"] for p in PHASES if p.endswith("generate"))
    tokens = statistics.median(r["tokens"] for r in measured)
    return {"seconds_per_step": statistics.median(r["seconds"] for r in measured),
            "cpu_seconds_per_step": statistics.median(r["cpu_seconds"] for r in measured),
            "seconds_per_step_mean": statistics.mean(r["seconds"] for r in measured),
            "step_seconds": [round(r["seconds"], 4) for r in records],
            "step_cpu_seconds": [round(r["cpu_seconds"], 4) for r in records],
            "phases": phases, "tokens_per_step": tokens,
            "generated_tokens_per_second": tokens / max(gen, 1e-9),
            # per CPU second of this process: what contention on a shared machine does not inflate
            "generated_tokens_per_cpu_second": tokens / max(gen_cpu, 1e-9)}


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's counter, or Linux's peak RSS (VmHWM), which writing 5 to
    /proc/self/clear_refs resets to the current RSS."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def memory_now_mib(device: str) -> float:
    """CUDA memory allocated now, or this process's RSS (VmRSS)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def peak_memory_mib(device: str) -> float:
    """Peak since reset_peak_memory (without /proc, the whole process's peak RSS)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_summary(name: str, s: dict, memory_label: str) -> None:
    print(f"\n{name}: {s['seconds_per_step']:.3f} s/step (median after 1 warm-up; cpu "
          f"{s['cpu_seconds_per_step']:.3f} s, mean wall {s['seconds_per_step_mean']:.3f} s), "
          f"{s['generated_tokens_per_second']:.0f} generated tokens/s, {s['tokens_per_step']:.0f} "
          f"tokens/step, {memory_label}")
    total = sum(v["wall"] for v in s["phases"].values()) or 1.0
    for phase, v in s["phases"].items():
        extra = f"  ({v['per_call']:.3f} s per call, every 5th step)" \
            if phase == "proposer_update" and v["per_call"] is not None else ""
        print(f"  {phase:<18} {v['wall']:7.3f} s/step (cpu {v['cpu']:6.3f}) "
              f"{100 * v['wall'] / total:5.1f}%{extra}")


# ---------------------------------------------------------------- main
def thread_settings(spec: str, ours: int) -> list[int]:
    """--baseline_threads entries: 'same' (ours), 'default' (torch's, as the reference ran) or N."""
    counts = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        n = ours if item == "same" else DEFAULT_THREADS if item == "default" else int(item)
        if n not in counts:
            counts.append(n)
    return counts


def run_baselines(cfg, args, policies, optimizers, pool, st, ours: dict, memory: str) -> list:
    """The reference-style step at each requested thread count; the speed-up of ours over each."""
    results = []
    for threads in thread_settings(args.baseline_threads, torch.get_num_threads()):
        torch.set_num_threads(threads)
        reset_peak_memory(args.device)
        ref = summarize(run_reference(cfg, args, policies, optimizers, pool, st))
        ref.update(threads=threads, peak_memory_mib=peak_memory_mib(args.device),
                   speedup=ref["seconds_per_step"] / ours["seconds_per_step"])
        label = "torch's default, as the published reference ran" if threads == DEFAULT_THREADS \
            else "our setting"
        print_summary(f"reference-style ({_threads(threads)}, {label})", ref,
                      f"{memory} {ref['peak_memory_mib']:.0f} MiB")
        results.append(ref)
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    print()
    for ref in results:
        print(f"speed-up vs reference-style step: {ref['speedup']:.1f}x  (reference-style at "
              f"{_threads(ref['threads'])}: {ref['seconds_per_step']:.3f} s/step; ours at "
              f"{_threads(ours['threads'])}: {ours['seconds_per_step']:.3f} s/step)")
    return results


def decode_path(args, model) -> tuple[str, str]:
    """sampling.decode_path for the solver (the proposer shares its model and LoRA config),
    with the lean step on or off as --decode asks (make_config passes it as --lean_decode)."""
    return sampling.decode_path(core_model(model).language_model, model.get_output_embeddings(),
                                args.decode == "auto")


def print_batched(runs: list[dict], memory: str) -> None:
    """One row per B: generated tokens/s (per wall second and per CPU second of this process)
    against the first B's, seconds per image and its phase split."""
    first = runs[0]
    print("\nimages per step (same run; ratios against the first row):")
    print(f"  {'B':>3} {'s/step':>8} {'s/image':>8} {'gen tok/s':>10} {'ratio':>6} "
          f"{'tok/cpu-s':>10} {'ratio':>6} " + " ".join(f"{p:>17}" for p in PHASES)
          + f"  {memory}")
    for r in runs:
        b = r["images_per_step"]
        r["tokens_per_second_ratio"] = (r["generated_tokens_per_second"]
                                        / first["generated_tokens_per_second"])
        r["tokens_per_cpu_second_ratio"] = (r["generated_tokens_per_cpu_second"]
                                            / first["generated_tokens_per_cpu_second"])
        split = " ".join(f"{r['phases'][p]['wall'] / b:17.3f}" for p in PHASES)
        print(f"  {b:>3} {r['seconds_per_step']:8.3f} {r['seconds_per_image']:8.3f} "
              f"{r['generated_tokens_per_second']:10.0f} {r['tokens_per_second_ratio']:5.2f}x "
              f"{r['generated_tokens_per_cpu_second']:10.0f} "
              f"{r['tokens_per_cpu_second_ratio']:5.2f}x {split}  {r['peak_memory_mib']:.0f} MiB"
              f" (plan {r['plan_peak_mib']:.0f})")
    print("  (phase columns: wall seconds per image; plan: memplan.py's tensors, without the "
          "CUDA context; on the CPU the peak is the whole process's RSS)")


def busy(device: str, *runs: dict) -> bool:
    """True when a measured CPU step's wall time exceeds its CPU time per thread by 15%: this
    process was waiting for a core, not computing. (On a GPU the CPU waits for the device.)"""
    return device == "cpu" and any(
        wall * run["threads"] > 1.15 * cpu for run in runs
        for wall, cpu in zip(run["step_seconds"][1:], run["step_cpu_seconds"][1:]))


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    keep_freed_memory()  # as train.train() does
    model_dir = build_model(args)
    images = tiny.make_synthetic_images(os.path.join(args.runs, "bench-images"), n=12)
    cfg = make_config(args, model_dir, images)
    dist, stop = Dist(), train.Stop()
    pool = ImagePool(cfg.data_dir, [], cfg.seed, cfg.max_pixels)
    seed_all(cfg.seed)
    policies, optimizers = train.build_models(cfg, pool)
    st = train.TrainState(kl_coef={r: cfg.kl_coef for r in ROLES})
    print(f"bench: {model_dir} on {args.device}/{args.dtype}, {_threads(torch.get_num_threads())}, "
          f"N={cfg.num_solver_samples}, {cfg.max_new_tokens_proposer}+{cfg.num_solver_samples}x"
          f"{cfg.max_new_tokens_solver} new tokens, LoRA r{cfg.lora_r}, exact KL", flush=True)
    path = decode_path(args, policies["solver"].model)
    print(f"decode path: {path[0]} ({path[1]})", flush=True)
    load = [os.getloadavg()[0]]
    memory = "peak " + ("CUDA allocated" if args.device == "cuda" else "RSS")
    batched = []
    run = train.Run(cfg=cfg, dist=dist, name="bench", dir=args.runs, pool=pool, policies=policies,
                    optimizers=optimizers, st=st, stop=stop)
    if args.engines != ["hf"]:
        return compare_engines(args, run, memory, load)
    for b, records in run_ours(run, args).items():
        s = summarize(records)
        # The first round runs the B's in ascending order, before any larger B has grown the
        # process (freed memory is not always returned to the OS): its peak is this B's own.
        s.update(threads=torch.get_num_threads(), images_per_step=b, steps=records,
                 peak_memory_mib=records[0]["peak_memory_mib"],
                 plan_peak_mib=plan_peak_mib(cfg, b, args.device),
                 seconds_per_image=s["seconds_per_step"] / b)
        print_summary(f"ours, {b} image{'s' if b > 1 else ''} per step", s,
                      f"{memory} {s['peak_memory_mib']:.0f} MiB (plan "
                      f"{s['plan_peak_mib']:.0f})")
        batched.append(s)
    ours = batched[0]
    result = {"args": vars(args), "decode_path": path, "ours": ours, "ours_steps": ours["steps"]}
    if len(batched) > 1:
        result["images_per_step"] = batched
        print_batched(batched, memory)
    if args.baseline_steps:
        result["reference"] = run_baselines(cfg, args, policies, optimizers, pool, st, ours,
                                            memory)
    # Other processes on a shared machine slow every figure: say so rather than print bad numbers.
    result["load_average_1min"] = load + [os.getloadavg()[0]]
    result["machine_busy"] = busy(args.device, *batched, *result.get("reference", []))
    if result["machine_busy"]:
        print("note: other processes took CPU time during this run (wall > CPU seconds per thread);"
              " wall-clock figures are inflated, a second thread most of all: compare the CPU "
              "seconds or rerun on a quiet machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


def compare_engines(args, run, memory, load) -> dict:
    """main() for several --engines: their table, and the JSON (no reference-style steps)."""
    rows = []
    for (e, b), records in run_engines(run, args).items():
        s = summarize(records)
        s.update(engine=e, threads=torch.get_num_threads(), images_per_step=b, steps=records,
                 peak_memory_mib=max(r["peak_memory_mib"] for r in records),
                 plan_peak_mib=plan_peak_mib(run.cfg, b, args.device))
        print_summary(f"{e}, {b} image{'s' if b > 1 else ''} per step", s,
                      f"{memory} {s['peak_memory_mib']:.0f} MiB (plan "
                      f"{s['plan_peak_mib']:.0f}, the trainer's)")
        rows.append(s)
    print_engines(rows, memory)
    result = {"args": vars(args), "engines": rows,
              "load_average_1min": load + [os.getloadavg()[0]],
              "machine_busy": busy(args.device, *rows)}
    if result["machine_busy"]:
        print("note: other processes took CPU time during this run (wall > CPU seconds per "
              "thread): compare the CPU seconds or rerun on a quiet machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
