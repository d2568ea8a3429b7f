"""The demo's shipped word-level tokenizer and its tiny Llama-style models (built from a config, no download)."""
from __future__ import annotations

import json
import os

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
TOKENIZER_DIR = os.path.join(DATA_DIR, "demo_tokenizer")


def build_tokenizer_files(out_dir: str = TOKENIZER_DIR) -> str:
    """(Re)build the shipped tokenizer from the task vocabulary; run once, the result is committed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .task import vocabulary

    vocab = {word: index for index, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    # transformers 5 writes its own class name; the generic one also loads on transformers 4.x
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return out_dir


def load_tokenizer(path: str = TOKENIZER_DIR):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_llama_config(tokenizer, *, hidden_size: int = 96, layers: int = 2, heads: int = 4, num_labels: int = 1):
    """A few-hundred-thousand-parameter Llama: 2 layers of width 96, vocabulary of the demo tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_policy(tokenizer, **kwargs):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(tokenizer, **kwargs))
