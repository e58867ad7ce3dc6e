"""Loading a base model, with one clear line for every way that fails.

The hub client and transformers report a missing folder, an unreachable hub, a text-only
model, a damaged weights file or a missing tokenizer as 20-line tracebacks (or, for a missing
tokenizer, not at all: transformers 5 builds an empty one). load_backbone checks each in turn,
cheapest first, and raises UserError("cannot load model NAME: CAUSE").

    python -m pytest tests/test_reliability.py -q -k model
"""
from __future__ import annotations

import os
import pickle

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from errors import UserError, first_line


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else can only be a folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
            or name.count("/") > 1)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _hub_cause(e: OSError) -> str:
    """transformers wraps the hub client's errors in OSErrors of varying text; the original is
    in the exception chain."""
    from huggingface_hub.errors import RepositoryNotFoundError
    if any(isinstance(x, RepositoryNotFoundError) for x in _chain(e)):
        return "not a local folder and not a model on the Hugging Face Hub (a typo?)"
    text = str(e)
    if "couldn't connect" in text or "offline" in text.lower():
        return ("not a local folder, not in the Hugging Face cache, and the Hub cannot be "
                "reached (offline?); download it first, or pass a local folder")
    if "not a valid model identifier" in text or "Repository Not Found" in text:
        return "not a local folder and not a model on the Hugging Face Hub (a typo?)"
    return first_line(e)


def load_config(name: str):
    """The model's config, or UserError saying why there is none."""
    if not os.path.isdir(name) and _looks_local(name):
        what = "is a file, not a folder" if os.path.exists(name) else "does not exist"
        raise UserError(f"cannot load model {name}: the local folder {what}")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"cannot load model {name}: the folder has no config.json")
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:
        raise UserError(f"cannot load model {name}: {_hub_cause(e)}") from e
    except (ValueError, KeyError) as e:  # an unknown or missing model_type
        raise UserError(f"cannot load model {name}: config.json is not a model this "
                        f"transformers knows ({first_line(e)})") from e


def load_processor(name: str):
    """The processor, checked to have a real tokenizer and an image processor."""
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        cause = ("its image processor config is missing (processor_config.json or "
                 "preprocessor_config.json)" if "image processor" in str(e) else
                 f"its processor or tokenizer cannot be loaded ({first_line(e)})")
        raise UserError(f"cannot load model {name}: {cause}") from e
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "image_processor", None) is None or tokenizer is None:
        raise UserError(f"cannot load model {name}: it has no image processor and tokenizer "
                        f"(processor_config.json / preprocessor_config.json, tokenizer files)")
    image_token = getattr(processor, "image_token", None)
    # Without tokenizer files transformers 5 quietly builds an empty tokenizer (1 token).
    if len(tokenizer) <= 1 or (image_token is not None and
                               tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id)):
        raise UserError(f"cannot load model {name}: its tokenizer files are missing or do not "
                        f"know the image token (tokenizer.json / tokenizer_config.json)")
    return processor


def load_backbone(name: str, dtype: torch.dtype, device_map: str, attn_implementation: str):
    """(model, processor), frozen. Every failure is one UserError naming the model and cause."""
    config = load_config(name)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(f"cannot load model {name}: it is not an image-text model (model_type "
                        f"{config.model_type!r}); pass a vision-language model such as "
                        f"Qwen/Qwen2.5-VL-7B-Instruct")
    processor = load_processor(name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation)
    except SafetensorError as e:
        raise UserError(f"cannot load model {name}: a weights file is damaged or truncated "
                        f"({first_line(e)})") from e
    except (OSError, EOFError, RuntimeError, ValueError, ImportError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load model {name}: its weights cannot be loaded "
                        f"({first_line(e)})") from e
    model.requires_grad_(False)
    return model, processor
