"""Config: the seed README's command (the published train.sh, line for line) and every flag of
the published parser parse with their published meaning; impossible values are rejected.

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
    (["--temp", "-0.5"], "temp"),
    (["--top_p", "0"], "top_p"),
    (["--top_p", "1.5"], "top_p"),
    (["--lora_r", "0"], "lora_r"),
    (["--wandb_mode", "sometimes"], "wandb_mode"),
    (["--dtype", "float8"], "dtype"),
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


# Every flag of the published train.py parser (meghanaasunil/iReasoner, parse_args), as data:
# flag -> (a value to pass, or None for a bare switch; our Config field; the value it must get).
PUBLISHED_FLAGS = {
    "--data_dir": ("/data", "data_dir", "/data"),
    "--include_subfolders": ("a,b", "include_subfolders_list", ["a", "b"]),
    "--solver_model": ("m/s", "solver_model", "m/s"),
    "--proposer_model": ("m/p", "proposer_model", "m/p"),
    "--device": ("cuda:1", "device", "cuda:1"),
    "--dtype": ("float16", "dtype", "float16"),
    "--device_map": ("auto", "device_map", "auto"),
    "--total_steps": ("7", "total_steps", 7),
    "--proposer_update_freq": ("3", "proposer_update_freq", 3),
    "--num_solver_samples": ("4", "num_solver_samples", 4),
    "--lr": ("2e-6", "lr", 2e-6),
    "--weight_decay": ("0.1", "weight_decay", 0.1),
    "--grad_clip": ("0.5", "grad_clip", 0.5),
    "--temp": ("0.7", "temp", 0.7),
    "--top_p": ("0.9", "top_p", 0.9),
    "--max_new_tokens_solver": ("99", "max_new_tokens_solver", 99),
    "--max_new_tokens_proposer": ("33", "max_new_tokens_proposer", 33),
    "--freeze_vision": (None, "freeze_vision", True),
    "--no-freeze-vision": (None, "freeze_vision", False),
    "--len_penalty_weight": ("0.1", "len_penalty_weight", 0.1),
    "--len_penalty_target_words": ("50", "len_penalty_target_words", 50),
    "--solver_soft_gamma": ("0.5", "solver_soft_gamma", 0.5),
    "--prop_entropy_mu": ("0.8", "proposer_reward_mu", 0.8),
    "--prop_entropy_sigma": ("0.3", "proposer_reward_sigma", 0.3),
    "--max_reasoning_steps": ("6", "max_reasoning_steps", 6),
    "--step_embed_max_tokens": ("32", "step_embed_max_tokens", 32),
    "--min_step_group_size": ("3", "min_step_group_size", 3),
    "--step_group_density_gamma": ("0.6", "step_group_density_gamma", 0.6),
    "--step_position_decay": ("0.2", "step_position_decay", 0.2),
    "--step_sim_temperature": ("0.5", "step_sim_temperature", 0.5),
    "--step_reward_w_start": ("0.1", "step_reward_weight_start", 0.1),
    "--step_reward_w_end": ("0.6", "step_reward_weight_end", 0.6),
    "--step_reward_warmup_frac": ("0.2", "step_reward_warmup", 0.2),
    "--kl_target": ("0.03", "kl_target", 0.03),
    "--kl_adapt_rate": ("0.2", "kl_adapt_rate", 0.2),
    "--kl_coef": ("0.01", "kl_coef", 0.01),
    "--seed": ("7", "seed", 7),
    "--output_dir": ("out", "output_dir", "out"),
    "--save_every": ("10", "save_every", 10),
    "--max_checkpoints": ("3", "max_checkpoints", 3),
    "--use_lora_solver": (None, "use_lora_solver", True),
    "--use_lora_proposer": (None, "use_lora_proposer", True),
    "--lora_r": ("8", "lora_r", 8),
    "--lora_alpha": ("16", "lora_alpha", 16),
    "--lora_dropout": ("0.1", "lora_dropout", 0.1),
    "--lora_targets": ("q_proj,v_proj", "lora_targets_list", ["q_proj", "v_proj"]),
    "--wandb_mode": ("offline", "wandb_mode", "offline"),
    "--wandb_project": ("p", "wandb_project", "p"),
    "--wandb_entity": ("team", "wandb_entity", "team"),
    "--wandb_run_name": ("r", "wandb_run_name", "r"),
    "--wandb_log_images_every": ("10", "wandb_log_images_every", 10),
    "--clear_cache_every": ("25", "clear_cache_every", 25),
}


@pytest.mark.parametrize("flag", sorted(PUBLISHED_FLAGS))
def test_every_published_flag_keeps_its_published_meaning(flag):
    value, name, expected = PUBLISHED_FLAGS[flag]
    cfg = parse_config([flag] + ([] if value is None else [value]))
    assert getattr(cfg, name) == expected


def test_the_published_train_sh_with_every_published_flag_parses(caplog):
    """The seed command is the published train.sh verbatim; add every other published flag
    (the LoRA run with --no-freeze-vision, as published, where peft kept the tower frozen)."""
    extra = []
    for flag, (value, _, _) in PUBLISHED_FLAGS.items():
        if flag not in SEED_COMMAND and flag != "--freeze_vision":
            extra += [flag] + ([] if value is None else [value])
    with caplog.at_level("WARNING", logger="ireasoner"):
        cfg = parse_config(SEED_COMMAND + extra)
    assert cfg.use_lora_solver and not cfg.freeze_vision and cfg.proposer_reward_mu == 0.8
    assert any("stay frozen, as in the published code" in r.getMessage() for r in caplog.records)


def test_published_device_moves_a_cpu_mapped_model():
    assert parse_config(["--device", "cuda:1", "--device_map", "cpu"]).device_map == "cuda:1"
    assert parse_config(["--device", "cuda:1"]).device_map == "auto"  # as published: unused
