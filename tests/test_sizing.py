"""Sizing: the GPU catalog, GFD node labels, the peak-VRAM estimator and the planner (no torch).

Reference values are counted by hand in each test from published configs and the estimator's
documented terms (module docstring of `loraforge.sizing`), never copied from its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraforge import sizing
from loraforge.errors import IntegrityError, PermanentError
from loraforge.launcher import gpus, models
from loraforge.settings import (
    EditSettings,
    EvalSettings,
    TrainSettings,
    load_settings,
)

ROOT = Path(__file__).parents[1]
GiB = 2**30
QWEN_05B = models.RECOMMENDED["Qwen/Qwen2.5-0.5B-Instruct"]
QWEN_7B = models.RECOMMENDED["Qwen/Qwen2.5-7B-Instruct"]
LLAMA_8B = models.RECOMMENDED["meta-llama/Llama-3.1-8B-Instruct"]

# GPU Feature Discovery labels of fake nodes, as GFD writes them.
NODES: dict[str, dict[str, str]] = {
    "t4": {
        "nvidia.com/gpu.product": "Tesla-T4",
        "nvidia.com/gpu.memory": "15360",
        "nvidia.com/gpu.count": "1",
        "nvidia.com/gpu.compute.major": "7",
    },
    "l4": {
        "nvidia.com/gpu.product": "NVIDIA-L4",
        "nvidia.com/gpu.memory": "23034",
        "nvidia.com/gpu.count": "4",
    },
    "a100": {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "nvidia.com/gpu.memory": "81920",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/mig.strategy": "none",
    },
    "h100": {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "8",
    },
    "mig1g": {  # single strategy: GFD relabels product, memory and count for the slices
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb",
        "nvidia.com/gpu.memory": "9728",
        "nvidia.com/gpu.count": "7",
        "nvidia.com/mig.strategy": "single",
    },
    "mig3g": {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-3g.40gb",
        "nvidia.com/gpu.memory": "40192",
        "nvidia.com/gpu.count": "2",
        "nvidia.com/mig.strategy": "single",
    },
    "cpu": {"kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m5.xlarge"},
}


def node_gpu(name: str) -> gpus.Gpu:
    found = gpus.from_node_labels(name, NODES[name])
    assert found is not None
    return found.gpu


def train_settings(**values: Any) -> TrainSettings:
    env = {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_DATA": "d.jsonl"}
    env |= {f"LORAFORGE_{k.upper()}": str(v) for k, v in values.items()}
    return load_settings(TrainSettings, env)


def chosen(plan: sizing.Plan) -> tuple[str, int, int, str]:
    env = plan.env
    return (
        env["LORAFORGE_QUANTIZATION"],
        int(env["LORAFORGE_MICRO_BATCH_SIZE"]),
        int(env["LORAFORGE_GRAD_ACCUM"]),
        env["LORAFORGE_GRADIENT_CHECKPOINTING"],
    )


# --- the estimator against slow, obvious references -------------------------------------------


def test_parameter_counts_match_the_published_models() -> None:
    qwen = sizing.ModelShape.from_config(QWEN_05B)
    # per layer: q, o 896x896; k, v 896x128; gate, up, down 896x4864; 2 norms; q/k/v biases
    layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864 + 2 * 896 + (896 + 128 + 128)
    assert qwen.params == 24 * layer + 151936 * 896 + 896  # tied: one embedding matrix
    assert abs(qwen.params - 494e6) / 494e6 < 0.01  # model card: 0.49B (494M)
    llama = sizing.ModelShape.from_config(LLAMA_8B)
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert llama.params == 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248
    assert abs(llama.params - 8.03e9) / 8.03e9 < 0.01


def test_lora_and_dora_parameters_by_hand() -> None:
    shape = sizing.ModelShape.from_config(QWEN_05B)
    # rank 16 on q (896->896), k and v (896->128), o (896->896): r x (in + out) each
    per_layer = 16 * ((896 + 896) + 2 * (896 + 128) + (896 + 896))
    assert sizing.lora_params(shape, 16, sizing.DEFAULT_TARGETS) == 24 * per_layer == 2_162_688
    assert sizing.dora_magnitudes(shape, ["q_proj", "v_proj"]) == 24 * (896 + 128)
    everything = 16 * (2 * 1792 + 2 * 1024 + 2 * (896 + 4864) + (4864 + 896))
    assert sizing.lora_params(shape, 16, ["all-linear"]) == 24 * everything


def test_kv_cache_is_128_kib_per_token_for_llama_8b() -> None:
    shape = sizing.ModelShape.from_config(LLAMA_8B)
    # 32 layers x (k, v) x 8 kv heads x 128 head dim x 2 bytes
    assert sizing.kv_bytes_per_token(shape, "bf16") == 32 * 2 * 8 * 128 * 2 == 128 * 1024
    estimate = sizing.estimate_eval(
        shape, precision="bf16", batch_size=4, prompt_tokens=1000, new_tokens=24
    )
    assert estimate.kv_cache == 4 * 1024 * 128 * 1024  # 4 sequences x 1024 tokens in flight


def test_weights_at_each_quantization() -> None:
    shape = sizing.ModelShape.from_config(QWEN_05B)
    linears = 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864)
    rest = 494_032_768 - linears  # embedding, norms, biases: fp32 under k-bit training
    assert sizing.weight_bytes(shape, "none", "bf16") == 2 * 494_032_768
    assert sizing.weight_bytes(shape, "none", "fp32") == 4 * 494_032_768
    assert sizing.weight_bytes(shape, "int8", "bf16") == linears * 1.0 + rest * 4
    nf4 = 4.127 / 8  # QLoRA: 4 bits + 0.127 bits of double-quantised block constants
    assert sizing.weight_bytes(shape, "nf4", "bf16") == pytest.approx(
        linears * nf4 + rest * 4, rel=1e-5
    )


def test_training_terms_by_hand() -> None:
    shape = sizing.ModelShape.from_config(QWEN_05B)
    # one layer keeps, per token: 2 norms x 896 x 4 (fp32) + SDPA q,k,v,out 4 x 896 x 2 + SwiGLU
    # 3 x 4864 x 2 + per LoRA module 5 bytes x 896 inputs + A's 16 fp32 outputs (4 modules)
    layer = 2 * 896 * 4 + 4 * 896 * 2 + 3 * 4864 * 2 + 4 * (5 * 896 + 16 * 4)
    assert layer == 61696
    tokens = 2 * 2048
    full = sizing.estimate_train(
        shape, quantization="none", rank=16, tokens_per_micro_batch=tokens, checkpointing=False
    )
    assert full.activations == tokens * (24 * layer + 4 * 896)
    assert full.logits == tokens * 151936 * (2 + 12)  # bf16 logits + fp32 copy, softmax, grad
    assert full.adapter == 2_162_688 * 16  # fp32 weight + grad + AdamW m, v
    ckpt = sizing.estimate_train(
        shape, quantization="none", rank=16, tokens_per_micro_batch=tokens, checkpointing=True
    )
    # checkpointing keeps each layer's bf16 input, plus one layer while it is recomputed
    assert ckpt.activations == tokens * (24 * 896 * 2 + layer + 4 * 896)
    assert ckpt.weights == full.weights and ckpt.logits == full.logits
    breakdown = sum(full.breakdown().values())
    assert breakdown == pytest.approx(full.peak / GiB, abs=0.01)


def test_dora_costs_more_than_lora() -> None:
    shape = sizing.ModelShape.from_config(QWEN_05B)
    args: dict[str, Any] = {
        "quantization": "none",
        "rank": 16,
        "tokens_per_micro_batch": 2048,
        "checkpointing": False,
    }
    lora = sizing.estimate_train(shape, **args)
    dora = sizing.estimate_train(shape, **args, method="dora")
    assert dora.adapter - lora.adapter == 24 * (896 + 128 + 128 + 896) * 16
    assert dora.activations > lora.activations and dora.transient > 0


# --- the catalog and node labels --------------------------------------------------------------


def test_catalog_lookup_ignores_case_and_accepts_gfd_products() -> None:
    assert gpus.get("a100-80gb").name == "A100-80GB"
    assert gpus.get("NVIDIA-H100-80GB-HBM3").name == "H100-80GB"
    assert gpus.get("MIG-1G.10GB").mig
    assert not gpus.get("t4").bf16 and gpus.get("L4").bf16
    assert gpus.get("T4").vram_bytes == 15360 * 2**20


def test_unknown_gpu_lists_the_catalog() -> None:
    with pytest.raises(PermanentError, match=r"unknown GPU 'X100': use one of T4, L4, A10G.*B200"):
        gpus.get("X100")


@pytest.mark.parametrize(
    ("node", "name", "vram_mib", "count", "bf16"),
    [
        ("t4", "T4", 15360, 1, False),
        ("l4", "L4", 23034, 4, True),
        ("a100", "A100-80GB", 81920, 8, True),
        ("h100", "H100-80GB", 81559, 8, True),
        ("mig1g", "mig-1g.10gb", 9728, 7, True),
        ("mig3g", "mig-3g.40gb", 40192, 2, True),
    ],
)
def test_gpus_read_from_node_labels(
    node: str, name: str, vram_mib: int, count: int, bf16: bool
) -> None:
    found = gpus.from_node_labels(node, NODES[node])
    assert found is not None
    assert (found.gpu.name, found.count, found.gpu.bf16) == (name, count, bf16)
    assert found.gpu.vram_gib == round(vram_mib / 1024, 2)
    assert found.product == NODES[node]["nvidia.com/gpu.product"]
    assert found.resource == "nvidia.com/gpu"


def test_a_node_without_gfd_labels_has_no_gpu() -> None:
    assert gpus.from_node_labels("cpu", NODES["cpu"]) is None


def test_mig_slices_are_sized_by_the_memory_label_not_the_name() -> None:
    labels = NODES["mig1g"] | {"nvidia.com/gpu.memory": "9984"}  # an H100's 1g.10gb
    found = gpus.from_node_labels("h100-mig", labels)
    assert found is not None and found.gpu.vram_gib == 9.75


def test_mixed_mig_strategy_offers_each_profile_as_its_own_resource() -> None:
    labels = {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/gpu.compute.major": "8",
        "nvidia.com/mig-1g.5gb.count": "2",
        "nvidia.com/mig-1g.5gb.memory": "4864",
        "nvidia.com/mig-1g.5gb.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
        "nvidia.com/mig-3g.20gb.count": "1",
        "nvidia.com/mig-3g.20gb.memory": "19968",
        "nvidia.com/mig-3g.20gb.product": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb",
    }
    offered = gpus.node_gpus("mixed", labels)
    assert sorted((o.gpu.name, o.count, o.resource) for o in offered) == [
        ("mig-1g.5gb", 2, "nvidia.com/mig-1g.5gb"),
        ("mig-3g.20gb", 1, "nvidia.com/mig-3g.20gb"),
    ]
    assert all(o.gpu.bf16 and o.gpu.mig for o in offered)
    largest = gpus.from_node_labels("mixed", labels)
    assert largest is not None and largest.gpu.vram_gib == 19.5


def test_unknown_products_are_sized_from_their_memory_label() -> None:
    labels = {
        "nvidia.com/gpu.product": "NVIDIA-RTX-6000-Ada-Generation-SHARED",
        "nvidia.com/gpu.memory": "49140",
        "nvidia.com/gpu.compute.major": "8",
    }
    found = gpus.from_node_labels("ws", labels)
    assert found is not None
    assert (found.gpu.vram_gib, found.gpu.bf16, found.count) == (47.99, True, 1)
    shared_t4 = gpus.from_node_labels("ts", {"nvidia.com/gpu.product": "Tesla-T4-SHARED"})
    assert shared_t4 is not None and shared_t4.gpu.name == "T4"
    assert gpus.from_node_labels("x", {"nvidia.com/gpu.product": "Mystery-GPU"}) is None


def test_pick_node_takes_the_smallest_gpu_that_fits() -> None:
    nodes = [gpus.from_node_labels(n, NODES[n]) for n in ("h100", "t4", "l4", "mig1g")]
    offered = [n for n in nodes if n is not None]
    # 0.9 x 15 GiB = 13.5 GiB on the T4; 0.9 x 22.49 GiB = 20.2 GiB on the L4
    assert gpus.pick_node(offered, 13 * GiB).node == "t4"
    assert gpus.pick_node(offered, 14 * GiB).node == "l4"
    assert gpus.pick_node(offered, 8 * GiB).node == "mig1g"
    with pytest.raises(
        PermanentError, match=r"72\.0 GiB.*h100 \(H100-80GB, 79\.65 GiB\), t4 \(T4, 15 GiB\)"
    ):
        gpus.pick_node(offered, 72 * GiB)


# --- the planner on fake nodes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "config", "expected"),
    [
        # 0.5B: weights are under 1 GiB; its 151936-entry vocabulary makes the logits the big
        # term: 2048 x 151936 x 14 B = 4.06 GiB per sequence. The T4 (13.5 GiB usable) holds two
        # sequences' logits (8.1 GiB) with checkpointing; without it, their activations add
        # 4096 x 24 x 61696 B = 5.65 GiB too many.
        ("t4", QWEN_05B, ("none", 2, 4, "on")),
        ("l4", QWEN_05B, ("none", 2, 4, "off")),
        # 8 sequences: logits 32.5 + activations 22.6 + weights 0.9 GiB, x 1.1 + 0.6 = 62 < 72
        ("a100", QWEN_05B, ("none", 8, 1, "off")),
        ("h100", QWEN_05B, ("none", 8, 1, "off")),
        ("mig1g", QWEN_05B, ("none", 1, 8, "on")),
        ("mig3g", QWEN_05B, ("none", 4, 2, "off")),
        # 7B: bf16 weights 14.2 GiB + one sequence's logits 4.1 GiB, x 1.1 + 0.6 > 20.2 GiB on
        # the L4; int8 (6.1 GiB of linears + 4.1 GiB of fp32 embeddings) fits.
        ("l4", QWEN_7B, ("int8", 1, 8, "on")),
        ("a100", QWEN_7B, ("none", 2, 4, "off")),
        ("h100", QWEN_7B, ("none", 2, 4, "off")),
        ("mig3g", QWEN_7B, ("none", 2, 4, "on")),
    ],
)
def test_plan_train_on_fake_nodes(
    node: str, config: dict[str, Any], expected: tuple[str, int, int, str]
) -> None:
    gpu = node_gpu(node)
    settings = train_settings()  # micro-batch 8 x 2048 tokens, accumulation 1, auto, auto
    plan = sizing.plan_train(config, gpu, settings)
    assert chosen(plan) == expected
    assert plan.env["LORAFORGE_PRECISION"] == ("bf16" if gpu.bf16 else "fp16")
    assert plan.peak_bytes <= 0.9 * gpu.vram_bytes  # the estimate never exceeds the GPU
    assert plan.vram_bytes == gpu.vram_bytes
    _, micro, accum, _ = expected
    assert micro * accum == 8  # the effective batch is kept


def test_plan_train_takes_the_largest_micro_batch_that_fits() -> None:
    """One step up from the chosen micro-batch (same quantization, checkpointing) would not fit."""
    gpu, shape = node_gpu("t4"), sizing.ModelShape.from_config(QWEN_05B)
    plan = sizing.plan_train(QWEN_05B, gpu, train_settings())
    _, micro, _, ckpt = chosen(plan)
    bigger = sizing.estimate_train(
        shape,
        quantization="none",
        rank=16,
        tokens_per_micro_batch=2 * micro * 2048,
        checkpointing=ckpt == "on",
        precision="fp16",
    )
    assert bigger.peak > 0.9 * gpu.vram_bytes


def test_effective_batch_is_kept_for_any_micro_batch() -> None:
    plan = sizing.plan_train(
        QWEN_05B, node_gpu("t4"), train_settings(micro_batch_size=6, grad_accum=2)
    )
    _, micro, accum, _ = chosen(plan)
    assert micro in (6, 3, 2, 1) and micro * accum == 12


def test_explicit_settings_are_respected() -> None:
    plan = sizing.plan_train(QWEN_05B, node_gpu("a100"), train_settings(quantization="nf4"))
    assert chosen(plan)[0] == "nf4"
    # checkpointing off on the T4: one sequence without it fits (4.06 + 2.8 + 0.9 GiB, x 1.1)
    plan = sizing.plan_train(QWEN_05B, node_gpu("t4"), train_settings(gradient_checkpointing="off"))
    assert chosen(plan) == ("none", 1, 8, "off")
    with pytest.raises(PermanentError, match="LORAFORGE_PRECISION=bf16: T4 has no bf16"):
        sizing.plan_train(QWEN_05B, node_gpu("t4"), train_settings(precision="bf16"))


def test_7b_on_a_1g_10gb_slice_is_refused_naming_what_fits() -> None:
    # nf4 linears 3.4 GB + fp32 embeddings and lm_head 4.4 GB: 7.2 GiB, x 1.1 + 0.6 = 8.5 GiB,
    # all of the slice's 0.9 x 9.5 GiB before a single token: only a larger GPU helps
    with pytest.raises(PermanentError) as refused:
        sizing.plan_train(QWEN_7B, node_gpu("mig1g"), train_settings(rank=64))
    message = str(refused.value)
    assert "train does not fit mig-1g.10gb" in message
    assert "--gpu mig-1g.20gb" in message and "MAX_SEQ_LEN" not in message
    assert "\n" not in message


def test_refusals_name_nf4_and_a_shorter_max_seq_len() -> None:
    with pytest.raises(
        PermanentError, match=r"LORAFORGE_QUANTIZATION=nf4 or .* or --gpu A100-40GB$"
    ):
        sizing.plan_train(QWEN_7B, node_gpu("l4"), train_settings(quantization="none"))
    # on the T4 even nf4 fails at 2048 tokens: half the logits (2.3 GiB) make it fit
    # ... or FSDP over 4 T4s (each: a quarter of the weights)
    fsdp = "LORAFORGE_PARALLEL=fsdp LORAFORGE_GPUS=4 LORAFORGE_GRAD_ACCUM=4"
    with pytest.raises(PermanentError, match=rf"LORAFORGE_MAX_SEQ_LEN=1024 or {fsdp} or --gpu L4$"):
        sizing.plan_train(QWEN_7B, node_gpu("t4"), train_settings())


def test_fsdp_shards_weights_and_adapter_state_over_the_processes() -> None:
    shape = sizing.ModelShape.from_config(QWEN_7B)
    whole = sizing.estimate_train(
        shape, quantization="none", rank=16, tokens_per_micro_batch=2048, checkpointing=True
    )
    four = sizing.sharded(whole, shape, 4)
    # a GPU holds a quarter of the bf16 weights plus two of the 28 decoder layers gathered whole
    assert shape.layers == 28
    assert four.weights == whole.weights / 4 + 2 * whole.weights / 28
    assert four.adapter == whole.adapter / 4
    assert (four.activations, four.logits) == (whole.activations, whole.logits)
    settings = train_settings(quantization="auto", parallel="fsdp", gpus=4, grad_accum=4)
    plan = sizing.plan_train(QWEN_7B, node_gpu("l4"), settings)
    assert plan.env["LORAFORGE_QUANTIZATION"] == "none"  # FSDP never picks a k-bit base
    with pytest.raises(PermanentError, match="does not fit L4"):  # one L4 cannot hold it
        sizing.plan_train(QWEN_7B, node_gpu("l4"), train_settings(quantization="none"))


def test_plan_eval_falls_back_to_transformers_when_vllm_cannot_hold_the_context() -> None:
    settings = load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m"})
    plan = sizing.plan_eval(LLAMA_8B, node_gpu("l4"), settings)
    # vLLM needs KV cache for max_model_len 131072: 16 GiB on top of 15 GiB of weights.
    assert plan.env["LORAFORGE_ENGINE"] == "transformers"
    # transformers: 5-shot prompts (6 x 256 tokens) + 512 new tokens = 2048 tokens in flight per
    # row at 128 KiB each (0.25 GiB) + prefill 1536 x (4096 + 2 x 14336) x 2 B (0.1 GiB);
    # (14.96 + 0.344 b) x 1.1 + 0.6 <= 20.24 GiB gives b <= 8.4: batch 32 halves to 8
    assert plan.env["LORAFORGE_BATCH_SIZE"] == "8"
    small = sizing.plan_eval(QWEN_05B, node_gpu("l4"), settings)
    assert small.env == {"LORAFORGE_PRECISION": "bf16", "LORAFORGE_BATCH_SIZE": "32"}
    vllm = load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_ENGINE": "vllm"})
    with pytest.raises(PermanentError, match="LORAFORGE_ENGINE=transformers"):
        sizing.plan_eval(LLAMA_8B, node_gpu("l4"), vllm)


def test_plan_edit_shrinks_the_calibration_batch() -> None:
    env = {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_ADAPTER": "s3://b/a"}
    plan = sizing.plan_edit(QWEN_05B, node_gpu("t4"), load_settings(EditSettings, env))
    # one 2048-token example: logits 4.06 GiB; two would add 4.06 + 2.1 GiB of activations
    assert plan.env == {
        "LORAFORGE_QUANTIZATION": "none",
        "LORAFORGE_PRECISION": "fp16",
        "LORAFORGE_CALIB_BATCH_SIZE": "1",
    }
    # 8B: fp16 weights alone (15 GiB) overflow the T4. nf4 at 512 tokens fits: weights 5.3 GiB
    # (nf4 linears + fp16 embeddings) + activations 512 x 32 x 206592 B = 3.2 GiB (bitsandbytes
    # keeps matmul inputs) + logits 512 x 128256 x 14 B = 0.9 GiB + the assumed rank-64 adapter
    # with its SVD factors 1.25 GiB: 10.6 x 1.1 + 0.6 = 12.2 <= 13.5 GiB; 1024 tokens do not.
    refusal = r"edit does not fit T4.*nf4 with LORAFORGE_MAX_SEQ_LEN=512 or --gpu A100-40GB$"
    with pytest.raises(PermanentError, match=refusal):
        sizing.plan_edit(LLAMA_8B, node_gpu("t4"), load_settings(EditSettings, env))


def test_plan_to_json_reports_the_choice() -> None:
    plan = sizing.plan_train(QWEN_05B, node_gpu("l4"), train_settings())
    data = json.loads(plan.to_json())
    assert data["gpu"] == "L4" and data["settings"] == plan.env and data["calibrated"] is False
    assert sum(data["breakdown_gib"].values()) == pytest.approx(
        data["predicted_peak_gib"], abs=0.02
    )


def test_choose_quantization_for_the_train_job_still_works() -> None:
    t4 = 15360 * 2**20
    assert (
        sizing.choose_quantization(
            QWEN_05B, t4, rank=16, targets=["q_proj"], tokens_per_micro_batch=2048
        )
        == "none"
    )
    with pytest.raises(ValueError, match="even nf4"):
        sizing.choose_quantization(
            QWEN_7B, t4, rank=16, targets=["q_proj"], tokens_per_micro_batch=8 * 2048
        )


# --- model configs ----------------------------------------------------------------------------


def test_recommended_configs_are_built_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.read_config("qwen/qwen2.5-0.5b-instruct")["hidden_size"] == 896
    assert models.read_config("meta-llama/Llama-3.1-8B", revision="main")["vocab_size"] == 128256


def test_config_from_a_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "model_type": "llama"}))
    assert models.read_config(str(tmp_path))["hidden_size"] == 64
    (tmp_path / "empty").mkdir()
    with pytest.raises(PermanentError, match=r"LORAFORGE_BASE_MODEL=.*has no config\.json"):
        models.read_config(str(tmp_path / "empty"))
    with pytest.raises(PermanentError, match=r"LORAFORGE_BASE_MODEL=\./nowhere: .*not a directory"):
        models.read_config("./nowhere")


@pytest.mark.s3
def test_config_from_an_s3_artifact_is_verified(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    from loraforge import store

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    uri = f"{s3_bucket}/models/qwen"
    manifest = store.publish(tmp_path, uri, job="upload", run_id="t")
    assert models.read_config(uri) == QWEN_7B
    client = boto3.session.Session().client("s3", region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    key = f"models/qwen/{manifest.data_prefix}/config.json"
    client.put_object(Bucket=bucket, Key=key, Body=b'{"hidden_size": 1}')
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        models.read_config(uri)
    with pytest.raises(PermanentError, match=r"LORAFORGE_BASE_MODEL: .*no published artifact"):
        models.read_config(f"{s3_bucket}/models/none")


# --- the commands, as a user runs them --------------------------------------------------------

LORAFORGE = str(Path(sys.executable).parent / "loraforge")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
    environ |= {"HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.run(
        [LORAFORGE, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=environ
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert pattern in done.stderr


def test_cli_gpus() -> None:
    done = run("gpus")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in done.stdout.splitlines()[1:]}
    assert rows["T4"] == ["15", "no"] and rows["H200"] == ["140.4", "yes"]
    assert "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb" in done.stdout
    listed = json.loads(run("gpus", "--json").stdout)
    assert [g["name"] for g in listed] == gpus.names()


def test_cli_estimate_on_the_shipped_train_spec() -> None:
    done = run("estimate", "--env-file", "jobs/train.env", "--gpu", "t4")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["job"], plan["gpu"], plan["base_model"]) == (
        "train",
        "T4",
        "Qwen/Qwen2.5-0.5B-Instruct",
    )
    assert plan["settings"] == {
        "LORAFORGE_QUANTIZATION": "none",
        "LORAFORGE_PRECISION": "fp16",
        "LORAFORGE_MICRO_BATCH_SIZE": "2",
        "LORAFORGE_GRAD_ACCUM": "4",
        "LORAFORGE_GRADIENT_CHECKPOINTING": "on",
    }
    assert plan["predicted_peak_gib"] <= 0.9 * 15


def test_cli_estimate_with_a_local_config_and_the_job_from_the_file_name(tmp_path: Path) -> None:
    model = tmp_path / "llama-1b"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(models.RECOMMENDED["meta-llama/Llama-3.2-1B-Instruct"])
    )
    spec = tmp_path / "eval.local.env"
    spec.write_text(f"LORAFORGE_BASE_MODEL={model}\nLORAFORGE_BATCH_SIZE=4\n")
    done = run("estimate", "--env-file", str(spec), "--gpu", "A100-80GB")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["job"] == "eval" and plan["params"] == 1_235_814_400
    assert plan["settings"]["LORAFORGE_BATCH_SIZE"] == "4"


def test_cli_estimate_runs_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from loraforge.launcher.cli import main; main(sys.argv[1:])"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "estimate",
            "edit",
            "--env-file",
            "jobs/edit.env",
            "--gpu",
            "L4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["job"] == "edit"


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    assert_one_line_error(
        run("estimate", "--env-file", "jobs/train.env", "--gpu", "X100"), "use one of T4, L4"
    )
    assert_one_line_error(
        run("estimate", "--env-file", str(tmp_path / "train.env"), "--gpu", "T4"),
        "cannot read the job spec",
    )
    spec = tmp_path / "spec.env"
    spec.write_text("LORAFORGE_BASE_MODEL=m\n")
    assert_one_line_error(run("estimate", "--env-file", str(spec), "--gpu", "T4"), "name it")
    unknown = tmp_path / "train.env"
    unknown.write_text("LORAFORGE_BASE_MODEL=someone/unknown-model\nLORAFORGE_DATA=d.jsonl\n")
    assert_one_line_error(
        run("estimate", "--env-file", str(unknown), "--gpu", "T4"),
        "pass a local directory or an s3:// URI",
    )
    big = tmp_path / "train.big.env"
    big.write_text("LORAFORGE_BASE_MODEL=Qwen/Qwen2.5-7B-Instruct\nLORAFORGE_DATA=d.jsonl\n")
    assert_one_line_error(
        run("estimate", "--env-file", str(big), "--gpu", "mig-1g.10gb"), "--gpu mig-1g.20gb"
    )


def test_cli_list_models() -> None:
    done = run("list-models")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if "/" in line}
    assert set(models.RECOMMENDED) <= set(lines)
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["model", "params", "T4"] and "mig-1g.10gb" not in header
    qwen7 = lines["Qwen/Qwen2.5-7B-Instruct"]
    assert qwen7[0] == "7.62B" and qwen7[1] == "-"  # does not fit a T4 at 2048 tokens
    assert qwen7[2] == "int8"  # L4: needs int8
    data = json.loads(run("list-models", "--mig", "--json").stdout)
    fit = {d["model"]: d["train_lora"] for d in data}
    assert fit["Qwen/Qwen2.5-0.5B-Instruct"]["mig-1g.10gb"]["fit"] == "fits"
    assert fit["Qwen/Qwen2.5-7B-Instruct"]["mig-1g.10gb"]["fit"] == "does not fit"


def test_cli_info_without_and_with_a_gpu(tmp_path: Path) -> None:
    bare = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = run("info", env=bare)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["versions"]["python"] and info["hardware"]["cpus"] >= 1
    assert info["hardware"]["gpus"] == "no GPU" and info["sizing"].startswith("none")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Tesla T4, 15360 MiB'\n")
    smi.chmod(0o755)
    info = json.loads(run("info", env=bare).stdout)
    assert info["hardware"]["gpus"] == [{"name": "Tesla T4", "memory_mib": 15360}]
    assert info["sizing"]["gpu"] == "T4"
    assert info["sizing"]["settings"]["LORAFORGE_MICRO_BATCH_SIZE"] == "2"
