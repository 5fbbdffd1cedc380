"""Calibration cost: loraforge's σ-reparametrised sensitivities vs the obvious alternatives.

Prints, measured in one run on the same model, adapter and batches:
  (a) calibration time / a plain forward+backward (LoRA weights trainable), target <= 1.15x;
  (b) a seed-style implementation (forward and backward hooks on every adapted module, A and B
      requiring grad, g accumulated per module with a host sync each step; written here only)
      / loraforge's, target >= 2x;
  (c) dense SVD of a materialised 4096x4096 ΔW / compact SVD from B, A at rank 64, target >= 100x.

    .venv/bin/python bench/calibration.py [--hidden 512 --layers 8 --batches 8 --seq 256]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from loraforge.edit import spectra_of
from loraforge.packing import Batch, collate_padded, token_loss_sum
from loraforge.spectral.sensitivity import sensitivities
from loraforge.spectral.svd import Spectrum, compact_svd

# The trained adapter adapts every linear module (as the seeds' adapters do); the edit is scoped
# to the seed's default targets.
ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = ["o_proj", "down_proj"]


def build(hidden: int, layers: int, rank: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=2048,
    )
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ADAPTED, use_rslora=True)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def batches(n: int, seq: int, size: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        examples = []
        for _ in range(size):
            length = int(torch.randint(seq // 2, seq, (1,), generator=generator))
            ids = torch.randint(5, 4096, (length,), generator=generator).tolist()
            labels = [-100] * (length // 2) + ids[length // 2 :]
            examples.append(type("E", (), {"input_ids": ids, "labels": labels})())
        out.append(collate_padded(examples, 0))
    return out


def plain(model: torch.nn.Module, data: list[Batch]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for batch in data:
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)


def ours(model: torch.nn.Module, spectra: dict[str, Spectrum], data: list[Batch]) -> None:
    sensitivities(model, spectra, data)


def seed_style(model: torch.nn.Module, spectra: dict[str, Spectrum], data: list[Batch]) -> None:
    """The seed's calibration, rewritten here: every LoRA A/B requires grad (the seed freezes only
    the base), forward hooks cache each target module's masked input, full backward hooks project
    dL/dy and x on U and V in fp32 and add g to a CPU tensor (`.item()` and `.cpu()`: two host
    syncs per module per step), and the loss is the model's mean loss, read with `.item()`."""
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    gsum: dict[str, torch.Tensor] = {}
    state: dict[str, object] = {"mask": None, "active": 0}
    handles = []
    for name, sp in spectra.items():
        V = sp.Vh.T.contiguous()

        def forward_hook(module, inputs, output, name=name):  # type: ignore[no-untyped-def]
            x = inputs[0]
            mask = state["mask"]
            if isinstance(mask, torch.Tensor) and x.dim() == 3:
                x = x * mask.to(dtype=x.dtype).unsqueeze(-1)
            module._seed_x = x.detach()

        def backward_hook(module, grad_in, grad_out, name=name, sp=sp, V=V):  # type: ignore[no-untyped-def]
            gy, x = grad_out[0], module._seed_x
            mask = state["mask"]
            assert isinstance(mask, torch.Tensor)
            state["active"] = int(state["active"]) + int(mask.sum().item())  # host sync
            gy2, x2 = gy.detach().reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            g = ((gy2.float() @ sp.U.float()) * (x2.float() @ V.float())).sum(0) * sp.scale
            gsum[name] = gsum[name] + g.detach().cpu() if name in gsum else g.detach().cpu()
            module._seed_x = None

        handles.append(modules[name].register_forward_hook(forward_hook))
        handles.append(modules[name].register_full_backward_hook(backward_hook))
    try:
        total = 0.0
        for batch in data:
            state["mask"] = batch.attention_mask
            out = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
            total += float(out.loss.item())  # host sync
            model.zero_grad(set_to_none=True)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def svd_ratio(size: int, rank: int) -> tuple[float, float]:
    torch.manual_seed(2)
    B, A = torch.randn(size, rank), torch.randn(rank, size)
    compact = timed(lambda: compact_svd(B, A, 1.0), 5)
    start = time.perf_counter()
    torch.linalg.svd(B @ A)  # what the seed's fallback and most tutorials do
    dense = time.perf_counter() - start
    return compact, dense


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--svd-size", type=int, default=4096)
    parser.add_argument("--svd-rank", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU figure of #11)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = build(args.hidden, args.layers, args.rank).to(device)
    data = [batch.to(device) for batch in batches(args.batches, args.seq)]
    modules = {
        n: m
        for n, m in model.named_modules()
        if n.endswith(tuple(TARGETS)) and hasattr(m, "lora_A")
    }
    spectra = spectra_of(modules)
    t_plain = timed(lambda: plain(model, data), args.repeats)
    t_ours = timed(lambda: ours(model, spectra, data), args.repeats)
    t_seed = timed(lambda: seed_style(model, spectra, data), args.repeats)
    t_compact, t_dense = svd_ratio(args.svd_size, args.svd_rank)
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, rank {args.rank}, "
        f"{len(spectra)} modules, {args.batches} batches of 2 x <= {args.seq} tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"(a) calibration {t_ours:.3f}s / plain fwd+bwd {t_plain:.3f}s = "
        f"{t_ours / t_plain:.2f}x (target <= 1.15x)"
    )
    print(
        f"(b) seed-style hooks {t_seed:.3f}s / calibration {t_ours:.3f}s = "
        f"{t_seed / t_ours:.2f}x (target >= 2x)"
    )
    print(
        f"(c) dense SVD {t_dense:.3f}s / compact SVD {t_compact * 1e3:.2f}ms at "
        f"{args.svd_size}x{args.svd_size}, rank {args.svd_rank} = {t_dense / t_compact:.0f}x "
        "(target >= 100x)"
    )
    return {
        "calibration_over_plain": t_ours / t_plain,
        "seed_over_calibration": t_seed / t_ours,
        "dense_over_compact_svd": t_dense / t_compact,
    }


if __name__ == "__main__":
    main()
