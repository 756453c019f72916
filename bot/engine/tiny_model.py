"""Builder of a tiny, randomly initialised Qwen2.5-VL for tests and benchmarks.

The result is one directory that `AutoProcessor.from_pretrained` and
`Qwen2_5_VLForConditionalGeneration.from_pretrained` load exactly like the real weights: a byte-level BPE
tokenizer trained on a small built-in corpus with Qwen's special tokens, Qwen's chat template, the real image
and video processors, a 2-layer text model with a 2-block vision tower, and a generation config. Rebuilding
with the same seed gives byte-identical files. Its answers are gibberish; only ids and lengths are meaningful.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
PAD_TOKEN = "<|endoftext|>"
BPE_VOCAB_SIZE = 1024  # before the special tokens
DEFAULT_MAX_NEW_TOKENS = 32
PROCESSOR_MIN_PIXELS = 56 * 56  # Qwen2.5-VL's preprocessor_config.json
PROCESSOR_MAX_PIXELS = 28 * 28 * 16384

# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_CORPUS = """\
You are a helpful assistant. Describe this image in one sentence.
What is on the left side of the picture? On the left side of the picture, there is an ocean with waves
crashing onto the shore. The sky above the ocean appears to be clear and bright, suggesting a sunny day.
What are on the right and in the middle of the picture? On the right side there is a woman sitting on the
beach with her dog. She is smiling and appears to be interacting with the dog, who sits on the sand.
How many people are in the photo? There are two people standing near a red car parked on a quiet street.
Can you read the text on the sign? The sign says that the shop opens at nine in the morning and closes at six.
Please summarise the chart. The chart shows that sales grew steadily from January to June, then fell slightly.
What colour is the cat? The cat is black with white paws, and it is sleeping on a blue blanket by the window.
Is this food healthy? The plate holds a green salad with tomatoes, cucumbers, olives and a slice of bread.
Where was this taken? It looks like a mountain village in the early evening, with lights in a few windows.
Thank you! You're welcome. Let me know if you have any other questions about the image or the video.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 50% $20 #1 @user
In the video, a person walks through a park, stops to look at the trees, and then sits down on a bench.
"""


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the tiny random Qwen2.5-VL (model, processor, generation config) into `out_dir`; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=4, desc="tiny model", unit="step", disable=None) as progress:
        progress.set_postfix_str("training tokenizer")
        tokenizer = _build_tokenizer()
        progress.update()

        progress.set_postfix_str("building processor")
        processor = Qwen2_5_VLProcessor(
            # Like the real checkpoints: qwen-vl-utils sizes the media, the processors do not resize again.
            image_processor=Qwen2VLImageProcessor(
                min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS
            ),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(
                min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS
            ),
            chat_template=CHAT_TEMPLATE,
        )
        progress.update()

        progress.set_postfix_str("initialising weights")
        model = _build_model(tokenizer, seed=seed)
        progress.update()

        progress.set_postfix_str("saving")
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        progress.update()
    log.info("tiny model (%d parameters) written to %s", model.num_parameters(), out_dir)
    return out_dir


def _build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Qwen's special tokens follow the ordinary vocabulary, in Qwen's order.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), f"{token} is one token"
    return token_id


def _build_model(tokenizer: PreTrainedTokenizerFast, *, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    head_dim = 64 // 4
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [2, 3, 3],  # sums to head_dim / 2
            },
            "bos_token_id": ids[PAD_TOKEN],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids[PAD_TOKEN],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    rope = config.get_text_config().rope_parameters
    assert rope is not None and sum(rope["mrope_section"]) == head_dim // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    eos_ids = [ids[token] for token in EOS_TOKENS]
    model.generation_config = GenerationConfig(
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=eos_ids,
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        # Random weights would otherwise often pick control tokens, which decode to nothing.
        suppress_tokens=[token_id for token_id in ids.values() if token_id not in eos_ids],
    )
    return model
