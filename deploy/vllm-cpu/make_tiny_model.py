"""Write a tiny random-weight Llama model that vLLM can serve, with no download: `make_tiny_model.py DIR`.

The tokenizer is a byte-level BPE (vocab 1,000; specials <s> </s> <pad>) trained on a few hundred
synthetic sentences, wrapped in `PreTrainedTokenizerFast` with a one-line chat template. The model is
`LlamaForCausalLM` (hidden 64, intermediate 128, 2 layers, 2 heads, 2 KV heads: head dim 32, which the
CPU attention backend supports) with random weights, saved in bfloat16: about 210k parameters and
half a megabyte. Its output is gibberish; the token counts vLLM reports for it are real.

Run it with the vLLM venv's Python (it needs torch, transformers and tokenizers):
    .venv-vllm/bin/python deploy/vllm-cpu/make_tiny_model.py .e2e/tiny-llama
Same seed, same files: the sentences, the tokenizer and the weights are all deterministic.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
VOCAB_SIZE = 1000
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_SUBJECTS = ["the sidecar", "a tenant", "the meter", "vLLM", "the buyer", "an hour", "the record", "our seller"]
_VERBS = ["reports", "counts", "seals", "sends", "stores", "bills", "retries", "streams", "tokenizes"]
_OBJECTS = ["usage", "tokens", "requests", "a batch", "the bucket", "every event", "the spool", "metrics"]
_TAILS = ["to AWS", "every hour", "exactly once", "on shutdown", "without loss", "in one transaction",
          "before the window closes", "for each customer", "with jitter", "quickly"]


def sentences(count: int, seed: int) -> list[str]:
    """Synthetic training text: short, varied, with digits and punctuation so bytes get merged too."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        if rng.random() < 0.3:
            words.append(f"({rng.randint(0, 99999)} at {rng.randint(0, 23):02d}:00)")
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", "."]) + f" #{i}")
    return out


def build_tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]  # transformers is not typed here
    """A byte-level BPE tokenizer as a `PreTrainedTokenizerFast` with the chat template set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS  # token strings, not secrets
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(tokenizer, seed: int):  # type: ignore[no-untyped-def]
    """A random-weight Llama in bfloat16, sized to the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)  # save_pretrained records the dtype in config.json


def main(argv: list[str] | None = None) -> int:
    """Write tokenizer and model files into DIR (created if missing)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--sentences", type=int, default=400, help="training sentences (default 400)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of text and weights (default 1234)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args.dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(sentences(args.sentences, args.seed))
    tokenizer.save_pretrained(args.dir)
    model = build_model(tokenizer, args.seed)
    model.save_pretrained(args.dir, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.dir.iterdir() if f.is_file())
    print(f"make_tiny_model: wrote {args.dir} (vocab {len(tokenizer)}, {params} parameters, "
          f"{size // 1024} KiB) in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
