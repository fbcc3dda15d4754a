"""Synthetic models: a real architecture with seeded random weights, made offline.

Why: a newcomer, CPU CI and the GPU machine have no model hub. A Llama model with random
weights exercises exactly the code paths a real one does (loading, compilation, KV cache,
sampling) and its greedy output is deterministic, so "identical after restore" is testable.
Weights are written straight to safetensors tensor by tensor (no ``transformers`` model
init), which keeps the 3B shapes fast to make.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIX = "synthetic:"

# A small fixed corpus: the tokenizer only has to be deterministic and cover bytes.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "fast-vllm restores a warmed vLLM server from a CRIU checkpoint in seconds.",
    "Once upon a time there was a small model that answered every question with nonsense.",
    "Hello, my name is Ada and I like to count: one, two, three, four, five, six.",
    "import torch; print(torch.__version__)  # numbers 0123456789",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


class SyntheticModelError(ValueError):
    """An unknown synthetic model name."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Shapes of one synthetic Llama model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # model vocabulary; the trained tokenizer may use fewer ids
    tokenizer_vocab: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None


SPECS: dict[str, SyntheticSpec] = {
    # ~800 KB of bf16 weights: the CPU/CI model.
    "tiny": SyntheticSpec(128, 256, 2, 4, 2, 512, 512, 2048, False, 10000.0),
    # Llama-3.2-3B-Instruct's exact shapes (3.2 B parameters, 6.4 GB in bf16).
    "llama-3.2-3b": SyntheticSpec(
        3072, 8192, 28, 24, 8, 128256, 4096, 131072, True, 500000.0,
        {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
    # Llama-3.1-8B-Instruct's exact shapes (8.03 B parameters, 16.1 GB in bf16; untied head).
    "llama-3.1-8b": SyntheticSpec(
        4096, 14336, 32, 32, 8, 128256, 4096, 131072, False, 500000.0,
        {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
}


def parse_name(model: str) -> str | None:
    """Return NAME for ``synthetic:NAME`` (validated), or None for any other model."""
    if not model.startswith(PREFIX):
        return None
    name = model[len(PREFIX):]
    if name not in SPECS:
        raise SyntheticModelError(
            f"unknown synthetic model {model!r}; choose one of "
            + ", ".join(PREFIX + n for n in SPECS)
        )
    return name


def _config(spec: SyntheticSpec, bos: int, eos: int) -> dict:
    head_dim = spec.hidden_size // spec.num_attention_heads
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
    }
    return cfg


def _tensor_shapes(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...]]]:
    h, i = spec.hidden_size, spec.intermediate_size
    hd = h // spec.num_attention_heads
    kv = spec.num_key_value_heads * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab_size, h))]
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        shapes.append(("lm_head.weight", (spec.vocab_size, h)))
    return shapes


def _write_tokenizer(spec: SyntheticSpec, out: Path) -> tuple[int, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
        pad_token=specials[1],
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    fast.save_pretrained(str(out))
    return tok.token_to_id(specials[0]), tok.token_to_id(specials[1])


RECORD = "fast-vllm-synthetic.json"  # in the folder: which synthetic model, and its seed


def make_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write synthetic model NAME (config, tokenizer, safetensors) to OUT_DIR, deterministically."""
    import torch
    from safetensors.torch import save_file

    spec = SPECS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = _write_tokenizer(spec, out)
    (out / "config.json").write_text(json.dumps(_config(spec, bos, eos), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n"
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in _tensor_shapes(spec):
        if key.endswith("norm.weight"):
            tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / RECORD).write_text(
        json.dumps({"name": name, "seed": seed}) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fvboot make-model", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="one of: " + ", ".join(SPECS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name = args.name[len(PREFIX):] if args.name.startswith(PREFIX) else args.name
    if name not in SPECS:
        print(f"fvboot: unknown synthetic model {args.name!r} (choose: {', '.join(SPECS)})", file=sys.stderr)
        return 2
    print(make_model(name, args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
