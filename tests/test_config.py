"""Config: the seed README's command parses verbatim; impossible values are rejected.

    python -m pytest tests/test_config.py
"""
import pytest

from config import Config, parse_config

SEED_COMMAND = """--data_dir /path/to/data --wandb_mode online --wandb_project iReasoner
  --wandb_run_name iReasoner --solver_model Qwen/Qwen2.5-VL-7B-Instruct
  --proposer_model Qwen/Qwen2.5-VL-7B-Instruct --use_lora_solver --use_lora_proposer
  --lora_targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mm_projector
  --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 --num_solver_samples 5
  --proposer_update_freq 5 --total_steps 2500 --kl_target 0.020 --kl_adapt_rate 0.10
  --solver_soft_gamma 0.7 --clear_cache_every 5""".split()


def test_seed_command_round_trip():
    cfg = parse_config(SEED_COMMAND)
    assert cfg.data_dir == "/path/to/data" and cfg.wandb_mode == "online"
    assert cfg.wandb_project == "iReasoner" and cfg.wandb_run_name == "iReasoner"
    assert cfg.solver_model == cfg.proposer_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert cfg.use_lora_solver and cfg.use_lora_proposer
    assert cfg.lora_targets_list == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj", "mm_projector"]
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert (cfg.num_solver_samples, cfg.proposer_update_freq, cfg.total_steps) == (5, 5, 2500)
    assert (cfg.kl_target, cfg.kl_adapt_rate, cfg.solver_soft_gamma) == (0.02, 0.1, 0.7)
    assert cfg.clear_cache_every == 5


def test_defaults():
    cfg = parse_config([])
    assert cfg.device_map == "auto" and cfg.seed == 42 and cfg.output_dir == "runs"
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.temp, cfg.top_p) == (1e-6, 0.01, 1.0, 1.0, 1.0)
    assert (cfg.max_new_tokens_solver, cfg.max_new_tokens_proposer) == (256, 128)
    assert cfg.freeze_vision and cfg.wandb_mode == "disabled" and cfg.kl_coef == 1e-3
    assert (cfg.proposer_reward_mu, cfg.proposer_reward_sigma) == (0.9, 0.35)
    assert (cfg.step_reward_weight_start, cfg.step_reward_weight_end, cfg.step_reward_warmup) == (0.0, 0.7, 0.3)
    assert (cfg.len_penalty_weight, cfg.len_penalty_target_words, cfg.max_reasoning_steps) == (0.05, 64, 8)
    assert (cfg.step_position_decay, cfg.step_group_density_gamma, cfg.min_step_group_size) == (0.15, 0.7, 2)


def test_lists_and_switches():
    cfg = parse_config(["--include_subfolders=split1, split2", "--no_freeze_vision",
                        "--dtype", "float32"])
    assert cfg.include_subfolders_list == ["split1", "split2"]
    assert cfg.freeze_vision is False and cfg.dtype == "float32"


@pytest.mark.parametrize("flags, message", [
    (["--num_solver_samples", "0"], "num_solver_samples"),
    (["--total_steps", "0"], "total_steps"),
    (["--lr", "0"], "lr"),
    (["--kl_target", "-1"], "kl_target"),
    (["--temp", "0"], "temp"),
    (["--top_p", "0"], "top_p"),
    (["--top_p", "1.5"], "top_p"),
    (["--lora_r", "0"], "lora_r"),
    (["--wandb_mode", "sometimes"], "wandb_mode"),
    (["--dtype", "float8"], "dtype"),
    (["--use_lora_solver", "--no_freeze_vision"], "no_freeze_vision"),
    (["--use_lora_solver", "--lora_targets", " , "], "lora_targets"),
])
def test_rejects_impossible_values(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(flags)


def test_unknown_flag_is_an_error():
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_config(["--no_such_flag", "1"])


def test_config_is_the_only_source_of_defaults():
    assert Config().lr == parse_config([]).lr
