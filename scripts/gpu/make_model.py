#!/usr/bin/env python3
"""Write a local, offline Llama-3.1-8B-shaped model folder for `--load-format dummy`.

    python3 scripts/gpu/make_model.py /tmp/llama8b           # real 8B shape
    python3 scripts/gpu/make_model.py /tmp/llama-tiny --tiny # 2 layers, hidden 256

The folder holds config.json (LlamaForCausalLM, bfloat16), generation_config.json
and a byte-level BPE tokenizer built here with the `tokenizers` library: trained on
generated text, its vocabulary is padded with filler tokens up to 128000 ids and
followed by Llama 3.1's 256 special tokens (<|begin_of_text|> = 128000,
<|end_of_text|> = 128001, <|eot_id|> = 128009, ...), so every id a dummy model can
sample (0 .. 128255) decodes, and the special ids match the real model's.
No weights are written: vLLM's dummy loader fills them at start.

Needs only `tokenizers` (and `transformers` for --check). Deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 128256
NUM_SPECIAL = 256
FIRST_SPECIAL = VOCAB_SIZE - NUM_SPECIAL  # 128000
BPE_TRAINED = 8000  # size of the trained (mergeable) part of the vocabulary

NAMED_SPECIAL = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
    128004: "<|finetune_right_pad_id|>",
}

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

SHAPES = {
    # meta-llama/Llama-3.1-8B(-Instruct) shape
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
}


def special_tokens() -> list[str]:
    out = []
    reserved = 0
    for i in range(FIRST_SPECIAL, VOCAB_SIZE):
        if i in NAMED_SPECIAL:
            out.append(NAMED_SPECIAL[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def corpus(seed: int = 0, n_lines: int = 20000) -> list[str]:
    """Pseudo-English text: syllable words, numbers, punctuation, some code."""
    rng = random.Random(seed)
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "st",
        "tr",
        "pl",
        "gr",
        "ch",
        "th",
        "sh",
        "br",
    ]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "rt", "st", "ck"]
    words = sorted(
        {
            "".join(
                rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice([1, 1, 2, 2, 3]))
            )
            for _ in range(6000)
        }
    )
    common = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "with",
        "as",
        "was",
        "on",
        "be",
        "at",
        "by",
        "this",
        "are",
        "from",
        "or",
        "memory",
        "cache",
        "page",
        "block",
        "engine",
        "GPU",
        "token",
        "model",
    ]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 25)
        ws = [rng.choice(common) if rng.random() < 0.35 else rng.choice(words) for _ in range(n)]
        if rng.random() < 0.2:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 100000)))
        s = " ".join(ws)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ",", ":"])
        if rng.random() < 0.05:
            s = f"def f{rng.randint(0, 99)}(x):\n    return x + {rng.randint(0, 9)}"
        lines.append(s)
    return lines


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    from tokenizers import Regex

    # Llama 3's pre-tokenizer: its split regex, then byte-level without the GPT-2 regex
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_TRAINED,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)

    # Pad the model vocabulary with filler tokens up to FIRST_SPECIAL ids. They have
    # no merges, so encoding never produces them, but decoding any id works.
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    i = 0
    while next_id < FIRST_SPECIAL:
        filler = f"\u0120w{i:06d}"  # 'Ġw000123' decodes to ' w000123'
        i += 1
        if filler in vocab:
            continue
        vocab[filler] = next_id
        next_id += 1
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.get_vocab_size() == FIRST_SPECIAL, tok.get_vocab_size()

    added = tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    assert added == NUM_SPECIAL and tok.get_vocab_size() == VOCAB_SIZE
    assert tok.token_to_id("<|begin_of_text|>") == 128000
    assert tok.token_to_id("<|eot_id|>") == 128009
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)],
    )
    return tok


def write(out: Path, shape: str, max_pos: int = 131072) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": s["hidden_size"],
        "head_dim": s["head_dim"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate_size"],
        "max_position_embeddings": max_pos,
        "mlp_bias": False,
        "num_attention_heads": s["num_attention_heads"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_key_value_heads": s["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        # as in the published config; transformers 5 also reads it to skip a
        # Mistral-regex check on local tokenizers
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    gen = {
        "bos_token_id": 128000,
        "do_sample": True,
        "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6,
        "top_p": 0.9,
    }
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_pos,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
    }
    for name, obj in [
        ("config.json", config),
        ("generation_config.json", gen),
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", special_map),
    ]:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def check(out: Path) -> None:
    """Load it the way vLLM does: AutoConfig + AutoTokenizer, offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    cfg = AutoConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    ids = tok("Hello kvcached, how are the pages today?")["input_ids"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    print(
        f"config: {cfg.model_type} layers={cfg.num_hidden_layers} "
        f"hidden={cfg.hidden_size} heads={cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} vocab={cfg.vocab_size} rope={rope}"
    )
    print(f"tokenizer: {type(tok).__name__} len={len(tok)} bos={tok.bos_token_id} eos={tok.eos_token_id} ids={ids}")
    print(f"decode(any id): {tok.decode([5, 9000, 127999, 128009])!r}")
    print(f"chat: {chat!r}")
    print(f"generation eos: {gen.eos_token_id}")
    assert len(tok) == cfg.vocab_size == VOCAB_SIZE
    assert ids[0] == 128000 and tok.eos_token_id == 128009
    assert tok.decode(tok(" the memory page")["input_ids"], skip_special_tokens=True) == " the memory page"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256")
    ap.add_argument(
        "--max-pos",
        type=int,
        default=131072,
        help="max_position_embeddings (Llama 3.1: 131072; its rope "
        "scaling wants more than 8192). Cap the KV per request with "
        "vllm's --max-model-len instead",
    )
    ap.add_argument("--check", action="store_true", help="load it back with transformers (offline)")
    a = ap.parse_args()
    write(a.out, "tiny" if a.tiny else "8b", a.max_pos)
    print(f"wrote {a.out} ({'tiny' if a.tiny else '8b'} shape)")
    if a.check:
        check(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
