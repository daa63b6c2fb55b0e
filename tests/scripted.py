"""A real Llama whose greedy output is known by construction: it recites a script, whatever the prompt.

Behaviour tests (stop strings, streaming, tool-call parsing) must not hang on what a random model happens to
emit, which changes with the precision and the kernels of the machine. This model is an ordinary
`LlamaForCausalLM` saved as a model directory, so it runs through exactly the code a real model does (loading,
the KV cache, `generate`, streaming), but its next token is a lookup on the current one:

- the embedding of token i is the one-hot vector e_i (hidden size >= vocabulary), so the final RMSNorm gives
  sqrt(hidden) * e_i;
- the one layer's attention and MLP write nothing to the residual stream (o_proj and down_proj are zero);
- column i of lm_head is MARGIN on the row of the token that follows i in the script: script[0] after any
  token outside the script, script[k + 1] after script[k], then eos (or script[0] again, to talk forever).

The winning logit is MARGIN * sqrt(hidden) (> 60) and every other one is 0, so greedy decoding and sampling
at any usual temperature both recite the script, in fp32, bf16 and fp16 alike.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

MARGIN = 3.0


def script_token_ids(tokenizer: Any, pieces: list[str]) -> list[int]:
    """The ids of `pieces`, each made a single token of `tokenizer` (added as a token where it is not one)."""
    missing = [p for p in pieces if len(tokenizer.encode(p, add_special_tokens=False)) != 1]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in missing])
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in pieces]
    assert all(len(i) == 1 for i in ids), (
        f"a piece of the script is not one token: {list(zip(pieces, ids, strict=False))}"
    )
    flat = [i[0] for i in ids]
    # a lookup on the current token can only recite a script whose tokens are all different
    assert len(set(flat)) == len(flat), f"the script repeats a token: {pieces}"
    return flat


def save_scripted_llama(path: Path, tokenizer: Any, pieces: list[str], *, forever: bool = False) -> Path:
    """Save a model dir whose replies are `"".join(pieces)` then eos (or the pieces again and again)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = copy.deepcopy(tokenizer)  # pieces may be added as tokens: the caller's stays as it was
    script = script_token_ids(tokenizer, pieces)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    prompt_ids = prompt["input_ids"] if isinstance(prompt, dict) else prompt
    assert prompt_ids[-1] not in script, (
        "the generation prompt ends in a script token: it would start mid-script"
    )
    vocab = len(tokenizer)
    hidden = -(-vocab // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    follows = dict.fromkeys(range(vocab), script[0])
    follows |= dict(itertools.pairwise(script))
    follows[script[-1]] = script[0] if forever else tokenizer.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, hidden)
        head[torch.tensor([follows[i] for i in range(vocab)]), torch.arange(vocab)] = MARGIN
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
