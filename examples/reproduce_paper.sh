#!/usr/bin/env bash
# The paper end to end (docs/reproduce.md): its 2,500 training images, the seed command, the
# merged export, lmms-eval on the table's eight benchmarks for the base model and the trained
# Solver, and the table beside the paper's. Flags after the script are passed on to train.py.
#
#     CHARTX_DIR=/data/ChartX_png OPENAI_API_KEY=... bash examples/reproduce_paper.sh
#
# DATA_DIR      the training images (default data/paper; prepared only when it does not exist)
# CHARTX_DIR    the unzipped ChartX PNGs (ChartX has no copy that `datasets` loads)
# STEPS         training steps (2500); the evaluated Solver is RUN_DIR/step_<STEPS>/solver
# RUN_DIR       the run folder (runs/iReasoner: the seed command's run name)
# EVAL_MODEL    merged: upstream lmms-eval's qwen2_5_vl on the merged export (default);
#               lora: EvoLMM's lmms-eval, its qwen2_5_vl_our with the Solver as lora_path
# ACCELERATE    the accelerate of lmms-eval's environment (accelerate); NPROC processes (8)
# RESULTS       lmms-eval outputs, the merged export and the table (results/paper)
# STAGES        which of prepare,train,export,eval,table to run (all)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/paper}
STEPS=${STEPS:-2500}
RUN_DIR=${RUN_DIR:-runs/iReasoner}
EVAL_MODEL=${EVAL_MODEL:-merged}
ACCELERATE=${ACCELERATE:-accelerate}
NPROC=${NPROC:-8}
RESULTS=${RESULTS:-results/paper}
STAGES=${STAGES:-prepare,train,export,eval,table}
BASE=Qwen/Qwen2.5-VL-7B-Instruct
SOLVER=$RUN_DIR/step_$(printf %05d "$STEPS")/solver
MERGED=$RESULTS/merged-solver
# lmms-eval 0.7.3's names (tests/test_paper_tasks.py checks them against the installed registry;
# scripts/paper_table.py's BENCHMARKS, in the same order).
TASKS=infovqa_val,ai2d,scienceqa_img,mmmu_val,chartqa,mathvista_testmini_format,mathvision_test,mathverse_testmini
PIXELS=max_pixels=12845056  # EvoLMM's evaluate.sh; upstream's qwen2_5_vl defaults to 1605632

stage() { [[ ",$STAGES," == *",$1,"* ]]; }
case $EVAL_MODEL in merged|lora) ;; *) echo "EVAL_MODEL must be merged or lora" >&2; exit 2;; esac

if stage prepare && [ ! -e "$DATA_DIR" ]; then
  : "${CHARTX_DIR:?set CHARTX_DIR to the unzipped ChartX PNGs (see docs/reproduce.md)}"
  python scripts/prepare_paper_data.py --out "$DATA_DIR" --source "chartx=$CHARTX_DIR" --seed 42
fi
if stage train; then  # the seed command; rerun to resume
  DATA_DIR=$DATA_DIR bash examples/seed.sh --total_steps "$STEPS" "$@"
fi
if stage export && [ "$EVAL_MODEL" = merged ]; then
  python run.py export --model "$BASE" --adapter "$SOLVER" --out "$MERGED"
fi
lmms_eval() {  # NAME MODEL MODEL_ARGS
  "$ACCELERATE" launch --num_processes "$NPROC" --main_process_port 12346 -m lmms_eval \
    --model "$2" --model_args "$3" --tasks "$TASKS" --batch_size 1 --output_path "$RESULTS/$1"
}
if stage eval; then
  # MathVista's and MathVerse's answers are judged by an LLM (lmms-eval: OpenAI by default).
  if [ -z "${OPENAI_API_KEY:-}" ] && [ -z "${API_TYPE:-}" ]; then
    echo "set OPENAI_API_KEY, or API_TYPE for another lmms-eval judge" >&2
    exit 2
  fi
  lmms_eval base qwen2_5_vl "pretrained=$BASE,$PIXELS"
  if [ "$EVAL_MODEL" = merged ]; then
    lmms_eval solver qwen2_5_vl "pretrained=$MERGED,$PIXELS"
  else
    lmms_eval solver qwen2_5_vl_our \
      "pretrained=$BASE,base_model=$BASE,lora_path=$SOLVER,$PIXELS,interleave_visuals=False"
  fi
fi
if stage table; then
  python scripts/paper_table.py --base "$RESULTS/base" --solver "$RESULTS/solver" --out "$RESULTS"
fi
