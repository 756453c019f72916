"""The tiny model builder: loadable like real weights, small, reproducible, and it answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from bot.engine.tiny_model import SPECIAL_TOKENS, build_tiny_model


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def test_loads_like_real_weights(tiny_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)

    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert 150_000 < model.num_parameters() < 600_000
    assert model.config.tie_word_embeddings is False
    assert model.config.vision_config.out_hidden_size == model.config.text_config.hidden_size
    tokenizer = processor.tokenizer
    special_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(SPECIAL_TOKENS)))
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    assert model.generation_config.pad_token_id == endoftext
    assert sum(path.stat().st_size for path in tiny_model_dir.iterdir()) < 3_000_000


def test_chat_template_matches_qwen_format(tiny_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "And?"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>And?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_rebuild_with_same_seed_is_byte_identical(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)

    assert _digests(again) == _digests(tiny_model_dir)
    assert _digests(other)["model.safetensors"] != _digests(tiny_model_dir)["model.safetensors"]


def test_generates_non_empty_text(tiny_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": "Describe the picture."}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[text], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_ids = output[0, inputs.input_ids.shape[1] :].tolist()
    assert len(new_ids) == 8
    assert set(new_ids).isdisjoint(model.generation_config.suppress_tokens)
    assert processor.decode(new_ids, skip_special_tokens=True).strip() != ""
