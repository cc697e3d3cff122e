"""Training engines: any causal LM + an AdamW config -> something that does backward, step and export,
the same way whether it is plain torch in one process, LoRA adapters through peft, or a DeepSpeed ZeRO-2/3
engine on one of several data-parallel ranks.

    engine = build_engine(model, spec, lr=..., weight_decay=..., grad_clip=..., lr_lambda=...,
                          micro_steps=...)
    for micro_batch in step_batches:             # the same number on every rank
        engine.backward(share_of_global_mean_loss(micro_batch))
    grad_norm = engine.step()                    # clip, AdamW, lr schedule, zero grads
    engine.export(tokenizer, folder)             # rank 0: a merged, plain-transformers folder

Loss convention: every rank passes its share of the GLOBAL objective (e.g. summed token losses of its
micro-batch divided by the token count of the whole step over all ranks), so that the shares add up to
the single-process loss exactly; the engine undoes DeepSpeed's own averaging over ranks and micro-steps.
Ranks are started by a launcher (`stages/common/rank.py`), never by this module's caller directly.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from stages.common.model import save_pretrained
from stages.common.model_spec import EngineConfig
from stages.common.processes import free_port

#: Environment variables set by torchrun and the deepspeed launcher in every rank.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class TrainEngine(Protocol):
    """What a training loop sees. `module` is what forward is called on (LoRA-wrapped where asked)."""

    module: nn.Module
    hf_model: nn.Module
    """The (LoRA-wrapped) transformers model itself, for `generate`."""
    rank: int
    world_size: int

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...

    def lr(self) -> float: ...

    def export(self, tokenizer, path: str | Path) -> Path | None: ...

    def export_adapter(self, path: str | Path) -> Path | None: ...

    def expect_backwards(self, count: int) -> None:
        """Announce how many `backward` calls the next `step` closes (when it varies from step to step)."""
        ...

    def full_state(self) -> dict[str, torch.Tensor] | None: ...

    def save_state(self, folder: str | Path) -> None: ...

    def load_state(self, folder: str | Path) -> None: ...

    @property
    def lockstep_forwards(self) -> bool:
        """True when every rank must run the same forward calls (ZeRO-3 gathers weights in each one)."""
        ...


def wrap_lora(model: nn.Module, spec: EngineConfig) -> nn.Module:
    """Add peft LoRA adapters when `spec.lora` is set; freezes every base weight."""
    if spec.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM")
    # transformers 5.x: `is_activation_checkpointing` (the old name warns at every access)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return get_peft_model(model, lora)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _plain_model(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh CPU model with `state` loaded and any LoRA adapters merged by peft: what plain transformers
    loads. `module` itself is left untouched (training can go on after an export).

    Built on the CPU without random init (`no_init_weights`), so it costs one copy of the weights in host
    memory, never on the accelerator; non-persistent buffers (RoPE frequencies) are built as usual.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    base = module.get_base_model() if hasattr(module, "peft_config") else module
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), dtype=base.dtype)
    plain.tie_weights()  # skipped with the init; an untied copy would save lm_head twice
    if hasattr(module, "peft_config"):
        from peft import get_peft_model

        plain = get_peft_model(plain, module.peft_config["default"])
    missing, unexpected = plain.load_state_dict({k: v.to("cpu") for k, v in state.items()}, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if base.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: state does not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    if hasattr(plain, "peft_config"):
        plain = plain.merge_and_unload()
    plain.generation_config = base.generation_config
    return plain.eval()


class TorchEngine:
    """One process, a plain AdamW (over the adapters only when LoRA is on)."""

    rank, world_size = 0, 1

    def __init__(self, module: nn.Module, *, lr: float, weight_decay: float, grad_clip: float,
                 lr_lambda: Callable[[int], float]):
        self.module = self.hf_model = module
        self.params = trainable_parameters(module)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def export(self, tokenizer, path: str | Path) -> Path | None:
        return save_pretrained(_plain_model(self.module, self.module.state_dict()), tokenizer, path)

    def export_adapter(self, path: str | Path) -> Path | None:
        self.module.save_pretrained(str(path))
        return Path(path)

    def expect_backwards(self, count: int) -> None:
        pass  # plain autograd accumulates any number of backward calls

    lockstep_forwards = False

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def save_state(self, folder: str | Path) -> None:
        """Weights (safetensors), AdamW state and the lr schedule's position: what an exact resume needs."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(folder / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")

    def load_state(self, folder: str | Path) -> None:
        folder = Path(folder)
        load_model(self.module, str(folder / "model.safetensors"))
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(spec: EngineConfig, *, grad_clip: float, micro_steps: int, bf16: bool) -> dict:
    """The DeepSpeed JSON config for `spec`. Batching is ours (micro-batches of whole examples or packed
    rows), so DeepSpeed's batch sizes are nominal; what matters is the accumulation count."""
    ds = spec.deepspeed
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Our torch AdamW also with offload (DeepSpeedCPUAdam would need a compiled extension).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """A DeepSpeed ZeRO-2/3 engine on this rank (the ranks were started by stages/common/rank.py)."""

    def __init__(self, module: nn.Module, spec: EngineConfig, *, lr: float, weight_decay: float, grad_clip: float,
                 lr_lambda: Callable[[int], float], micro_steps: int):
        import deepspeed

        init_process_group(spec)
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.micro_steps, self.backwards = micro_steps, 0
        params = trainable_parameters(module)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        bf16 = next(module.parameters()).dtype == torch.bfloat16
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            config=deepspeed_config(spec, grad_clip=grad_clip, micro_steps=micro_steps, bf16=bf16))
        self.module = self.ds  # forward goes through the engine (ZeRO-3 gathers parameters there)
        self.hf_model = self.ds.module
        self.zero_stage = spec.deepspeed.zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        # The boundary is set explicitly, so the count of backward calls may change from step to step
        # (`expect_backwards`); DeepSpeed's own counter assumes a fixed gradient_accumulation_steps.
        self.ds.set_gradient_accumulation_boundary(self.backwards + 1 == self.micro_steps)
        # DeepSpeed averages gradients over ranks; our loss is already this rank's share of the global
        # mean, so scale it back up by the world size, and do not let it divide by the micro-steps again.
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        self.ds.step()  # bookkeeping only, except at the accumulation boundary: clip, AdamW, schedule
        self.backwards += 1

    def step(self) -> float:
        if self.backwards != self.micro_steps:
            raise RuntimeError(f"engine.step: {self.backwards} backward calls in this step, the engine was "
                               f"built for micro_steps={self.micro_steps}")
        self.backwards = 0
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def expect_backwards(self, count: int) -> None:
        """Every rank must make the same number of backward calls per step: ZeRO-2/3 reduce gradients
        over the ranks in each one."""
        if self.backwards:
            raise RuntimeError("engine.expect_backwards: called in the middle of a step")
        self.micro_steps = count

    @property
    def lockstep_forwards(self) -> bool:
        return self.zero_stage == 3 and self.world_size > 1

    def save_state(self, folder: str | Path) -> None:
        """DeepSpeed's own checkpoint (weights, each rank's ZeRO partition of the optimizer state, the lr
        schedule) under `folder`; a collective: every rank calls it, with the same (shared) folder."""
        self.ds.save_checkpoint(str(folder), tag="state", client_state={})

    def load_state(self, folder: str | Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0 (None elsewhere); a collective under ZeRO-3: every rank calls it."""
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return state if self.rank == 0 else None
        return self.ds.module.state_dict() if self.rank == 0 else None

    def export(self, tokenizer, path: str | Path) -> Path | None:
        state = self.full_state()
        if state is None:
            return None
        return save_pretrained(_plain_model(self.ds.module, state), tokenizer, path)

    def export_adapter(self, path: str | Path) -> Path | None:
        state = self.full_state()
        if state is None:
            return None
        self.ds.module.save_pretrained(str(path), state_dict=state)  # peft keeps the adapter entries
        return Path(path)


def build_engine(model: nn.Module, spec: EngineConfig, *, lr: float, weight_decay: float, grad_clip: float,
                 lr_lambda: Callable[[int], float], micro_steps: int = 1) -> TrainEngine:
    """Wrap `model` (LoRA first, when asked) in the engine `spec` names.

    Args:
        lr_lambda: step -> multiplier of `lr` (warm-up, decay), stepped once per optimizer step.
        micro_steps: backward calls per optimizer step on every rank (DeepSpeed needs it up front).
    """
    module = wrap_lora(model, spec)
    if spec.kind == "torch":
        return TorchEngine(module, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, lr_lambda=lr_lambda)
    return DeepSpeedEngine(module, spec, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
                           lr_lambda=lr_lambda, micro_steps=micro_steps)


# ---------------------------------------------------------------------------------------------------
# Ranks: started by torchrun or the deepspeed launcher (stages/common/rank.py), stopped with the stage


def is_rank_process() -> bool:
    """True inside a rank started by a launcher (torchrun / deepspeed set RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in RANK_ENV)


def init_process_group(spec: EngineConfig) -> None:
    """Join the ranks' process group (once); gloo on CPU, nccl on GPUs unless `spec.backend` says."""
    if not is_rank_process():  # one DeepSpeed rank in this very process (tests, single-GPU runs)
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.distributed.is_initialized():
        return
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks when it joins the group: it needs a C++
    # compiler (the stage images have none, so the ranks of a container died here) and serves only
    # `inference_all_reduce`, which training never calls. Off, gloo or nccl carries every collective.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = spec.backend if spec.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
