"""A tiny GGUF file written by the tests themselves with the `gguf` package's writer, laid out the way
llama.cpp's converter lays out a Llama checkpoint (q/k rows permuted for its RoPE, `output.weight`
omitted when tied, a GPT-2-style BPE vocabulary with merges and a chat template), with some weights
quantized (Q8_0), so `make test` exercises the GGUF path without downloading anything."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.common.chat import CHATML_TEMPLATE, build_chatml_bpe_tokenizer


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (its RoPE pairs adjacent dims; HF's pairs halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, texts: list[str], *, hidden: int = 32, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 64, context: int = 256, seed: int = 0,
                    quantize: tuple[str, ...] = ("ffn_up",)) -> tuple[LlamaForCausalLM, object]:
    """Write a random tiny Llama + a BPE tokenizer trained on `texts` to `path` (GGUF, tensors in F32 except
    the `quantize` ones in Q8_0); return the torch model and tokenizer it was made from."""
    tokenizer = build_chatml_bpe_tokenizer(texts, 300)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                         max_position_embeddings=context, tie_word_embeddings=True, rope_theta=10000.0,
                         rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokenizer))
    w.add_rope_dimension_count(hidden // heads)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_tokens)
    merges = [" ".join(m) if isinstance(m, tuple | list) else m
              for m in __import__("json").loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    def put(name: str, t: torch.Tensor, permute_heads: int | None = None) -> None:
        a = t.detach().float().numpy()
        if permute_heads is not None:
            a = _permute(a, permute_heads)
        if any(q in name for q in quantize):
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", sd[p + "self_attn.q_proj.weight"], permute_heads=heads)
        put(f"blk.{i}.attn_k.weight", sd[p + "self_attn.k_proj.weight"], permute_heads=kv_heads)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tokenizer
