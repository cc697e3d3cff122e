"""Per-GPU memory of a decoder's training state under DeepSpeed ZeRO-2, from its shape: why the RL stage
can stay on ZeRO-2 at the paper's scale (stages/rl/config.py, infra/README.md).

Mixed-precision Adam as in the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", §3.1 and §5): per trained parameter 2 bytes of bf16 weight, 2 of bf16
gradient and K = 12 of fp32 optimizer state (master weight, Adam m and v). ZeRO-2 partitions gradients and
optimizer state over the N ranks and keeps the weights whole on each: 2Ψ + (2 + K)Ψ_trained / N bytes.
Counted here: weights, gradients, optimizer state (and the frozen KL reference where there is one). Not
counted: activations, the rollout's KV cache, DeepSpeed's communication buckets, CUDA's context.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16_BYTES = 2
#: fp32 master weight + Adam's m and v, per trained parameter (the ZeRO paper's K).
ADAM_STATE_BYTES = 12
GiB = 2**30


@dataclass(frozen=True)
class DecoderShape:
    """A Llama/Qwen2-style decoder with grouped-query attention, biases on q/k/v, tied embeddings."""

    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    """Width of k_proj and v_proj outputs: key-value heads x head dim."""
    vocab: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer, by its module name."""
        h, kv, ff = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}

    @property
    def params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes().values())
        per_layer += self.hidden + 2 * self.kv_dim  # q, k, v biases
        per_layer += 2 * self.hidden  # the two RMSNorms
        return self.layers * per_layer + self.vocab * self.hidden + self.hidden  # + tied embedding, final norm

    def lora_params(self, r: int, target_modules: list[str]) -> int:
        """Adapter parameters: A (r x in) and B (out x r) on each targeted projection of every layer."""
        shapes = self.linear_shapes()
        return self.layers * r * sum(i + o for name, (i, o) in shapes.items() if name in target_modules)


#: Qwen2.5-3B-Instruct (its config.json: hidden 2048, 36 layers, intermediate 11008, 2 KV heads of 128,
#: vocab 151936, tied embeddings): 3.09B parameters, the paper's model.
QWEN25_3B = DecoderShape(hidden=2048, layers=36, intermediate=11008, kv_dim=256, vocab=151936)


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes on each GPU."""

    weights: int
    """bf16 weights, whole on every rank (ZeRO-2 does not partition them)."""
    gradients: int
    """bf16 gradients of the trained parameters, this rank's 1/N."""
    optimizer: int
    """fp32 master weights and Adam m, v of the trained parameters, this rank's 1/N."""
    reference: int = 0
    """A frozen bf16 copy of the policy for the KL term (none with LoRA: the adapter-disabled policy is it)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference


def zero2_per_gpu(params: int, trained: int, gpus: int, *, reference_copy: bool = False) -> ZeroMemory:
    """ZeRO-2 memory per GPU of a model of `params` parameters of which `trained` train, on `gpus` ranks."""
    return ZeroMemory(weights=BF16_BYTES * params, gradients=BF16_BYTES * trained // gpus,
                      optimizer=ADAM_STATE_BYTES * trained // gpus,
                      reference=BF16_BYTES * params if reference_copy else 0)


def paper_setting(r: int = 16, target_modules: list[str] | None = None, gpus: int = 8) -> dict[str, ZeroMemory]:
    """The paper's setting, Qwen2.5-3B on 8 GPUs, per GPU: ZeRO-2 with LoRA (the default adapters: rank 16
    on every projection) and full-weight ZeRO-2 (which keeps a frozen reference copy for the KL term)."""
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, lora = QWEN25_3B.params, QWEN25_3B.lora_params(r, targets)
    return {"lora": zero2_per_gpu(base + lora, lora, gpus),
            "full": zero2_per_gpu(base, base, gpus, reference_copy=True)}


def describe_paper_setting() -> str:
    """One sentence with the paper setting's numbers, for messages and docs."""
    m = paper_setting()
    lora, full = m["lora"], m["full"]
    return (f"Qwen2.5-3B on 8 GPUs needs per GPU (weights, gradients, Adam state; activations and KV cache "
            f"extra) {lora.total / GiB:.1f} GiB under ZeRO-2 with LoRA and "
            f"{(full.total - full.reference) / GiB:.1f} GiB full-weight "
            f"(+{full.reference / GiB:.1f} GiB for its KL reference copy), of 80 GiB")
