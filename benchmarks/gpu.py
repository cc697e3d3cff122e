"""One GPU: bf16 SFT throughput and MFU, and the hf rollout engine's decode throughput, on a
Qwen2-0.5B-shaped model built from its config with random weights (nothing downloaded).

What runs is the project's own code: the model class and config builder of `stages/common/model.py`,
the ChatML BPE tokenizer and chat template of `stages/common/chat.py` (SFT conversations with the
assistant-only loss mask, 0-4 wrong attempts each followed by "Let's try again."), the SFT batching of
`stages/sft/batching.py` (packing into rows with position-id restarts, the loss share), the training
engine of `stages/common/engine.py` (full weights, then LoRA through peft), and the `hf` rollout engine
of `stages/common/rollout_engines.py` (sampled ids + their log-probs).

Shape: Qwen2.5-0.5B's config (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, vocab 151,936,
tied embeddings, q/k/v biases); the tokenizer is the small local BPE one (its ids are a subset of the
151,936 rows, as Qwen's own tokenizer uses 151,665 of them). Questions are synthetic, GSM8K-like.

MFU = achieved model FLOP/s / the chip's dense bf16 peak, with model FLOPs per trained token =
6 * (non-embedding parameters + the output projection) + 12 * layers * hidden * mean example length
(attention scores and values, forward + backward; PaLM's appendix B). Every non-padding token of a
packed row counts as processed (the loss covers only assistant tokens, but every token is computed).

Run (needs a CUDA GPU; ~2 min):
    python benchmarks/gpu.py                # the 0.5B shape
    python benchmarks/gpu.py --small        # a tiny shape, any device: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from stages.common.chat import ChatFormat, build_chatml_bpe_tokenizer
from stages.common.engine import build_engine
from stages.common.model import _decoder_config, _finish
from stages.common.model_spec import EngineConfig, LoraConfig, ModelConfig
from stages.common.rollout_engines import HFEngine
from stages.sft.batching import loss_share, pack_batch

#: dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's datasheets (SXM parts, no sparsity)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
FEEDBACK = "Let's try again."
NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils"]


def problem(rng: random.Random) -> tuple[str, str, list[str]]:
    """A GSM8K-like word problem, a worked solution, and wrong final answers."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
    q = (f"{name} has {a} {item}. A friend gives {name} {b} more {item}, and then {name} buys {c} boxes "
         f"with {c} {item} in each box. How many {item} does {name} have now?")
    total = a + b + c * c
    sol = (f"{name} starts with {a} {item}. After the gift there are {a} + {b} = {a + b} {item}. "
           f"The boxes hold {c} * {c} = {c * c} {item}. So {name} has {a + b} + {c * c} = {total} {item}. "
           f"The answer is \\boxed{{{total}}}.")
    wrong = [f"The answer is \\boxed{{{total + d}}}." for d in rng.sample([-9, -3, -1, 1, 2, 5, 10], 4)]
    return q, sol, wrong


def qwen05b_model(small: bool, tokenizer, device: torch.device):
    spec = (ModelConfig(init="scratch_chat", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=256, max_position_embeddings=4096) if small else
            ModelConfig(init="scratch_chat", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                        intermediate_size=4864, max_position_embeddings=32768, dtype="bfloat16"))
    cfg: Qwen2Config = _decoder_config(Qwen2Config, spec, tokenizer)
    cfg.vocab_size = 4096 if small else 151_936
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return _finish(model.to(getattr(torch, spec.dtype)), tokenizer), cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sft_throughput(model, fmt: ChatFormat, examples, *, rows: int, row_len: int, steps: int, warmup: int,
                   engine: EngineConfig, device: torch.device, label: str, cfg: Qwen2Config) -> dict:
    """Tokens/s and MFU of full optimizer steps (forward, backward, clip, AdamW) on packed rows."""
    eng = build_engine(model, engine, lr=1e-5, weight_decay=0.0, grad_clip=1.0, lr_lambda=lambda s: 1.0)
    module = eng.module
    module.train()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # Fill `rows` rows of `row_len` tokens per step with the project's packer.
    per_step, times, tokens = [], [], []
    at = 0
    for _ in range(warmup + steps):
        chunk, room = [], rows * row_len
        while room > len(examples[at % len(examples)][0]) + row_len // 4:
            chunk.append(examples[at % len(examples)])
            room -= len(chunk[-1][0])
            at += 1
        batch = pack_batch(chunk, fmt.pad_id, row_len, device)
        targets = sum(sum(m[1:]) for _, m, _ in chunk)
        per_step.append((batch, targets, sum(len(ids) for ids, _, _ in chunk), len(chunk)))
    mean_len = statistics.mean(len(ids) for ids, _, _ in examples)
    for i, (batch, targets, n_tokens, _) in enumerate(per_step):
        sync(device)
        t0 = time.perf_counter()
        loss = loss_share(module, [batch], targets)
        eng.backward(loss)
        eng.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(n_tokens)
    tok_s = sum(tokens) / sum(times)
    n_nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    # the tied output projection is a (vocab x hidden) matmul every token: counted as compute
    n_compute = n_nonembed + cfg.vocab_size * cfg.hidden_size
    fpt = 6 * n_compute + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"what": f"sft {label}", "device": name, "trainable_params": trainable,
           "tokens_per_step": statistics.mean(tokens), "mean_example_tokens": round(mean_len, 1),
           "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
           "tokens_per_s": round(tok_s), "model_tflops_per_s": round(tok_s * fpt / 1e12, 1),
           "mfu": round(tok_s * fpt / peak, 3) if peak else None, "final_loss": float(loss.detach())}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def rollout_throughput(model, fmt: ChatFormat, questions: list[str], *, max_new_tokens: int,
                       batch_size: int, device: torch.device) -> dict:
    """Sampled tokens/s of the hf engine at temperature 1 (with per-token log-probs, as RL uses it)."""
    model.eval()
    engine = HFEngine(model, fmt.eos_id, fmt.pad_id, batch_size=batch_size)
    contexts = [fmt.prompt_ids(q) for q in questions]
    engine.generate(contexts[:8], temperature=1.0, max_new_tokens=8)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    gens = engine.generate(contexts, temperature=1.0, max_new_tokens=max_new_tokens)
    sync(device)
    wall = time.perf_counter() - t0
    n = sum(len(g.token_ids) for g in gens)
    return {"what": f"hf rollout batch {batch_size}", "sequences": len(gens), "prompt_tokens_mean":
            round(statistics.mean(map(len, contexts)), 1), "new_tokens": n, "wall_s": round(wall, 2),
            "tokens_per_s": round(n / wall), "logprobs_finite": all(torch.isfinite(torch.tensor(g.logprobs)).all()
                                                                    for g in gens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny shape on any device (checks the script)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and device.type != "cuda":
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --small to check the script on CPU")
    torch.manual_seed(0)
    rng = random.Random(0)
    probs = [problem(rng) for _ in range(2000)]
    texts = [t for q, s, w in probs for t in (q, s, *w)]
    tokenizer = build_chatml_bpe_tokenizer([*texts, FEEDBACK], 4096)
    fmt = ChatFormat(tokenizer, FEEDBACK)
    examples = []
    for q, s, w in probs:
        k = rng.choice([0, 0, 1, 2, 4])
        ids, mask = fmt.sft_example(q, w[:k], s)
        examples.append((ids, mask, k))
    results = []
    small = args.small
    rows, row_len = (2, 512) if small else (8, 2048)
    for label, engine in [("full bf16" if not small else "full fp32", EngineConfig()),
                          ("lora r16", EngineConfig(lora=LoraConfig()))]:
        model, cfg = qwen05b_model(small, tokenizer, device)
        model.config.use_cache = False
        results.append(sft_throughput(model, fmt, examples, rows=rows, row_len=row_len, steps=args.steps,
                                      warmup=3, engine=engine, device=device, label=label, cfg=cfg))
        print(json.dumps(results[-1]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model, cfg = qwen05b_model(small, tokenizer, device)
    questions = [q for q, _, _ in probs]
    for batch, n in ([(8, 16)] if small else [(64, 64), (256, 256)]):
        results.append(rollout_throughput(model, fmt, questions[:n], max_new_tokens=32 if small else 256,
                                          batch_size=batch, device=device))
        print(json.dumps(results[-1]), flush=True)
    print("params (all, incl. tied embedding):", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
